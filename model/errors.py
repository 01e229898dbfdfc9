"""User-facing errors of model/: the CLI prints them as one line, without a traceback."""


class ModelError(ValueError):
    """A model/config mismatch the user can fix (missing or unexpected weights, shapes, vocab)."""
