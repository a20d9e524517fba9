"""Zero-shot classification: prompt ensembling, top-k, accuracy and the confusion matrix, on hand-made vectors
and a fake model whose text embeddings are known."""

from __future__ import annotations

import numpy as np
import pytest

from dual_encoder.classify import (
    ClassifyError, Prediction, ZeroShotClassifier, accuracy_report, class_embeddings, read_labels, read_templates,
    write_confusion_png,
)  # fmt: skip


class FakeModel:
    """encode_text: a fixed vector per prompt (unnormalised, to check the per-prompt normalisation)."""

    image_size = 8
    VECTORS = {
        "a photo of a cat.": [3.0, 0.0, 0.0], "a drawing of a cat": [0.0, 1.0, 0.0],
        "a photo of a dog.": [0.0, 0.0, 2.0], "a drawing of a dog": [0.0, 0.0, 1.0],
    }  # fmt: skip

    def encode_text(self, texts):
        return np.asarray([self.VECTORS[t.decode() if isinstance(t, bytes) else t] for t in np.asarray(texts)], np.float32)


@pytest.fixture(autouse=True)
def _plain_encode(monkeypatch):
    import dual_encoder.models.compiled as compiled_module

    monkeypatch.setattr(compiled_module, "compiled", lambda model, name: lambda x: getattr(model, name)(x))


def test_class_embedding_is_the_renormalised_mean_of_normalised_prompts():
    embeddings = class_embeddings(FakeModel(), ["cat", "dog"], ["a photo of a {}.", "a drawing of a {}"])
    # cat: mean of (1,0,0) and (0,1,0) -> (0.5, 0.5, 0) -> normalised; the 3.0 must not outweigh the 1.0.
    np.testing.assert_allclose(embeddings[0], [2 ** -0.5, 2 ** -0.5, 0.0], atol=1e-6)
    np.testing.assert_allclose(embeddings[1], [0.0, 0.0, 1.0], atol=1e-6)


def test_top_k_and_accuracy():
    classifier = ZeroShotClassifier(FakeModel(), "cat,dog", ["a photo of a {}.", "a drawing of a {}"])
    images = np.asarray([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.6, 0.8]], np.float32)
    predictions = classifier.classify_embeddings(images, ["x/a.png", "x/b.png", "x/c.png"], k=2)
    assert [p.labels for p in predictions] == [("cat", "dog"), ("dog", "cat"), ("dog", "cat")]
    np.testing.assert_allclose(predictions[2].scores, [0.8, 0.6 * 2 ** -0.5], atol=1e-6)
    report = accuracy_report(predictions, {"a.png": "cat", "b.png": "dog", "c.png": "cat"}, classifier.labels)
    assert report["top1_accuracy"] == pytest.approx(2 / 3) and report["top5_accuracy"] == 1.0
    assert report["per_class_accuracy"] == {"cat": 0.5, "dog": 1.0}
    assert report["confusion_matrix"] == [[1, 1], [0, 1]]
    with pytest.raises(ClassifyError, match="not among the labels"):
        accuracy_report(predictions, {"a.png": "horse"}, classifier.labels)


def test_confusion_png(tmp_path):
    report = accuracy_report([Prediction("a", ("cat",), (0.9,))], {"a": "cat"}, ["cat", "dog"])
    path = write_confusion_png(report, tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_labels_and_templates(tmp_path):
    assert read_labels(" cat, dog ,,") == ["cat", "dog"]
    (tmp_path / "labels.txt").write_text("red star\nblue circle\n")
    assert read_labels(tmp_path / "labels.txt") == ["red star", "blue circle"]
    with pytest.raises(ClassifyError, match="at least two"):
        read_labels("cat")
    with pytest.raises(ClassifyError, match="duplicate"):
        read_labels("cat,cat")
    assert len(read_templates("imagenet")) == 7 and read_templates("simple") == ("a photo of a {}.",)
    with pytest.raises(ClassifyError, match="exactly one"):
        read_templates(["no slot"])
    with pytest.raises(ClassifyError, match="one of"):
        read_templates("nonexistent")
