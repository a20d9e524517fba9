"""Where the notebooks read and write: the repository, found from the notebook, the working folder or the package."""

from pathlib import Path

import pytest

from dual_encoder.notebooks import find_repository, is_repository

REPOSITORY = Path(__file__).resolve().parents[2]


def _checkout(folder: Path) -> Path:
    (folder / "dual_encoder").mkdir(parents=True)
    (folder / "dual_encoder" / "__init__.py").write_text("")
    (folder / "notebooks").mkdir()
    (folder / "setup.cfg").write_text("[metadata]\nname = dual_encoder\n")
    return folder


@pytest.fixture(autouse=True)
def _no_hints(monkeypatch):
    monkeypatch.delenv("DUAL_ENCODER_NB_ROOT", raising=False)
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)


def test_this_checkout_is_a_repository_and_its_notebooks_folder_is_not():
    assert is_repository(REPOSITORY) and not is_repository(REPOSITORY / "notebooks")


def test_from_the_notebooks_folder_or_the_root_the_answer_is_the_root(monkeypatch):
    for start in (REPOSITORY / "notebooks", REPOSITORY):
        monkeypatch.chdir(start)
        assert find_repository() == REPOSITORY


def test_from_an_unrelated_folder_the_package_says_where_it_lives(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_repository() == REPOSITORY  # this package is imported from the checkout (tests, editable install)


def test_a_checkout_holding_the_working_folder_or_the_notebook_wins(tmp_path, monkeypatch):
    other = _checkout(tmp_path / "other clone")
    monkeypatch.chdir(other / "notebooks")
    assert find_repository() == other
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JPY_SESSION_NAME", str(other / "notebooks" / "search.ipynb"))  # set by Jupyter Server
    assert find_repository() == other


def test_the_environment_variable_overrides_everything(tmp_path, monkeypatch):
    monkeypatch.setenv("DUAL_ENCODER_NB_ROOT", str(tmp_path / "anywhere"))
    monkeypatch.chdir(REPOSITORY)
    assert find_repository() == tmp_path / "anywhere"
