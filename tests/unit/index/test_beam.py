"""Gallery embedding on Apache Beam: the DirectRunner with 2 worker processes gives the local path's index; bad files
are counted by reason as locally; a retried shard write leaves no duplicate rows; options are checked."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from dual_encoder import files
from dual_encoder.cli import main
from dual_encoder.errors import DualEncoderError
from dual_encoder.index import ImageIndex, build_index
from dual_encoder.index import beam as beam_index
from dual_encoder.index.store import MANIFEST
from tests.unit.index.helpers import save_tiny_model, write_image, write_images, write_phone_photo


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "model", seed=0)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gallery") / "photos"
    write_images(folder, 24)
    write_image(folder / "nested" / "deep.jpg", seed=50)
    write_phone_photo(folder / "phone.jpg", orientation=6)  # EXIF-rotated: read upright on the workers too
    (folder / "copy.png").write_bytes((folder / "000.png").read_bytes())  # equal content, another path
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(folder / "huge.png")  # 90,000 pixels > the limit below
    return folder


@pytest.mark.slow
def test_beam_direct_runner_with_two_workers_builds_the_local_index(tmp_path, model_dir, photos, capsys):
    common = ["--model", str(model_dir), "--images", str(photos), "--set", "max_image_pixels=50000",
              "--set", "embed_batch_size=4"]  # fmt: skip
    beam_output = tmp_path / "beam.ix"
    code = main(["index", "build", *common, "--output", str(beam_output), "--runner", "direct",
                 "--pipeline-option", "direct_num_workers=2", "--pipeline-option", "direct_running_mode=multi_processing"])  # fmt: skip
    assert code == 0
    beam_report = capsys.readouterr().out
    local = build_index(model_dir, photos, tmp_path / "local.ix", progress=False, max_image_pixels=50_000)
    on_beam, by_hand = ImageIndex.load(beam_output), ImageIndex.load(tmp_path / "local.ix")

    assert len(on_beam) == len(by_hand) == local.count == 27
    assert [item.path for item in on_beam.items] == [item.path for item in by_hand.items]  # the local row order
    assert [item.sha256 for item in on_beam.items] == [item.sha256 for item in by_hand.items]
    np.testing.assert_allclose(on_beam.embeddings, by_hand.embeddings, atol=1e-5)
    assert len({item.path for item in on_beam.items}) == len(on_beam)  # no duplicate rows
    manifest = json.loads((beam_output / MANIFEST).read_text())
    assert manifest["model"]["fingerprint"] == json.loads((tmp_path / "local.ix" / MANIFEST).read_text())["model"]["fingerprint"]
    assert not [p for p in tmp_path.iterdir() if ".shards-" in p.name]  # the shards are cleaned up
    # Bad files are counted by reason as locally.
    assert local.skipped_counts == {"not an image file (extension)": 1, files.Refused.CORRUPT: 1, files.Refused.TOO_LARGE: 1}
    assert "27 embedded" in beam_report and "3 skipped (1 not an image file (extension), 1 corrupt, 1 too large)" in beam_report


def test_a_retried_shard_write_leaves_one_copy_of_each_row(tmp_path):
    rows = [("image", ({"position": p, "path": f"/g/{p}.png", "sha256": f"{p:064x}", "size": 1, "mtime": 0.0},
                       np.full(4, p, np.float32))) for p in (3, 1, 2)]  # fmt: skip
    rows.append(("skipped", (0, "/g/0.png", files.Refused.CORRUPT, "")))
    (tmp_path / "shard-00000.npz.0123.tmp").write_bytes(b"a killed attempt's partial write")
    first = beam_index.write_shard((0, rows), str(tmp_path))
    second = beam_index.write_shard((0, list(reversed(rows))), str(tmp_path))  # the retry, rows in another order
    assert first == second and (tmp_path / "shard-00000.npz").read_bytes()
    # A stale copy of a row in another shard file (e.g. a rerun with another shard count) still counts once.
    beam_index.write_shard((7, rows[:1]), str(tmp_path))
    merged = beam_index.merge_shards(str(tmp_path))
    assert [r.path for r in merged.records] == ["/g/1.png", "/g/2.png", "/g/3.png"]
    np.testing.assert_array_equal(merged.embeddings[:, 0], [1, 2, 3])
    assert [(s.path, s.reason) for s in merged.skipped] == [("/g/0.png", files.Refused.CORRUPT)]


def test_shards_are_fixed_by_listing_position():
    assert [beam_index.shard_of(p, 5) for p in range(50)] == [beam_index.shard_of(p, 5) for p in range(50)]
    assert set(beam_index.shard_of(p, 5) for p in range(50)) == set(range(5))


def test_read_and_decode_gives_the_local_pixels_and_skip_reasons(tmp_path):
    from dual_encoder.data.pipeline import decode_and_resize

    photo = write_phone_photo(tmp_path / "phone.jpg")
    kind, (record, pixels) = beam_index.read_and_decode(beam_index.GalleryFile(4, str(photo)), 16, 10_000)
    assert kind == "image" and record["position"] == 4 and record["size"] == os.path.getsize(photo)
    upright = decode_and_resize(open(tmp_path / "phone.jpg", "rb").read(), 16).numpy()  # as stored: landscape
    assert pixels.shape == (16, 16, 3) and not np.array_equal(pixels, upright)
    assert pixels[2, 8, 0] > 200 and pixels[13, 8, 2] > 200  # red on top, blue below: EXIF applied
    (tmp_path / "bad.png").write_bytes(b"\x89PNG nope")
    assert beam_index.read_and_decode(beam_index.GalleryFile(5, str(tmp_path / "bad.png")), 16, 10_000)[1][2] in (
        files.Refused.CORRUPT, files.Refused.NOT_IMAGE)  # fmt: skip
    assert beam_index.read_and_decode(beam_index.GalleryFile(6, str(tmp_path / "gone.png")), 16, 10_000)[1][2] == files.Refused.MISSING


def test_pipeline_options_and_cli_misuse_are_one_line_errors(tmp_path, model_dir, photos, capsys):
    options = beam_index.pipeline_options("direct", ["direct_num_workers=3"]).get_all_options()
    assert options["direct_num_workers"] == 3 and options["direct_running_mode"] == "multi_processing"
    assert options["runner"] == "DirectRunner"
    dataflow = beam_index.pipeline_options("dataflow", ["project=p", "region=europe-west1"]).get_all_options()
    assert (dataflow["runner"], dataflow["project"], dataflow["region"]) == ("DataflowRunner", "p", "europe-west1")
    with pytest.raises(DualEncoderError, match="'nonsense' is not of the form KEY=VALUE"):
        beam_index.pipeline_options("direct", ["nonsense"])
    with pytest.raises(DualEncoderError, match="unknown runner 'local'"):
        beam_index.pipeline_options("local")
    output = ["--model", str(model_dir), "--output", str(tmp_path / "ix")]
    assert main(["index", "build", *output, "--images", str(photos), "--pipeline-option", "a=b"]) == 2
    assert "go with --runner" in capsys.readouterr().err
    assert main(["index", "build", *output, "--data", str(tmp_path), "--runner", "direct"]) == 2
    assert "--runner embeds an image folder" in capsys.readouterr().err
    assert not (tmp_path / "ix").exists()


def test_cli_runner_choices_mirror_the_library():
    from dual_encoder import cli

    assert {runner.value for runner in cli.Runner} == set(beam_index.RUNNERS)


# -- the second source: a prepared split's feature cache ----------------------------------------------------------

DIRECT_TWO_WORKERS = ("direct_num_workers=2", "direct_running_mode=multi_processing")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from dual_encoder.config import DataConfig
    from dual_encoder.data.prepare import prepare_dataset
    from dual_encoder.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("shapes")
    captions = generate_synthetic(root / "shapes", 40, seed=0, image_size=32)
    config = DataConfig(validation_fraction=0.25, shard_size=7)  # several TFRecord shards
    prepare_dataset("csv", captions, captions.parent / "images", root / "prepared", config, progress=False)
    return root / "prepared"


@pytest.mark.slow
def test_beam_feature_cache_on_two_workers_equals_the_local_one_and_training_uses_it(prepared, tmp_path, monkeypatch):
    from dual_encoder import features as feature_cache
    from dual_encoder.models import load_model
    from tests.tiny import tiny_config

    config = tiny_config(epochs=1, tensorboard=False).with_overrides(["image.trainable=false", "text.trainable=false"])
    config.save(tmp_path / "frozen.json")

    def must_not_run(*args, **kwargs):
        raise AssertionError("the feature cache was computed in this process")

    monkeypatch.setattr(feature_cache, "compute_features", must_not_run)
    command = ["train", "--data", str(prepared), "--output", str(tmp_path / "run"), "--preset", str(tmp_path / "frozen.json"),
               "--quiet", "--runner", "direct", *[arg for option in DIRECT_TWO_WORKERS for arg in ("--pipeline-option", option)]]  # fmt: skip
    assert main(command) == 0
    monkeypatch.undo()
    # One cache per split and tower, named and keyed as the local path names them.
    model = load_model(tmp_path / "run")
    cached = sorted(path.parent for path in (prepared / "features").glob("*/features.npz"))
    expected = [feature_cache.cache_dir(model, prepared, split, tower)
                for split in ("train", "validation") for tower in feature_cache.TOWERS]  # fmt: skip
    assert cached == expected
    assert not [path for path in (prepared / "features").iterdir() if "beam" in path.name]  # staging removed
    # The run's model holds the same frozen backbones: the local path on it gives the Beam-built caches.
    for split in ("train", "validation"):
        local = feature_cache.compute_features(model, prepared, split, progress=False)
        on_beam = feature_cache.load_or_compute_features(model, prepared, split, compute=must_not_run)  # a cache hit
        np.testing.assert_allclose(on_beam.image_features, local.image_features, atol=1e-5)
        np.testing.assert_allclose(on_beam.text_features, local.text_features, atol=1e-5)
        np.testing.assert_array_equal(on_beam.num_captions, local.num_captions)


@pytest.mark.slow
def test_beam_computes_only_the_locked_tower_of_a_lit_run(prepared, tmp_path):
    """LiT (text locked, image trained): the workers run the text tower only, into the text tower's local cache."""
    import shutil

    import keras

    from dual_encoder import features as feature_cache
    from dual_encoder.models import build_dual_encoder
    from tests.tiny import CAPTIONS, TINY_MODEL

    prepared = shutil.copytree(prepared, tmp_path / "prepared", ignore=shutil.ignore_patterns("features"))
    keras.utils.set_random_seed(5)
    model = build_dual_encoder(TINY_MODEL.replace({"text.trainable": False}), captions=CAPTIONS)
    compute = beam_index.BeamFeatures("direct", DIRECT_TWO_WORKERS, staging_dir=str(tmp_path / "staging"))
    on_beam = feature_cache.load_or_compute_features(model, prepared, "validation", towers=("text",), compute=compute)
    assert on_beam.image_features is None
    assert (feature_cache.cache_dir(model, prepared, "validation", "text") / "features.npz").is_file()
    assert [path.parent.name for path in (prepared / "features").glob("*/features.npz")] == [
        feature_cache.cache_dir(model, prepared, "validation", "text").name
    ]
    local = feature_cache.compute_features(model, prepared, "validation", ("text",), progress=False)
    np.testing.assert_allclose(on_beam.text_features, local.text_features, atol=1e-5)


def test_feature_shards_merge_in_order_once_each_and_refuse_gaps(tmp_path):
    rows = [("image", ({"position": p}, np.full(3, p, np.float32))) for p in (2, 0, 1)]
    rows += [("text", ({"position": p}, np.full(4, 10 + p, np.float32))) for p in (4, 3, 1, 0, 2)]
    beam_index.write_shard((0, rows[:5]), str(tmp_path))
    beam_index.write_shard((1, rows[5:]), str(tmp_path))
    beam_index.write_shard((1, list(reversed(rows[5:]))), str(tmp_path))  # a retried bundle
    beam_index.write_shard((2, rows[:1]), str(tmp_path))  # a stale copy of a row
    images, texts, skipped = beam_index.merge_feature_shards(str(tmp_path), 3, 5)
    np.testing.assert_array_equal(images[:, 0], [0, 1, 2])
    np.testing.assert_array_equal(texts[:, 0], [10, 11, 12, 13, 14])
    assert skipped == []
    with pytest.raises(DualEncoderError, match="hold .* rows, not"):
        beam_index.merge_feature_shards(str(tmp_path), 4, 5)


def test_read_record_and_decode_gives_the_pixels_make_image_dataset_gives(prepared):
    from dual_encoder.data.pipeline import make_image_dataset, read_split

    info = read_split(prepared, "train")
    local = np.concatenate([batch["images"].numpy() for batch in make_image_dataset(prepared, "train", image_size=16, batch_size=8)])
    for position in (0, 8, info.num_images - 1):
        shard, offset, length = info.locations[position].tolist()
        item = beam_index.DatasetRecord(position, str(info.shards[shard]), offset, length)
        kind, (record, pixels) = beam_index.read_record_and_decode(item, 16)
        assert kind == "image" and record == {"position": position}
        np.testing.assert_array_equal(pixels, local[position])
    kind, row = beam_index.read_record_and_decode(beam_index.DatasetRecord(3, str(info.shards[0]), 10**9, 10), 16)
    assert kind == "skipped" and row[0] == 3 and row[2] == files.Refused.CORRUPT


def test_train_runner_misuse_is_a_one_line_error(prepared, tmp_path, capsys):
    from tests.tiny import tiny_config

    tiny_config(epochs=1, tensorboard=False).save(tmp_path / "trainable.json")
    common = ["train", "--data", str(prepared), "--output", str(tmp_path / "run"), "--quiet"]
    assert main([*common, "--pipeline-option", "a=b"]) == 2
    assert "go with --runner" in capsys.readouterr().err
    assert main([*common, "--runner", "direct", "--pipeline-option", "nonsense"]) == 2
    assert "not of the form KEY=VALUE" in capsys.readouterr().err
    assert main([*common, "--preset", str(tmp_path / "trainable.json"), "--runner", "direct"]) == 2
    assert "trains without a feature cache" in capsys.readouterr().err
