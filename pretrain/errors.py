"""User-facing errors of pretrain/: the CLI prints them as one line, without a traceback."""


class PretrainError(RuntimeError):
    """A run that cannot start or continue for a reason the user can fix (bad checkpoint, layout...)."""
