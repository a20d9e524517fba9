"""The feature cache's key: a locked tower's own config section and outputs, nothing else."""

import keras

from dual_encoder.features import backbone_fingerprint
from dual_encoder.models import build_dual_encoder

from tests.tiny import CAPTIONS, TINY_MODEL, locked

LOCKED = locked(TINY_MODEL)


def _key(changes: dict, towers=("image",)) -> str:
    keras.utils.set_random_seed(1)  # the same initial weights for the same section
    return backbone_fingerprint(build_dual_encoder(LOCKED.replace(changes), captions=CAPTIONS), towers)


def test_the_image_key_changes_with_the_image_section_only():
    key = _key({})
    assert key == _key({})
    for other in ({"text.width": 32}, {"text.sequence_length": 16}, {"heads.embed_dim": 8}, {"loss.name": "siglip"},
                  {"loss.gather_negatives": False}):  # fmt: skip
        assert _key(other) == key, other
    for changed in ({"image.width": 4}, {"image.backbone": "small_cnn_pooled"}, {"image.size": 16}):
        assert _key(changed) != key, changed


def test_the_text_key_ignores_the_heads_and_the_loss():
    key = _key({}, ("text",))
    assert _key({"heads.embed_dim": 8, "loss.name": "siglip"}, ("text",)) == key
    assert _key({"text.pooling": "cls"}, ("text",)) != key
    assert _key({}, ("image", "text")) not in (key, _key({}))
