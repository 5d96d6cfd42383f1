"""Object-store URIs: the one place that tells a URI from a local path, and shows one without its credentials."""

from __future__ import annotations

import os
import re
import urllib.parse
from typing import Union

from tagger.errors import one_line

Location = Union[str, "os.PathLike[str]"]  # a local path, or a URI such as s3://bucket/prefix

_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+://")  # two letters at least: C:\\ is a Windows drive, not a scheme


def is_uri(loc: Location) -> bool:
    """Whether `loc` names an object-store location (scheme://...) rather than a local path. Asked inside the
    storage package only (open_location, redaction): everything else asks the resolved store."""
    return isinstance(loc, str) and _URI.match(loc) is not None


def redact(loc: Location) -> str:
    """`loc` as it may be shown or recorded: a URI without user info (access keys) and without its query (which
    may carry secret_key=, session_token=, ...); a local path as is."""
    if not is_uri(loc):
        return os.fspath(loc)
    try:
        scheme, host, port, path = place(str(loc))
    except ValueError:  # malformed ('s3://[x/y'): cut what could be secret by pattern
        return _URI_IN_TEXT.sub(r"\1\3", str(loc))
    return f"{scheme}://{host}{f':{port}' if port else ''}{path}"


def place(uri: str) -> tuple[str, str, int | None, str]:
    """(scheme, host, port, path) of a URI: what names an object, without user info or query."""
    u = urllib.parse.urlsplit(uri)
    try:
        port = u.port
    except ValueError:  # not a number: no port to keep
        port = None
    host = u.hostname or ""
    return u.scheme, f"[{host}]" if ":" in host else host, port, u.path


# A URI inside an error text: its user info (group 2) and query (group 4) are cut out, even when the text was
# truncated in the middle of it.
_URI_IN_TEXT = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+://)([^\s'\"/@]*@)?([^\s'\"?]*)(\?[^\s'\"]*)?")


def why(e: BaseException, loc: Location) -> str:
    """one_line(e) for an error about `loc`, safe to show: pyarrow quotes a URI it rejects whole, credentials
    included, so every URI in the text is redacted and every secret of `loc` (user info, query values) masked."""
    text = one_line(e)
    if not is_uri(loc):
        return text
    text = _URI_IN_TEXT.sub(r"\1\3", text)
    try:
        u = urllib.parse.urlsplit(str(loc))
    except ValueError:  # malformed: the pattern above did what it could
        return text
    secrets = [u.username, u.password, u.query] + [v for _, v in urllib.parse.parse_qsl(u.query)]
    for secret in sorted((s for s in secrets if s and len(s) > 2), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


class BadURI(OSError):
    """A URI that is malformed or that no filesystem of pyarrow opens: for one listed file, that file's error row."""


def split(uri: str) -> tuple[str, str, str]:
    """(scheme://authority, path without leading '/', query) of a URI; the path percent-decoded. BadURI when
    malformed."""
    try:
        u = urllib.parse.urlsplit(uri)
    except ValueError as e:
        raise BadURI(f"malformed URI: {one_line(e)}") from None
    return f"{u.scheme}://{u.netloc}", urllib.parse.unquote(u.path).lstrip("/"), u.query


def object_id(uri: str) -> tuple[object, ...]:
    """What names one object: scheme, host, port and decoded path (not the user info or query it is reached with)."""
    return (*place(uri)[:3], split(uri)[1])
