"""The DualEncoder model: image and text towers, their projection heads and the contrastive loss."""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import keras
from keras import ops

from dual_encoder.errors import DualEncoderError
from dual_encoder.losses import build_loss
from dual_encoder.model_config import FLAT_DEFAULTS, SECTIONS, ModelConfig
from dual_encoder.models.image_encoder import build_image_encoder
from dual_encoder.models.layers import (
    CellGramHead,
    L2Normalize,
    ModelConfigError,
    ProjectionHead,
    SlotGramHead,
    WindowGramHead,
)
from dual_encoder.models.text_encoder import build_text_encoder, build_vocabulary

MODEL_CONFIG_FIELDS = SECTIONS
LOSS_KEYS = ("caption_ids", "image_ids", "image_labels", "caption_labels", "negative_mask")  # only the loss reads
_PER_IMAGE_KEYS = ("image_ids", "image_labels")  # rows of images: repeated when an image brings several captions


class BatchKeysError(DualEncoderError, ValueError):
    """A batch passed to `DualEncoder.call` lacks, or doubles, the input of a tower."""


@keras.saving.register_keras_serializable(package="dual_encoder")
class DualEncoder(keras.Model):
    """A CLIP-style dual encoder: both towers map into one L2-normalised embedding space.

    The constructor arguments are the `ModelConfig` sections (`image`, `text`, `paired`, `heads`, `loss`, as
    section objects or their JSON dicts), plus the `small_transformer` vocabulary. Backbone preprocessing and
    tokenisation run inside the model: callers pass raw 0-255 RGB images and strings.

    Args:
        vocabulary: tokens of a text tower that builds its vocabulary from captions (see `build_dual_encoder`);
            unused by the others.
        **kwargs: `ModelConfig` sections (or the flat fields of format 1, migrated), and Keras
            `name`/`dtype`/`trainable`.

    Example:
        >>> config = ModelConfig(image=SmallCnnConfig(size=32), heads=HeadsConfig(embed_dim=16))
        >>> model = build_dual_encoder(config, captions=["a red circle"])
        >>> model.encode_text(["a red circle"]).shape
        TensorShape([1, 16])
    """

    def __init__(self, vocabulary: Optional[Sequence[str]] = None, **kwargs):
        fields = {name: kwargs.pop(name) for name in (*SECTIONS, *FLAT_DEFAULTS) if name in kwargs}
        super().__init__(**kwargs)

        # === Config ===
        config = ModelConfig.from_dict(fields)
        self.model_config = config
        self.vocabulary = None if vocabulary is None else [str(token) for token in vocabulary]

        # === Layers ===
        if config.paired is not None:  # one CLIP / SigLIP preset supplies both towers and their projections
            from dual_encoder.models.pretrained import build_pretrained_towers  # loads KerasHub's model zoo

            self.image_encoder, self.text_encoder = build_pretrained_towers(config.paired)
        else:
            self.image_encoder = build_image_encoder(config.image)
            self.text_encoder = build_text_encoder(config.text, self.vocabulary)
        # What the towers resize to and pad to (a paired preset brings its own).
        self.image_size = self.image_encoder.image_size
        self.sequence_length = self.text_encoder.sequence_length
        heads = config.heads
        if heads.kind == "none":  # zero-shot: the towers' own joint space, only L2-normalised
            self.embed_dim = self.image_encoder.output_dim
            self.image_projection = L2Normalize(name="image_projection")
            self.text_projection = L2Normalize(name="text_projection")
        elif heads.kind == "second_order":
            grid = self.image_encoder.grid  # cells per side, None for a pooled backbone
            if grid is None:
                raise ModelConfigError(
                    "heads.kind=second_order scores an image's cells: it needs an image backbone that keeps them "
                    "(image.backbone=small_cnn_cells)"
                )
            settings = dict(num_projection_layers=heads.layers, dropout=heads.dropout, root=heads.gram_root)
            self.image_projection = CellGramHead(
                heads.embed_dim, heads.vector_dim, grid=grid, name="image_projection", **settings
            )
            tokens = self.text_encoder.tokens_kept  # a text's tokens in order (pooling: tokens), else None
            if tokens is not None:
                self.text_projection = WindowGramHead(
                    heads.embed_dim, heads.vector_dim, tokens, heads.text_window, name="text_projection", **settings
                )
            else:
                self.text_projection = SlotGramHead(
                    heads.embed_dim, heads.vector_dim, slots=heads.text_vectors, name="text_projection", **settings
                )
            self.embed_dim = self.image_projection.output_dim
        else:
            self.embed_dim = heads.embed_dim
            self.image_projection = ProjectionHead(heads.embed_dim, heads.layers, heads.dropout, name="image_projection")
            self.text_projection = ProjectionHead(heads.embed_dim, heads.layers, heads.dropout, name="text_projection")
        # Owned by the model so its learnable temperature/bias are saved, loaded and optimised with it.
        loss = config.loss
        self.contrastive_loss = build_loss(
            loss.name, loss.temperature, loss.max_logit_scale, gather_negatives=loss.gather_negatives
        )

        # === Build ===
        # Every weight exists after construction, so `load_weights` and optimizers work before any call.
        self.image_projection.build((None, self.image_encoder.output_dim))
        self.text_projection.build((None, self.text_encoder.output_dim))
        self.built = True

    def is_trainable(self, tower: str) -> bool:
        """Whether the `tower` ("image" or "text") backbone trains (else it is locked)."""
        return self.model_config.tower(tower).is_trainable(tower)

    @property
    def backbones_frozen(self) -> bool:
        """True when neither backbone trains: their features can be computed once and cached."""
        return not (self.is_trainable("image") or self.is_trainable("text"))

    def image_features(self, images):
        """Raw 0-255 RGB images [B, S, S, 3] -> image backbone outputs [B, F_image] (no head)."""
        return self.image_encoder(images, training=False)

    def text_features(self, texts):
        """Strings [B] -> pooled text backbone outputs [B, F_text] (no head)."""
        return self.text_encoder(_as_strings(texts), training=False)

    def token_features(self, tokens):
        """`tokenize`'s {"token_ids", "padding_mask"} [B, L] -> pooled text backbone outputs [B, F_text] (no head)."""
        return self.text_encoder.encode_token_ids(tokens["token_ids"], tokens["padding_mask"], training=False)

    def encode_image_features(self, features, training=False):
        """Image backbone features [B, F_image] -> L2-normalised float32 embeddings [B, D]."""
        return self.image_projection(features, training=training)

    def encode_text_features(self, features, training=False):
        """Text backbone features [B, F_text] -> L2-normalised float32 embeddings [B, D]."""
        return self.text_projection(features, training=training)

    def encode_image(self, images, training=False):
        """Raw 0-255 RGB images (uint8 or float) [B, S, S, 3] -> L2-normalised float32 embeddings [B, D]."""
        return self.encode_image_features(self.image_encoder(images, training=training), training=training)

    def encode_text(self, texts, training=False):
        """Strings [B] -> L2-normalised float32 embeddings [B, D]; tokenisation runs in the graph."""
        return self.encode_text_features(self.text_encoder(_as_strings(texts), training=training), training=training)

    def tokenize(self, texts) -> dict:
        """Strings [B] -> {"token_ids": int32 [B, L], "padding_mask": bool [B, L]} for `encode_token_ids`."""
        return self.text_encoder.tokenize(_as_strings(texts))

    def encode_token_ids(self, token_ids, padding_mask, training=False):
        """Token ids and padding mask [B, L] -> L2-normalised float32 embeddings [B, D].

        The graph of this path needs only core TensorFlow ops (no TF Text), for servers that lack them.
        """
        features = self.text_encoder.encode_token_ids(token_ids, padding_mask, training=training)
        return self.encode_text_features(features, training=training)

    def call(self, batch, training=False):
        """A batch with `images` or `image_features`, and `captions` or `text_features` (and optionally
        `caption_ids`, `image_ids`, `image_labels`, `caption_labels`, `negative_mask`, passed through for the loss,
        and `negative_captions`, embedded) -> {"image_embeddings", "text_embeddings", those passed through and
        "negative_embeddings"}.

        Several captions per image (`captions` [B, k] or `text_features` [B, k, F], `image_ids` [B]): the image
        tower runs on the B images once, and every output is one row per caption — captions and their keys
        flattened to [B * k], image embeddings and keys repeated k times — so the loss sees B * k pairs whose
        copies of one image share their positives through `image_ids`."""
        caption_key = "captions" if "captions" in batch else "text_features"
        per_image = None
        if caption_key in batch and len(batch[caption_key].shape) == (2 if caption_key == "captions" else 3):
            per_image = batch[caption_key].shape[1]
            batch = {key: _flatten_captions(value) if key not in ("images", "image_features", *_PER_IMAGE_KEYS)
                     else value for key, value in batch.items()}  # fmt: skip
        extra = {key: batch[key] for key in LOSS_KEYS if key in batch}
        if "negative_captions" in batch:  # hard negatives: captions false of their image (the loss's extra column)
            extra["negative_embeddings"] = self.encode_text(batch["negative_captions"], training=training)
        image_embeddings = self._embed(
            batch, "images", self.encode_image, "image_features", self.encode_image_features, training
        )
        if per_image is not None:
            image_embeddings = ops.repeat(image_embeddings, per_image, axis=0)
            extra.update({key: ops.repeat(extra[key], per_image, axis=0) for key in _PER_IMAGE_KEYS if key in extra})
        return {
            **extra,
            "image_embeddings": image_embeddings,
            "text_embeddings": self._embed(
                batch, "captions", self.encode_text, "text_features", self.encode_text_features, training
            ),
        }

    @staticmethod
    def _embed(batch, raw_key, encode_raw, features_key, encode_features, training):
        if (raw_key in batch) == (features_key in batch):
            raise BatchKeysError(
                f"a batch needs exactly one of '{raw_key}' and '{features_key}'; it has {sorted(batch)}"
            )
        if raw_key in batch:
            return encode_raw(batch[raw_key], training=training)
        return encode_features(batch[features_key], training=training)

    def compute_contrastive_loss(self, outputs):
        """This replica's share of the global-batch loss for `call`'s outputs (see `dual_encoder.losses`)."""
        return self.contrastive_loss(
            outputs["image_embeddings"],
            outputs["text_embeddings"],
            **{k: outputs[k] for k in (*LOSS_KEYS, "negative_embeddings") if k in outputs},
        )

    def get_config(self):
        return {
            **super().get_config(),
            **self.model_config.to_dict(),
            "vocabulary": self.vocabulary,
        }


def _flatten_captions(value):
    """[B, k, ...] -> [B * k, ...]."""
    shape = ops.shape(value)
    return ops.reshape(value, (-1, *shape[2:]))


def _as_strings(texts):
    # Keras layers take only tensors positionally; callers may pass a list of str.
    return ops.convert_to_tensor(texts, dtype="string")


def build_dual_encoder(config: ModelConfig, captions: Optional[Iterable[str]] = None) -> DualEncoder:
    """Build a `DualEncoder` from a `ModelConfig`; `captions` build the vocabulary of a text tower that needs one."""
    vocabulary = None
    text = config.tower("text")
    if text.needs_vocabulary:
        if captions is None:
            raise ModelConfigError(f"{text.describe()} builds its vocabulary from captions: pass captions=")
        vocabulary = build_vocabulary(captions, text.vocabulary_size)
    return DualEncoder(vocabulary=vocabulary, **config.to_dict())
