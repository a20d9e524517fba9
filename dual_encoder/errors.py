"""The one base class of errors a user can cause; the CLI prints them as one line and exits 2."""


class DualEncoderError(Exception):
    """Bad input as a whole (a file, a dataset, an index, a query): a clear message, no traceback."""
