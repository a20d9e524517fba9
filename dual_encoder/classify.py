"""Zero-shot classification: labels become prompts, prompts become class embeddings, images take the nearest.

A class embedding is the mean of the L2-normalised embeddings of its prompts (one per template), re-normalised
(CLIP's prompt ensembling). Works with any model of the package: a pretrained CLIP / SigLIP or a trained one.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from dual_encoder.errors import DualEncoderError

# The seven-template ensemble the CLIP authors picked for ImageNet (openai/CLIP, notebooks/Prompt_Engineering).
TEMPLATES = {
    "simple": ("a photo of a {}.",),
    "imagenet": (
        "itap of a {}.",
        "a bad photo of the {}.",
        "a origami {}.",
        "a photo of the large {}.",
        "a {} in a video game.",
        "art of the {}.",
        "a photo of the small {}.",
    ),
}


class ClassifyError(DualEncoderError, ValueError):
    """Bad labels, templates or ground truth."""


def read_labels(labels: Union[str, Path, Sequence[str]]) -> list[str]:
    """Labels from a list, a file (one a line) or a comma-separated string; blank entries dropped, no duplicates."""
    if isinstance(labels, (str, Path)):
        path = Path(labels)
        text = path.read_text(encoding="utf-8") if path.is_file() else str(labels)
        labels = text.splitlines() if path.is_file() else text.split(",")
    names = [str(label).strip() for label in labels if str(label).strip()]
    if len(names) < 2:
        raise ClassifyError(f"zero-shot classification needs at least two labels, got {names}")
    if len(set(names)) != len(names):
        raise ClassifyError(f"duplicate labels: {sorted({n for n in names if names.count(n) > 1})}")
    return names


def read_templates(templates: Union[str, Path, Sequence[str]] = "simple") -> tuple[str, ...]:
    """A named template set (`simple`, `imagenet`), a file with one template a line, or a list; each holds `{}`."""
    if isinstance(templates, str) and templates in TEMPLATES:
        return TEMPLATES[templates]
    if isinstance(templates, (str, Path)):
        path = Path(templates)
        if not path.is_file():
            raise ClassifyError(f"templates must be one of {sorted(TEMPLATES)} or a file, not '{templates}'")
        templates = path.read_text(encoding="utf-8").splitlines()
    chosen = tuple(t.strip() for t in templates if t.strip())
    bad = [t for t in chosen if t.count("{}") != 1]
    if not chosen or bad:
        raise ClassifyError(f"every template needs exactly one '{{}}' for the label: {bad or 'none given'}")
    return chosen


def class_embeddings(model, labels: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """[C, D]: per label, the mean of its prompts' L2-normalised text embeddings, re-normalised."""
    from dual_encoder.models.compiled import compiled

    prompts = [template.format(label) for label in labels for template in templates]
    text = np.asarray(compiled(model, "encode_text")(np.asarray(prompts, dtype=object)))
    text = text / np.linalg.norm(text, axis=-1, keepdims=True)
    means = text.reshape(len(labels), len(templates), -1).mean(axis=1)
    return means / np.linalg.norm(means, axis=-1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One image's top-k labels, best first, with cosine scores."""

    path: str
    labels: tuple[str, ...]
    scores: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"path": self.path, "labels": [{"label": l, "score": s} for l, s in zip(self.labels, self.scores)]}


class ZeroShotClassifier:
    """Classify images among `labels` with a dual encoder and prompt templates.

    Example:
        >>> classifier = ZeroShotClassifier(model, ["cat", "dog"], templates="imagenet")
        >>> classifier.classify_images(images, k=1)[0].labels
        ('dog',)
    """

    def __init__(self, model, labels, templates="simple"):
        self.model = model
        self.labels = read_labels(labels)
        self.templates = read_templates(templates)
        self.class_embeddings = class_embeddings(model, self.labels, self.templates)

    def scores(self, image_embeddings: np.ndarray) -> np.ndarray:
        """[N, D] L2-normalised image embeddings -> [N, C] cosine similarity to each class."""
        return np.asarray(image_embeddings, np.float32) @ self.class_embeddings.T

    def classify_embeddings(self, image_embeddings, paths: Sequence[str], k: int = 5) -> list[Prediction]:
        scores = self.scores(image_embeddings)
        k = min(k, len(self.labels))
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return [
            Prediction(path, tuple(self.labels[c] for c in row), tuple(float(scores[i, c]) for c in row))
            for i, (path, row) in enumerate(zip(paths, order))
        ]

    def classify_images(self, images, k: int = 5, paths: Optional[Sequence[str]] = None) -> list[Prediction]:
        """Raw 0-255 RGB images [N, S, S, 3] -> predictions."""
        embeddings = np.asarray(self.model.encode_image(images))
        return self.classify_embeddings(embeddings, paths or [str(i) for i in range(len(embeddings))], k)


# --- ground truth and scores --------------------------------------------------------------------------------


def read_truth(path: Union[str, Path]) -> dict[str, str]:
    """A CSV of `path,label` rows (a header row `path,label` is optional) -> {path: label}."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.reader(handle) if row]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    bad = [row for row in rows if len(row) < 2]
    if bad or not rows:
        raise ClassifyError(f"{path}: expected rows of path,label; got {bad[:1] or 'no rows'}")
    return {row[0].strip(): row[1].strip() for row in rows}


def _truth_of(path: str, truth: dict[str, str]) -> Optional[str]:
    """Ground truth by full path, else by the path's tail (a truth file may list paths relative to the folder)."""
    if path in truth:
        return truth[path]
    matches = [label for key, label in truth.items() if path.endswith("/" + key.lstrip("./"))]
    return matches[0] if len(matches) == 1 else None


def accuracy_report(predictions: Sequence[Prediction], truth: dict[str, str], labels: Sequence[str]) -> dict:
    """Top-1 / top-5 accuracy, per-class top-1 accuracy and the confusion matrix (rows: truth, cols: predicted)."""
    unknown = sorted({label for label in truth.values()} - set(labels))
    if unknown:
        raise ClassifyError(f"ground-truth labels not among the labels: {unknown}")
    index = {label: i for i, label in enumerate(labels)}
    confusion = np.zeros((len(labels), len(labels)), np.int64)
    top1 = top5 = counted = 0
    for prediction in predictions:
        label = _truth_of(prediction.path, truth)
        if label is None:
            continue
        counted += 1
        top1 += prediction.labels[0] == label
        top5 += label in prediction.labels[:5]
        confusion[index[label], index[prediction.labels[0]]] += 1
    if counted == 0:
        raise ClassifyError("no classified image has a ground-truth label (match paths as the images are listed)")
    per_class = {
        label: (float(confusion[i, i] / confusion[i].sum()) if confusion[i].sum() else None)
        for i, label in enumerate(labels)
    }
    return {
        "images": counted,
        "top1_accuracy": top1 / counted,
        "top5_accuracy": top5 / counted,
        "chance_top1": 1.0 / len(labels),
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion.tolist(),
        "labels": list(labels),
    }


def write_confusion_png(report: dict, path: Union[str, Path]) -> Path:
    """The confusion matrix as a PNG (rows: true label, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, matrix = report["labels"], np.asarray(report["confusion_matrix"])
    size = max(4.0, 0.45 * len(labels) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(labels)), labels, rotation=90)
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for (row, col), count in np.ndenumerate(matrix):
        if count:
            axes.text(col, row, str(count), ha="center", va="center", fontsize=8)
    axes.set_title(f"top-1 {report['top1_accuracy']:.3f} over {report['images']} images")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path


def embed_for_classification(model_dir=None, images=None, index=None, batch_size: int = 64, progress: bool = False):
    """(model, paths, L2-normalised image embeddings) of an image folder (embedded now) or an index (stored)."""
    from dual_encoder.index.embed import ImageFolder, embed_contents, open_gallery
    from dual_encoder.models import load_checked_model
    from dual_encoder.index.store import ImageIndex

    if (images is None) == (index is None):
        raise ClassifyError("give exactly one of --images FOLDER and --index INDEX")
    if index is not None:
        stored = ImageIndex.load(index)
        model, _ = load_checked_model(model_dir or stored.model.directory, expected=stored.model)
        return model, [item.path for item in stored.items], np.asarray(stored.embeddings, np.float32)
    if model_dir is None:
        raise ClassifyError("--images needs --model")
    model, _ = load_checked_model(model_dir)
    gallery = open_gallery(ImageFolder(Path(images)), progress=progress)
    vectors, _ = embed_contents(model, gallery, range(len(gallery.records)), batch_size, progress=progress)
    kept = [record for record in gallery.records if record.sha256 in vectors]
    if not kept:
        raise ClassifyError(f"no readable images in {images}")
    return model, [record.path for record in kept], np.stack([vectors[record.sha256] for record in kept])
