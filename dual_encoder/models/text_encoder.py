"""Text towers: a small transformer trained from scratch, KerasHub BERT presets, TF-Hub BERT handles.

Every tower runs strings -> `tokenize` -> token ids -> `encode_token_ids` -> pooled features, so an
export can offer a token-id signature whose graph needs only core TensorFlow ops.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable, Optional, Sequence

import keras
import keras_hub
from keras import ops

from dual_encoder.models.layers import TEXT_POOLINGS, ModelConfigError, masked_mean, masked_tokens


class TextEncoder(keras.layers.Layer):
    """Base of the text towers (without their heads): strings [B] -> pooled features [B, output_dim].

    Subclasses set `output_dim` and implement `tokenize` and `encode_token_ids`.

    Args:
        pooling: "cls" (the backbone's sentence vector) or "mean" (masked mean of token outputs).
        sequence_length: tokens per text after padding or truncation.
        trainable: False freezes the backbone (and runs its dropout in inference mode).
    """

    # Its config section (`dual_encoder.model_config`) declares what a tower needs (a vocabulary from captions, TF
    # Text ops at export) and whether a batch's padding may be trimmed (`trims_padding`).

    poolings = ("cls", "mean")  # what this tower offers of `TEXT_POOLINGS`

    def __init__(self, pooling: str = "mean", sequence_length: int = 32, trainable: bool = True, **kwargs):
        super().__init__(trainable=trainable, **kwargs)
        if pooling not in self.poolings:
            raise ModelConfigError(f"unknown text_pooling '{pooling}'; choose one of {list(self.poolings)}")
        self.pooling = pooling
        self.sequence_length = sequence_length

    @property
    def tokens_kept(self) -> Optional[int]:
        """Tokens per text when the features are every token's output (`pooling: tokens`), else None."""
        return self.sequence_length if self.pooling == "tokens" else None

    def call(self, texts, training=False):
        tokens = self.tokenize(texts)
        return self.encode_token_ids(tokens["token_ids"], tokens["padding_mask"], training=training)

    def tokenize(self, texts) -> dict:
        """Strings [B] -> {"token_ids": int32 [B, L], "padding_mask": bool [B, L]}."""
        raise NotImplementedError

    def encode_token_ids(self, token_ids, padding_mask, training=False):
        """Token ids and padding mask [B, L] -> pooled features [B, output_dim]."""
        raise NotImplementedError

    def save_assets(self, directory: Path) -> dict[str, str]:
        """Write the files this tower needs to load offline into `directory`.

        Returns the fields of the tower's config section to point at them, as paths relative to `directory`.
        """
        return {}

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.output_dim)

    def get_config(self):
        return {**super().get_config(), "pooling": self.pooling, "sequence_length": self.sequence_length}


class SmallTransformerTextEncoder(TextEncoder):
    """A transformer text tower trained from scratch, tokenised in-graph by `TextVectorization`.

    `TextVectorization` uses only core TF string ops, so an exported graph needs no TF Text. With "cls"
    pooling the first token's output is the sentence vector; with "tokens" the features are every token's
    output, flattened row by row (`layers.masked_tokens`: `sequence_length * width` long), for a head that reads
    words in their order (`heads.kind: second_order`, `layers.WindowGramHead`).

    Args:
        vocabulary: tokens (without padding and OOV entries), e.g. from `build_vocabulary`.
        width: embedding and model width.
        num_layers: transformer encoder blocks.
        num_heads: attention heads per block.
        dropout: dropout inside the blocks.
        **kwargs: `pooling`, `sequence_length`, `trainable` of `TextEncoder`.

    Example:
        >>> tower = SmallTransformerTextEncoder(["a", "red", "circle"], width=16, num_layers=1, num_heads=2)
        >>> tower(["a red circle"]).shape
        TensorShape([1, 16])
    """

    poolings = TEXT_POOLINGS

    def __init__(
        self,
        vocabulary: Sequence[str],
        width: int = 64,
        num_layers: int = 1,
        num_heads: int = 2,
        dropout: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not vocabulary:
            raise ModelConfigError(
                "small_transformer needs a vocabulary: build the model with build_dual_encoder(config, captions)"
            )
        self.vocabulary = [str(token) for token in vocabulary]
        self.width = width
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.dropout = dropout
        self.vectorizer = keras.layers.TextVectorization(
            vocabulary=self.vocabulary, output_sequence_length=self.sequence_length, name="vectorizer"
        )
        self.embedding = keras_hub.layers.TokenAndPositionEmbedding(
            vocabulary_size=self.vectorizer.vocabulary_size(),
            sequence_length=self.sequence_length,
            embedding_dim=width,
            dtype=self.dtype_policy,
            name="embedding",
        )
        self.blocks = [
            keras_hub.layers.TransformerEncoder(
                intermediate_dim=4 * width, num_heads=num_heads, dropout=dropout, dtype=self.dtype_policy, name=f"block_{i}"
            )
            for i in range(num_layers)
        ]
        self.output_dim = width * (self.tokens_kept or 1)
        self.build()
        for layer in (self.embedding, *self.blocks):
            layer.trainable = self.trainable

    @classmethod
    def from_section(cls, section, vocabulary: Optional[Sequence[str]]) -> "SmallTransformerTextEncoder":
        """The tower of a `SmallTransformerConfig`."""
        return cls(
            vocabulary,
            width=section.width,
            num_layers=section.layers,
            num_heads=section.heads,
            dropout=section.dropout,
            pooling=section.pooling,
            sequence_length=section.sequence_length,
            trainable=section.trainable,
            name="text_encoder",
        )

    def build(self, input_shape=None):
        self.embedding.build((None, self.sequence_length))
        for block in self.blocks:
            block.build((None, self.sequence_length, self.width))
        self.built = True

    def tokenize(self, texts) -> dict:
        token_ids = ops.cast(self.vectorizer(texts), "int32")
        return {"token_ids": token_ids, "padding_mask": ops.not_equal(token_ids, 0)}

    def encode_token_ids(self, token_ids, padding_mask, training=False):
        hidden = self.embedding(token_ids)
        for block in self.blocks:
            hidden = block(hidden, padding_mask=padding_mask, training=training and self.trainable)
        if self.pooling == "cls":
            return hidden[:, 0, :]
        if self.pooling == "tokens":
            return masked_tokens(hidden, padding_mask)
        return masked_mean(hidden, padding_mask)

    def get_config(self):
        return {
            **super().get_config(),
            "vocabulary": self.vocabulary,
            "width": self.width,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "dropout": self.dropout,
        }


class KerasHubTextEncoder(TextEncoder):
    """A KerasHub BERT backbone and its WordPiece tokenizer, from a preset name or a local HF BERT folder.

    "cls" pooling uses the backbone's `pooled_output`; "mean" is the masked mean of `sequence_output`
    (what sentence-transformers checkpoints such as all-MiniLM-L6-v2 were trained for).

    Args:
        preset: a KerasHub preset name ("bert_small_en_uncased"), a KerasHub preset folder, or a
            Hugging Face BERT checkpoint folder (config.json, vocab.txt, model.safetensors).
        **kwargs: `pooling`, `sequence_length`, `trainable` of `TextEncoder`.

    Example:
        >>> tower = KerasHubTextEncoder("bert_tiny_en_uncased", pooling="cls", sequence_length=16)
        >>> tower(["a dog on a beach"]).shape
        TensorShape([1, 128])
    """

    def __init__(self, preset: str, **kwargs):
        super().__init__(**kwargs)
        self.preset = preset
        try:
            self.backbone = keras_hub.models.BertBackbone.from_preset(preset)
            tokenizer = keras_hub.models.BertTokenizer.from_preset(preset)
        except (ValueError, OSError, KeyError) as error:
            raise ModelConfigError(f"cannot load KerasHub BERT preset '{preset}': {_first_line(error)}") from None
        self.backbone.trainable = self.trainable
        self.preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
            tokenizer, sequence_length=self.sequence_length, name="preprocessor"
        )
        self.output_dim = self.backbone.hidden_dim
        self.built = True

    @classmethod
    def from_section(cls, section, vocabulary=None) -> "KerasHubTextEncoder":
        """The tower of a `KerasHubBertConfig`."""
        if not section.preset:
            raise ModelConfigError("text backbone 'keras_hub' needs text.preset (a preset name or a local folder)")
        return cls(
            section.preset,
            pooling=section.pooling,
            sequence_length=section.sequence_length,
            trainable=section.trainable,
            name="text_encoder",
        )

    def tokenize(self, texts) -> dict:
        tokens = self.preprocessor(texts)
        return {"token_ids": tokens["token_ids"], "padding_mask": tokens["padding_mask"]}

    def encode_token_ids(self, token_ids, padding_mask, training=False):
        outputs = self.backbone(
            {"token_ids": token_ids, "segment_ids": ops.zeros_like(token_ids), "padding_mask": padding_mask},
            training=training and self.trainable,
        )
        if self.pooling == "cls":
            return outputs["pooled_output"]
        return masked_mean(outputs["sequence_output"], padding_mask)

    def save_assets(self, directory: Path) -> dict[str, str]:
        target = Path(directory) / "text_preset"
        self.backbone.save_to_preset(str(target))
        self.preprocessor.tokenizer.save_to_preset(str(target))
        return {"preset": target.name}

    def get_config(self):
        return {**super().get_config(), "preset": self.preset}


class TFHubTextEncoder(TextEncoder):
    """A TF-Hub BERT encoder and its preprocess model, loaded with `hub.load` (URL or local folder).

    The encoder's variables are tracked as this layer's weights, so they are saved with the model and
    trained when the tower is trainable. Where the preprocess model offers `tokenize` and
    `bert_pack_inputs` (the TF-Hub BERT preprocess API) texts are packed to `sequence_length`; otherwise
    its default call (and its fixed length) is used.

    Args:
        encoder: TF-Hub handle of the encoder (inputs `input_word_ids`, `input_mask`, `input_type_ids`;
            outputs `pooled_output`, `sequence_output`).
        preprocessor: TF-Hub handle of the matching preprocess model.
        **kwargs: `pooling`, `sequence_length`, `trainable` of `TextEncoder`.

    Example:
        >>> tower = TFHubTextEncoder(
        ...     "https://tfhub.dev/tensorflow/small_bert/bert_en_uncased_L-2_H-128_A-2/2",
        ...     "https://tfhub.dev/tensorflow/bert_en_uncased_preprocess/3",
        ... )
    """

    def __init__(self, encoder: str, preprocessor: str, **kwargs):
        super().__init__(**kwargs)
        self.encoder_handle = encoder
        self.preprocessor_handle = preprocessor
        self._encoder = _hub_load(encoder)
        self._preprocessor = _hub_load(preprocessor)
        for variable in _variables_used_by(self._encoder.__call__):
            self._track_variable(
                keras.Variable(
                    initializer=variable,
                    trainable=variable.trainable and self.trainable,
                    dtype=variable.dtype,
                    shape=variable.shape,
                    name=variable.name.split(":")[0].replace("/", "_"),  # Keras names allow no '/'
                )
            )
        self.built = True
        self.output_dim = int(self.call(["probe"]).shape[-1])

    @classmethod
    def from_section(cls, section, vocabulary=None) -> "TFHubTextEncoder":
        """The tower of a `TFHubConfig`."""
        if not section.encoder or not section.preprocessor:
            raise ModelConfigError("text backbone 'tf_hub' needs text.encoder and text.preprocessor handles")
        return cls(
            section.encoder,
            section.preprocessor,
            pooling=section.pooling,
            sequence_length=section.sequence_length,
            trainable=section.trainable,
            name="text_encoder",
        )

    def tokenize(self, texts) -> dict:
        texts = ops.convert_to_tensor(texts, dtype="string")
        if hasattr(self._preprocessor, "bert_pack_inputs"):
            packed = self._preprocessor.bert_pack_inputs(
                [self._preprocessor.tokenize(texts)], seq_length=self.sequence_length
            )
        else:
            packed = self._preprocessor(texts)
        return {
            "token_ids": ops.cast(packed["input_word_ids"], "int32"),
            "padding_mask": ops.cast(packed["input_mask"], "bool"),
        }

    def encode_token_ids(self, token_ids, padding_mask, training=False):
        outputs = self._encoder(
            {
                "input_word_ids": token_ids,
                "input_mask": ops.cast(padding_mask, "int32"),
                "input_type_ids": ops.zeros_like(token_ids),
            },
            training=training and self.trainable,
        )
        if self.pooling == "cls":
            return outputs["pooled_output"]
        return masked_mean(outputs["sequence_output"], padding_mask)

    def save_assets(self, directory: Path) -> dict[str, str]:
        import tensorflow_hub as hub

        # Copies of the resolved SavedModels (the download cache for URLs) make the model dir self-contained.
        shutil.copytree(hub.resolve(self.encoder_handle), Path(directory) / "text_encoder")
        shutil.copytree(hub.resolve(self.preprocessor_handle), Path(directory) / "text_preprocessor")
        return {"encoder": "text_encoder", "preprocessor": "text_preprocessor"}

    def get_config(self):
        return {**super().get_config(), "encoder": self.encoder_handle, "preprocessor": self.preprocessor_handle}


def _hub_load(handle: str):
    import tensorflow_hub as hub
    import tensorflow_text  # noqa: F401  (registers the TF Text ops that BERT preprocess graphs use)

    try:
        return hub.load(handle)
    except (OSError, ValueError) as error:
        raise ModelConfigError(f"cannot load TF-Hub handle '{handle}': {_first_line(error)}") from None


def _variables_used_by(function) -> list:
    """The variables captured by every traced signature of a restored `tf.function`, each once."""
    found = {}
    for concrete in function.concrete_functions:
        for variable in concrete.variables:
            found.setdefault(id(variable), variable)
    return list(found.values())


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


TEXT_ENCODERS: dict[str, type[TextEncoder]] = {
    "small_transformer": SmallTransformerTextEncoder,
    "keras_hub": KerasHubTextEncoder,
    "tf_hub": TFHubTextEncoder,
}


def build_text_encoder(section, vocabulary: Optional[Sequence[str]] = None) -> TextEncoder:
    """The text tower of a text family's config section (`dual_encoder.model_config`), by its `backbone`."""
    if section.backbone not in TEXT_ENCODERS:
        raise ModelConfigError(f"unknown text backbone '{section.backbone}'; choose one of {sorted(TEXT_ENCODERS)}")
    return TEXT_ENCODERS[section.backbone].from_section(section, vocabulary)


def build_vocabulary(captions: Iterable[str], max_size: int) -> list[str]:
    """The `max_size - 2` most frequent tokens of `captions` (padding and OOV take two ids), ties broken
    deterministically, standardised exactly as `SmallTransformerTextEncoder` will see them."""
    import tensorflow as tf  # only to feed `adapt`; the model code itself uses keras.ops

    captions = [str(caption) for caption in captions]
    if not captions:
        raise ModelConfigError("cannot build a vocabulary from zero captions")
    vectorizer = keras.layers.TextVectorization(max_tokens=max_size)
    vectorizer.adapt(tf.data.Dataset.from_tensor_slices(captions).batch(4096))
    vocabulary = [str(token) for token in vectorizer.get_vocabulary(include_special_tokens=False)]
    if not vocabulary:
        raise ModelConfigError("the captions hold no tokens to build a vocabulary from")
    return vocabulary
