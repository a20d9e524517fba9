"""Photos decoded as people see them (`dual_encoder.images`): EXIF orientation, formats, the pixel limit."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from dual_encoder import files, images
from tests.unit.index.helpers import write_phone_photo

LIMIT = 1_000_000


def _red_on_top(image: Image.Image) -> bool:
    pixels = np.asarray(image, dtype=np.int64)
    top, bottom = pixels[: pixels.shape[0] // 4].mean((0, 1)), pixels[-pixels.shape[0] // 4 :].mean((0, 1))
    return top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]


def test_decode_applies_the_exif_orientation(tmp_path):
    image = images.decode(write_phone_photo(tmp_path / "phone.jpg", 6).read_bytes(), LIMIT)
    assert (image.mode, image.size) == ("RGB", (24, 48)) and _red_on_top(image)
    as_stored = images.decode(write_phone_photo(tmp_path / "plain.jpg", 1).read_bytes(), LIMIT)
    assert as_stored.size == (48, 24)


def test_tf_readable_keeps_upright_jpegs_and_converts_rotated_ones_for_tensorflow(tmp_path):
    plain = write_phone_photo(tmp_path / "plain.jpg", 1).read_bytes()
    assert images.tf_readable(plain, LIMIT) == (plain, "jpeg")

    rotated = write_phone_photo(tmp_path / "phone.jpg", 6).read_bytes()
    data, format = images.tf_readable(rotated, LIMIT, compress_level=1)
    assert format == "png"
    decoded = tf.io.decode_image(data, channels=3).numpy()  # TensorFlow ignores EXIF: these pixels are upright
    np.testing.assert_array_equal(decoded, np.asarray(images.decode(rotated, LIMIT)))


@pytest.mark.parametrize("format, options", [("WEBP", {"lossless": True}), ("TIFF", {})])
def test_webp_and_tiff_are_read(format, options):
    pixels = np.random.default_rng(0).integers(0, 256, (10, 14, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=format, **options)
    data, stored = images.tf_readable(buffer.getvalue(), LIMIT)
    assert stored == "png"
    np.testing.assert_array_equal(tf.io.decode_image(data, channels=3).numpy(), pixels)


def test_heic_is_read_with_pillow_heif():
    import pillow_heif  # noqa: F401  the optional `heic` extra, which `make test` installs

    assert files.HEIF_SUPPORTED
    buffer = io.BytesIO()
    Image.new("RGB", (20, 10), (200, 30, 30)).save(buffer, format="HEIF")
    image = images.decode(buffer.getvalue(), LIMIT)
    assert image.size == (20, 10) and np.abs(np.asarray(image, np.int64) - (200, 30, 30)).max() < 10


def test_images_over_the_pixel_limit_and_broken_files_are_refused_with_their_reason(tmp_path):
    photo = write_phone_photo(tmp_path / "phone.jpg").read_bytes()
    with pytest.raises(files.FileRefusedError, match=r"48x24 pixels > 1000") as refused:
        images.tf_readable(photo, 1000)
    assert refused.value.reason == files.Refused.TOO_LARGE
    with pytest.raises(files.FileRefusedError) as refused:
        images.decode(photo[:300], LIMIT)
    assert refused.value.reason == files.Refused.CORRUPT
    with pytest.raises(files.FileRefusedError) as refused:
        images.decode(b"just some text", LIMIT)
    assert refused.value.reason == files.Refused.NOT_IMAGE


# -- the exported image encoder's in-graph twin (JPEG EXIF orientation read and applied by TensorFlow ops) ---------


@pytest.mark.parametrize("orientation", range(0, 9))
def test_the_graph_reads_and_applies_exif_orientation_as_pillow_does(orientation):
    from PIL import ImageOps

    from dual_encoder.export import apply_orientation, exif_orientation

    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
        buffer, format="JPEG", exif=exif
    )
    read = tf.function(exif_orientation, input_signature=[tf.TensorSpec([], tf.string)])
    found = read(buffer.getvalue())
    assert int(found) == (orientation or 1)
    with Image.open(io.BytesIO(buffer.getvalue())) as photo:
        stored, upright = np.asarray(photo.convert("RGB")), np.asarray(ImageOps.exif_transpose(photo).convert("RGB"))
    np.testing.assert_array_equal(apply_orientation(tf.constant(stored), found).numpy(), upright)


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"", 1),
        (b"\xff\xd8", 1),
        (b"not an image at all", 1),
        (b"\xff\xd8\xff\xe1\xff\xffExif\x00\x00II*\x00\xff\xff\xff\x7f", 1),  # IFD offset far past the end
        # Big-endian ("MM") TIFF header with one IFD entry: orientation 6.
        (b"\xff\xd8\xff\xe1\x00\x22Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00", 6),
    ],
)
def test_the_graph_reads_odd_and_hostile_headers_without_failing(data, expected):
    from dual_encoder.export import exif_orientation

    read = tf.function(exif_orientation, input_signature=[tf.TensorSpec([], tf.string)])
    assert int(read(data)) == expected
