"""Media types from file contents, thumbnails, and the byte-bounded LRU cache."""

import io

import pytest
from PIL import Image

from dual_encoder.serve.images import ByteLRUCache, UnreadableImageError, make_thumbnail, media_type


def test_media_type_comes_from_the_bytes_not_the_name(tmp_path):
    disguised = tmp_path / "actually_a_jpeg.png"
    Image.new("RGB", (8, 8), "red").save(disguised, format="JPEG")
    assert media_type(str(disguised)) == "image/jpeg"
    gif = tmp_path / "noext"
    Image.new("P", (8, 8)).save(gif, format="GIF")
    assert media_type(str(gif)) == "image/gif"


def test_unreadable_and_missing_files_raise_one_clear_error(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(UnreadableImageError, match="cannot be read"):
        media_type(str(broken))
    with pytest.raises(UnreadableImageError, match="missing"):
        make_thumbnail(str(tmp_path / "gone.png"), 64)


def test_thumbnail_keeps_aspect_ratio_and_flattens_transparency(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGBA", (600, 300), (0, 0, 0, 0)).save(path)
    thumbnail = Image.open(io.BytesIO(make_thumbnail(str(path), 256)))
    assert thumbnail.format == "JPEG" and thumbnail.size == (256, 128)
    # Transparent pixels become white, not black.
    assert min(thumbnail.convert("L").getextrema()) > 240


def test_small_images_are_not_enlarged(tmp_path):
    path = tmp_path / "small.png"
    Image.new("RGB", (20, 10), "blue").save(path)
    assert Image.open(io.BytesIO(make_thumbnail(str(path), 256))).size == (20, 10)


def test_lru_cache_evicts_the_least_recently_used_within_its_byte_bound():
    cache = ByteLRUCache(max_bytes=10)
    cache.put("a", b"1234")
    cache.put("b", b"1234")
    assert cache.get("a") == b"1234"  # "a" is now the most recently used
    cache.put("c", b"1234")
    assert cache.get("b") is None and cache.get("a") == b"1234" and cache.get("c") == b"1234"
    assert cache.total_bytes == 8 and len(cache) == 2
    cache.put("huge", b"x" * 11)  # larger than the whole cache: not kept, nothing evicted
    assert cache.get("huge") is None and len(cache) == 2


def test_thumbnails_are_upright_and_read_every_format(tmp_path):
    from tests.unit.index.helpers import write_phone_photo

    thumbnail = Image.open(io.BytesIO(make_thumbnail(str(write_phone_photo(tmp_path / "phone.jpg", 6)), 256)))
    assert thumbnail.size == (24, 48)  # stored 48 x 24; EXIF orientation 6 turns it upright
    assert thumbnail.getpixel((12, 4))[0] > 200 and thumbnail.getpixel((12, 44))[2] > 200  # red on top, blue below
    for name in ("photo.webp", "photo.tiff"):
        Image.new("RGB", (30, 20), "green").save(tmp_path / name)
        assert Image.open(io.BytesIO(make_thumbnail(str(tmp_path / name), 256))).size == (30, 20)
