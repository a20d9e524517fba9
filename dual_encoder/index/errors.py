"""Exceptions of the index and search code: one line each, naming the file or value at fault."""


from dual_encoder.errors import DualEncoderError


class ImageIndexError(DualEncoderError):
    """Base class: something is wrong with an index, its inputs, or a query."""


class IndexNotFoundError(ImageIndexError, FileNotFoundError):
    """The index directory does not exist."""


class IndexCorruptError(ImageIndexError):
    """An index file is missing, truncated, altered, or inconsistent with the manifest."""


class IndexConfigError(ImageIndexError, ValueError):
    """An `IndexConfig` value (dtype, kind, ANN parameter) is not usable."""


class ModelMismatchError(ImageIndexError):
    """The model offered for an index is not the one whose fingerprint the index records."""


class GallerySourceError(ImageIndexError, ValueError):
    """A gallery source (folder, list file, dataset split) is missing or holds no images."""


class QueryError(ImageIndexError, ValueError):
    """A search request is invalid: empty query text, bad `k`, wrong embedding dimension."""


class QueryImageError(QueryError):
    """A query image that cannot be used: `reason` is a `files.Refused` value (`not an image`, `too large` …)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    @classmethod
    def refused(cls, name: str, refused) -> "QueryImageError":
        """From the `files.FileRefusedError` that reading or decoding the image named `name` raised."""
        from dual_encoder import files, images

        if refused.reason == files.Refused.NOT_IMAGE and not refused.detail:
            return cls(refused.reason, f"query image {name}: not an image (readable: {images.READABLE_FORMATS})")
        return cls(refused.reason, f"query image {name}: {refused}")


class AnnUnavailableError(ImageIndexError, ImportError):
    """The `faiss` package (extra `ann`) is needed for an approximate index but is not installed."""


class UnknownItemError(ImageIndexError, LookupError):
    """An item id that the index does not hold."""
