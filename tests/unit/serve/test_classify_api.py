"""POST /api/classify: an indexed id or an uploaded image, plus labels -> top-k labels with scores; 4xx on bad input."""

import base64
import io

import numpy as np
from PIL import Image

from dual_encoder.classify import ZeroShotClassifier
from dual_encoder.data.pipeline import decode_and_resize

LABELS = ["red circle", "blue square", "green star"]


def test_classify_an_indexed_item(client, searcher):
    item = searcher.index.items[3]
    reply = client.post("/api/classify", json={"labels": LABELS, "id": item.id, "k": 2})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    expected = ZeroShotClassifier(searcher.model, LABELS).classify_embeddings(searcher.index.embeddings[3][None], ["x"], k=2)[0]
    assert [entry["label"] for entry in body["labels"]] == list(expected.labels)
    np.testing.assert_allclose([entry["score"] for entry in body["labels"]], expected.scores, atol=1e-5)


def test_classify_an_upload_equals_the_indexed_copy(client, searcher):
    item = searcher.index.items[5]
    data = open(item.path, "rb").read()
    reply = client.post("/api/classify", json={"labels": ",".join(LABELS), "image_base64": base64.b64encode(data).decode(),
                                               "templates": "imagenet", "k": 3})  # fmt: skip
    assert reply.status_code == 200, reply.text
    image = decode_and_resize(data, searcher.model.image_size)
    embedding = np.asarray(searcher.model.encode_image(np.asarray(image)[None]))
    expected = ZeroShotClassifier(searcher.model, LABELS, "imagenet").classify_embeddings(embedding, ["x"], k=3)[0]
    assert [entry["label"] for entry in reply.json()["labels"]] == list(expected.labels)
    np.testing.assert_allclose([e["score"] for e in reply.json()["labels"]], expected.scores, atol=1e-4)


def test_bad_requests_get_a_message(client):
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    good = base64.b64encode(png.getvalue()).decode()
    cases = [
        ({"labels": LABELS}, "exactly one"),
        ({"labels": LABELS, "id": 0, "image_base64": good}, "exactly one"),
        ({"labels": ["cat"], "image_base64": good}, "at least two"),
        ({"labels": LABELS, "image_base64": "not base64!"}, "base64"),
        ({"labels": LABELS, "image_base64": base64.b64encode(b"plain text").decode()}, ""),
        ({"labels": LABELS, "id": 10 ** 9}, "no item"),
        ({"labels": LABELS, "id": 0, "templates": "fancy"}, "templates"),
    ]
    for body, message in cases:
        reply = client.post("/api/classify", json=body)
        assert 400 <= reply.status_code < 500, (body, reply.status_code, reply.text)
        assert message in reply.json()["detail"], (body, reply.json())
