"""The demo, end to end at its reduced size (the full size checks the quality targets itself)."""

import json

import pytest
from PIL import Image

from dual_encoder.cli import main
from dual_encoder.demo import SCALES, TARGETS


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_writes_a_summary(tmp_path, capsys):
    assert main(["demo", "--quick", "--quiet", "--output", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for stage in range(1, 8):
        assert f"[{stage}/7]" in printed
    assert "Demo summary" in printed

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["targets_met"] is None  # the quick size checks no quality target
    assert 0.0 <= summary["metrics"]["t2i_recall@1"] <= summary["metrics"]["t2i_recall@10"] <= 1.0
    assert [q["normalized_query"] for q in summary["queries"]][:2] == [q["query"].split(" of ", 1)[1] for q in summary["queries"][:2]]
    assert all(len(q["hits"]) == 5 for q in summary["queries"])
    for name in ("text_encoder", "image_encoder", "searcher"):
        assert (tmp_path / "exported" / name / "saved_model.pb").is_file()
    assert Image.open(tmp_path / "results.png").size[0] > 100
    assert (tmp_path / "run" / "model" / "fingerprint.json").is_file()


def test_the_full_demo_checks_the_issue_targets():
    full = SCALES["full"]
    assert full.check_targets and full.validation_images == 1000
    assert TARGETS == {"t2i_recall@1": 0.90, "t2i_recall@10": 0.99}
