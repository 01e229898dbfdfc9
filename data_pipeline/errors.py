"""User-facing errors of data_pipeline/: the CLI prints them as one line, without a traceback."""


class DataError(ValueError):
    """Bad input data or tokenizer: the message names the file (and line) and the problem."""
