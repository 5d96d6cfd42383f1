"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class TaggerError(Exception):
    """A problem with the user's input or environment, worth one clear line rather than a traceback."""

    exit_code = 2
