"""Both notebooks, executed top to bottom by nbclient at the tiny scale in a temporary working folder."""

import shutil
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
CELL_TIMEOUT = 600


def _execute(name: str, workdir: Path, monkeypatch) -> nbformat.NotebookNode:
    """Copy both notebooks into `workdir` (search.ipynb may `%run` train.ipynb) and run one of them there."""
    for notebook in NOTEBOOKS.glob("*.ipynb"):
        shutil.copy(notebook, workdir / notebook.name)
    monkeypatch.setenv("DUAL_ENCODER_NB_SCALE", "tiny")
    monkeypatch.setenv("DUAL_ENCODER_NB_ROOT", str(workdir))
    # The kernel must be this interpreter's: JUPYTER_PATH is searched before any per-user kernel spec.
    monkeypatch.setenv("JUPYTER_PATH", str(Path(sys.prefix) / "share" / "jupyter"))
    notebook = nbformat.read(workdir / name, as_version=4)
    client = NotebookClient(
        notebook, kernel_name="python3", timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(workdir)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails
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


@pytest.mark.parametrize("name", ["train.ipynb", "search.ipynb"])
def test_notebooks_are_committed_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
    assert any("parameters" in cell.metadata.get("tags", []) for cell in notebook.cells)


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


def test_search_notebook_builds_what_is_missing_and_shows_a_grid(tmp_path, monkeypatch):
    notebook = _execute("search.ipynb", tmp_path, monkeypatch)
    text = _text(notebook)
    assert "running train.ipynb first" in text
    assert "searched for: 'a red star'" in text  # the request phrase stripped from a short query
    assert "#1 " in text and "score" in text
    assert "'count': 48" in text  # every generated image is indexed
    assert _images(notebook) >= 1  # the result grid (and train.ipynb's plots)
    assert (tmp_path / "indexes" / "notebook-tiny" / "manifest.json").is_file()
