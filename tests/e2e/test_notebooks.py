"""Both notebooks: every code cell compiles, the parameters cell finds the repository from a kernel started in
another folder, and (slow) each runs top to bottom under nbclient at the tiny scale in a temporary checkout."""

import shutil
import sys
from pathlib import Path

import nbformat
import pytest
from IPython.core.inputtransformer2 import TransformerManager
from nbclient import NotebookClient

REPOSITORY = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPOSITORY / "notebooks"
NAMES = ["train.ipynb", "search.ipynb"]
CELL_TIMEOUT = 600


def _client(notebook: nbformat.NotebookNode, workdir: Path, monkeypatch) -> NotebookClient:
    # The kernel must be this interpreter's: JUPYTER_PATH is searched before any per-user kernel spec.
    monkeypatch.setenv("JUPYTER_PATH", str(Path(sys.prefix) / "share" / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", str(REPOSITORY))  # the package under test, wherever the kernel starts
    return NotebookClient(
        notebook, kernel_name="python3", timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(workdir)}}
    )


def _execute(name: str, checkout: Path, monkeypatch) -> nbformat.NotebookNode:
    """Copy both notebooks into `checkout/notebooks` (search.ipynb may `%run` train.ipynb) and run one of them with
    `checkout` as the repository and the kernel started in another folder."""
    (checkout / "notebooks").mkdir()
    for notebook in NOTEBOOKS.glob("*.ipynb"):
        shutil.copy(notebook, checkout / "notebooks" / notebook.name)
    elsewhere = checkout / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("DUAL_ENCODER_NB_SCALE", "tiny")
    monkeypatch.setenv("DUAL_ENCODER_NB_ROOT", str(checkout))
    notebook = nbformat.read(checkout / "notebooks" / name, as_version=4)
    _client(notebook, elsewhere, monkeypatch).execute()  # raises CellExecutionError, with the cell and traceback
    return notebook


def _outputs(notebook: nbformat.NotebookNode) -> list:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


def _text(notebook: nbformat.NotebookNode) -> str:
    parts = []
    for output in _outputs(notebook):
        parts.append(output.get("text", ""))
        parts.append(output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def _images(notebook: nbformat.NotebookNode) -> int:
    return sum("image/png" in output.get("data", {}) for output in _outputs(notebook))


@pytest.mark.parametrize("name", NAMES)
def test_every_code_cell_compiles(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    for number, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":  # IPython syntax (%run, %matplotlib) becomes the Python it stands for
            compile(TransformerManager().transform_cell(cell.source), f"{name} cell {number}", "exec")


@pytest.mark.parametrize("name", NAMES)
def test_the_parameters_cell_finds_the_repository_from_a_kernel_started_elsewhere(name, tmp_path, monkeypatch):
    monkeypatch.delenv("DUAL_ENCODER_NB_ROOT", raising=False)
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    parameters = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    notebook.cells = parameters + [nbformat.v4.new_code_cell("import os; print(ROOT, os.getcwd(), sep='|')")]
    _client(notebook, tmp_path, monkeypatch).execute()
    root, cwd = notebook.cells[-1].outputs[0]["text"].strip().split("|")
    assert Path(cwd) == tmp_path.resolve() and Path(root) == REPOSITORY


@pytest.mark.parametrize("name", NAMES)
def test_notebooks_are_committed_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
    assert any("parameters" in cell.metadata.get("tags", []) for cell in notebook.cells)


def _no_progress_warnings(notebook: nbformat.NotebookNode) -> None:
    # tqdm.auto draws widgets (ipywidgets installed): no "IProgress not found" TqdmWarning.
    text = _text(notebook)
    assert "TqdmWarning" not in text and "IProgress not found" not in text


@pytest.mark.slow
def test_train_notebook_trains_plots_and_evaluates(tmp_path, monkeypatch):
    notebook = _execute("train.ipynb", tmp_path, monkeypatch)
    text = _text(notebook)
    assert "48 images" in text
    assert "trained 2 epochs" in text
    # The last evaluation cell's value is the metrics dict.
    metrics_output = [o for o in _outputs(notebook) if o.output_type == "execute_result"][-1]
    for key in ("'t2i_recall@1'", "'i2t_recall@10'", "'top100_accuracy'"):
        assert key in metrics_output.data["text/plain"]
    assert _images(notebook) >= 2  # sample images and the training curves
    assert "MS-COCO recipe skipped" in text
    assert (tmp_path / "runs" / "notebook-tiny" / "model").is_dir()
    assert not (tmp_path / "elsewhere" / "runs").exists()  # nothing written where the kernel started
    _no_progress_warnings(notebook)


@pytest.mark.slow
def test_search_notebook_builds_what_is_missing_and_shows_a_grid(tmp_path, monkeypatch):
    notebook = _execute("search.ipynb", tmp_path, monkeypatch)
    text = _text(notebook)
    assert "running train.ipynb first" in text
    assert "query: 'a red star' -> searched for: 'a red star'" in text
    assert "a blue ring on the left -> [" in text and "\na red star -> [" in text  # the request phrase stripped
    assert "#1 " in text and "score" in text
    assert "'count': 48" in text  # every generated image is indexed
    assert _images(notebook) >= 1  # the result grid (and train.ipynb's plots)
    assert (tmp_path / "indexes" / "notebook-tiny" / "manifest.json").is_file()
    _no_progress_warnings(notebook)
