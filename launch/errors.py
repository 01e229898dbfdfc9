"""User-facing errors of launch/: the CLI prints them as one line, without a traceback."""


class LaunchError(RuntimeError):
    """A launch that cannot be submitted: the message says why, before anything is submitted."""
