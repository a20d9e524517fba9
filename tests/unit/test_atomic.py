"""The one atomic-directory mechanism behind datasets, models, feature caches, indexes and exports."""

import os

import pytest

from dual_encoder.atomic import FEATURE_CACHE, atomic_directory, readable_path, recover
from dual_encoder.errors import DualEncoderError

DATA = FEATURE_CACHE.marker  # the kind's one file: its content stands for the artifact's data


def _write(target, text):
    with atomic_directory(target, FEATURE_CACHE, overwrite=True) as staging:
        (staging / DATA).write_text(text)


def test_a_write_replaces_the_previous_artifact_and_leaves_no_staging(tmp_path):
    _write(tmp_path / "a", "one")
    _write(tmp_path / "a", "two")
    assert (tmp_path / "a" / DATA).read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_a_failure_inside_the_block_keeps_the_previous_artifact(tmp_path):
    _write(tmp_path / "a", "one")
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "a", FEATURE_CACHE, overwrite=True) as staging:
            (staging / DATA).write_text("half")
            raise RuntimeError("killed")
    assert (tmp_path / "a" / DATA).read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_a_swap_killed_between_its_renames_is_read_from_the_backup_and_recovered(tmp_path):
    _write(tmp_path / "a", "one")
    os.rename(tmp_path / "a", tmp_path / ".a.previous")  # the first rename happened, the second did not
    assert readable_path(tmp_path / "a") == tmp_path / ".a.previous"
    recover(tmp_path / "a")
    assert (tmp_path / "a" / DATA).read_text() == "one"


def test_a_folder_that_is_not_an_artifact_is_never_replaced(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("precious")
    with pytest.raises(DualEncoderError, match="not a feature cache: not replacing it"):
        _write(tmp_path / "mine", "x")
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "precious"
