"""Exported SavedModels load without this package and agree with the Python API."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from dual_encoder.cli import main
from dual_encoder.export import export_saved_models
from dual_encoder.search import Searcher
from tests.tiny import build_tiny_index

QUERIES = ["find images of a small red circle on the left", "Show me pictures of a big blue square", "a green star"]

# Runs in a fresh interpreter that imports only TensorFlow and TF Text: not this package.
STANDALONE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    import tensorflow_text  # noqa: F401
    export, queries, images = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    text = tf.saved_model.load(export + "/text_encoder").signatures["serving_default"]
    image = tf.saved_model.load(export + "/image_encoder").signatures["serving_default"]
    searcher = tf.saved_model.load(export + "/searcher").signatures["serving_default"]
    found = searcher(queries=tf.constant(queries), k=tf.constant(5))
    by_image = tf.saved_model.load(export + "/searcher").signatures["search_by_image"](
        image_bytes=tf.constant([open(p, "rb").read() for p in images]), k=tf.constant(5))
    print(json.dumps({
        "modules": sorted(m for m in sys.modules if m.split(".")[0] == "dual_encoder"),
        "text": text(texts=tf.constant(queries))["embeddings"].numpy().tolist(),
        "image": image(image_bytes=tf.constant([open(p, "rb").read() for p in images]))["embeddings"].numpy().tolist(),
        "ids": found["ids"].numpy().tolist(),
        "scores": found["scores"].numpy().tolist(),
        "paths": [[p.decode() for p in row] for row in found["paths"].numpy()],
        "normalized": [q.decode() for q in found["normalized_queries"].numpy()],
        "by_image": {
            "ids": by_image["ids"].numpy().tolist(),
            "scores": by_image["scores"].numpy().tolist(),
            "paths": [[p.decode() for p in row] for row in by_image["paths"].numpy()],
        },
    }))
    """
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    index_dir = build_tiny_index(root)
    summary = export_saved_models(index_dir, root / "exported")
    return summary, Searcher.load(index_dir), root


@pytest.mark.slow
def test_saved_models_load_without_the_package_and_match_the_python_api(exported):
    summary, searcher, root = exported
    images = sorted(str(p) for p in (root / "synthetic" / "images").glob("*.png"))[:4]
    run = subprocess.run(
        [sys.executable, "-c", STANDALONE, str(summary.output), json.dumps(QUERIES), json.dumps(images)],
        capture_output=True, text=True, timeout=300, cwd=root,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["modules"] == []

    results = searcher.search(QUERIES, k=5)
    assert got["normalized"] == [r.normalized_query for r in results]
    np.testing.assert_allclose(got["text"], searcher.encode_queries(QUERIES), atol=1e-5)
    for result, ids, scores, paths in zip(results, got["ids"], got["scores"], got["paths"]):
        assert ids == [hit.id for hit in result.hits]
        assert paths == [hit.path for hit in result.hits]
        np.testing.assert_allclose(scores, [hit.score for hit in result.hits], atol=1e-5)

    # search_by_image: the Python API's search by image, in a process without this package.
    assert any(path in searcher.index.items.paths for path in images)
    for path, ids, scores, paths in zip(images, *(got["by_image"][key] for key in ("ids", "scores", "paths"))):
        result = searcher.search(image=path, k=5)
        assert ids == [hit.id for hit in result.hits] and paths == [hit.path for hit in result.hits]
        assert (paths[0] == path) == (path in searcher.index.items.paths)  # an indexed image finds itself first
        np.testing.assert_allclose(scores, [hit.score for hit in result.hits], atol=1e-5)

    from dual_encoder.data.pipeline import decode_and_resize

    size = searcher.model.image_size
    pixels = np.stack([decode_and_resize(tf.io.read_file(p), size).numpy() for p in images])
    np.testing.assert_allclose(got["image"], searcher.model.encode_image(pixels), atol=1e-5)


def test_token_id_signatures_match_the_string_signatures(exported):
    summary, searcher, _ = exported
    text = tf.saved_model.load(str(summary.artifacts["text_encoder"]))
    tokens = text.signatures["tokenize"](texts=tf.constant(QUERIES[2:]))
    by_ids = text.signatures["encode_token_ids"](**tokens)["embeddings"]
    by_text = text.signatures["serving_default"](texts=tf.constant(QUERIES[2:]))["embeddings"]
    np.testing.assert_allclose(by_ids, by_text, atol=1e-6)
    found = tf.saved_model.load(str(summary.artifacts["searcher"])).signatures["search_token_ids"](**tokens, k=tf.constant(3))
    assert found["ids"].numpy().tolist() == [[hit.id for hit in searcher.search(QUERIES[2], k=3).hits]]


def test_k_is_clamped_to_the_gallery_and_bad_queries_fail_in_the_graph(exported):
    summary, searcher, _ = exported
    search = tf.saved_model.load(str(summary.artifacts["searcher"])).signatures["serving_default"]
    found = search(queries=tf.constant(["a red circle"]), k=tf.constant(10_000))
    assert found["ids"].shape == (1, len(searcher.index))
    with pytest.raises(tf.errors.InvalidArgumentError, match="request phrase"):
        search(queries=tf.constant(["find images of"]), k=tf.constant(3))
    with pytest.raises(tf.errors.InvalidArgumentError, match="k must be a positive integer"):
        search(queries=tf.constant(["a red circle"]), k=tf.constant(0))


@pytest.mark.slow
def test_saved_model_cli_shows_and_runs_the_searcher(exported):
    summary, _, root = exported
    cli = Path(sys.executable).with_name("saved_model_cli")
    show = subprocess.run([str(cli), "show", "--dir", str(summary.artifacts["searcher"]), "--all"], capture_output=True, text=True, timeout=300)
    assert show.returncode == 0, show.stderr[-2000:]
    assert "serving_default" in show.stdout and "search_token_ids" in show.stdout
    run = subprocess.run(
        [str(cli), "run", "--dir", str(summary.artifacts["searcher"]), "--tag_set", "serve", "--signature_def", "serving_default",
         "--input_exprs", "queries=['a red circle'];k=2"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "ids" in run.stdout and "scores" in run.stdout


def test_export_cli_writes_all_three_artifacts(exported, tmp_path, capsys):
    _, searcher, root = exported
    assert main(["export", "--index", str(root / "index"), "--output", str(tmp_path / "out")]) == 0
    for name in ("text_encoder", "image_encoder", "searcher"):
        assert (tmp_path / "out" / name / "saved_model.pb").is_file()
    info = json.loads((tmp_path / "out" / "export.json").read_text())
    assert info["needs_tensorflow_text"] is False
    assert info["model"]["count"] == len(searcher.index)


def test_exported_image_encoder_turns_exif_rotated_jpegs_upright(exported, tmp_path):
    from PIL import Image

    summary, searcher, _ = exported
    encode = tf.saved_model.load(str(summary.artifacts["image_encoder"])).signatures["serving_default"]
    blocks = np.random.default_rng(5).integers(0, 256, (6, 12, 3), dtype=np.uint8)
    stored = np.repeat(np.repeat(blocks, 8, axis=0), 8, axis=1)  # 96 wide x 48 high
    turn = {1: None, 3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_270, 8: Image.Transpose.ROTATE_90}
    embeddings = {}
    for orientation, transpose in turn.items():
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(stored).save(tmp_path / "photo.jpg", exif=exif, quality=95)
        # The graph's own JPEG decoding, turned upright outside it, as a lossless PNG.
        decoded = Image.fromarray(tf.io.decode_jpeg((tmp_path / "photo.jpg").read_bytes()).numpy())
        (decoded.transpose(transpose) if transpose else decoded).save(tmp_path / "upright.png")
        batch = [(tmp_path / name).read_bytes() for name in ("photo.jpg", "upright.png")]
        photo, upright = encode(image_bytes=tf.constant(batch))["embeddings"].numpy()
        np.testing.assert_allclose(photo, upright, atol=1e-4)
        embeddings[orientation] = photo
    for orientation in (3, 6, 8):
        assert np.abs(embeddings[orientation] - embeddings[1]).max() > 1e-2


def test_search_by_image_turns_phone_photos_upright_and_refuses_what_it_cannot_read(exported, tmp_path):
    from tests.unit.index.helpers import write_phone_photo

    summary, searcher, _ = exported
    search = tf.saved_model.load(str(summary.artifacts["searcher"])).signatures["search_by_image"]
    assert "search_by_image" in summary.signatures["searcher"]
    phone = write_phone_photo(tmp_path / "phone.jpg", 6).read_bytes()
    # The graph's own JPEG decoding, turned upright outside it, as a lossless PNG.
    import io

    from PIL import Image

    decoded = Image.fromarray(tf.io.decode_jpeg(phone).numpy()).transpose(Image.Transpose.ROTATE_270)
    buffer = io.BytesIO()
    decoded.save(buffer, format="PNG")
    found = search(image_bytes=tf.constant([phone, buffer.getvalue()]), k=tf.constant(4))
    assert found["ids"].numpy()[0].tolist() == found["ids"].numpy()[1].tolist()
    np.testing.assert_allclose(found["scores"].numpy()[0], found["scores"].numpy()[1], atol=1e-4)
    empty = search(image_bytes=tf.constant([], tf.string), k=tf.constant(3))
    assert empty["ids"].shape == (0, 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="not a JPEG, PNG, GIF or BMP image"):
        search(image_bytes=tf.constant([b"%PDF-1.4 not an image"]), k=tf.constant(3))
