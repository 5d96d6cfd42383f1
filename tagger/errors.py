"""User-facing errors and the one-line rendering of any exception, for messages, logs and error rows."""

from __future__ import annotations

import os

MAX_MESSAGE = 300  # characters of an exception's message kept in one line


class TaggerError(Exception):
    """A job that could not be done (bad model, unwritable output, ...): one clear line and exit code 1.

    Bad arguments are UsageErrors (exit code 2, as Click's own); bad files are error rows, not exceptions.
    """

    exit_code = 1


def one_line(e: BaseException, path: str | os.PathLike[str] | None = None, named: bool = False) -> str:
    """An exception's message on one line, at most MAX_MESSAGE characters.

    An OSError gives its strerror (no file name: the caller says which file). `path`, when given, is cut out of the
    message (rows hold the path relative to the catalog). named: prefix the exception's class, 'Class: message'.
    """
    msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    if path is not None:
        p = os.fspath(path)
        msg = str(msg).replace(f" {p!r}", "").replace(p, "")
    # A name's undecodable bytes (surrogates) written as escapes: the line must be valid text for rows and logs.
    text = " ".join(str(msg).split())[:MAX_MESSAGE].encode("utf-8", "backslashreplace").decode("utf-8")
    if not named:
        return text or type(e).__name__
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class UsageError(TaggerError):
    """A bad or missing argument or option value: exit code 2, as Click's own usage errors."""

    exit_code = 2
