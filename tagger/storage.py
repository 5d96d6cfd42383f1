"""Where files live: the one place that knows a local path from an object-store URI; read, list, publish, lock.

Object stores: s3://, gs://, any URI pyarrow.fs.FileSystem.from_uri understands. Every stage reads, publishes and
locks through this module, and lists and stats objects through it; a local catalog folder is walked by discover
itself (os.scandir: links, loops, folders that cannot be listed).

A location is a local path (str or PathLike) or a URI string (pathlib would collapse 's3://' to 's3:/'). Local paths
keep their behaviour: read non-blocking, publish by temp file beside it, fsync, rename, fsync the folder. Object
stores: read in one call (pyarrow sends a HEAD and a GET), publish by uploading a finished local file in one call
(an object appears whole or not at all). redact() is how a location is shown or recorded: never with its credentials.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar, Union

import pyarrow as pa
import pyarrow.fs as pafs

from tagger.errors import TaggerError, UsageError, one_line

log = logging.getLogger(__name__)

Location = Union[str, "os.PathLike[str]"]  # a local path, or a URI such as s3://bucket/prefix

_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+://")  # two letters at least: C:\\ is a Windows drive, not a scheme


def is_uri(loc: Location) -> bool:
    """Whether `loc` names an object-store location (scheme://...) rather than a local path."""
    return isinstance(loc, str) and _URI.match(loc) is not None


def as_location(loc: Location) -> str | Path:
    """A URI kept as the exact string, anything else as a Path: what RunConfig and friends hold."""
    return loc if is_uri(loc) else Path(loc)  # type: ignore[return-value]


def redact(loc: Location) -> str:
    """`loc` as it may be shown or recorded: a URI without user info (access keys) and without its query (which
    may carry secret_key=, session_token=, ...); a local path as is."""
    if not is_uri(loc):
        return os.fspath(loc)
    try:
        scheme, host, port, path = _place(str(loc))
    except ValueError:  # malformed ('s3://[x/y'): cut what could be secret by pattern
        return _URI_IN_TEXT.sub(r"\1\3", str(loc))
    return f"{scheme}://{host}{f':{port}' if port else ''}{path}"


def _place(uri: str) -> tuple[str, str, int | None, str]:
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


def _why(e: BaseException, loc: Location) -> str:
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


def absolute(loc: Location) -> str:
    """The location a run records (tagger.output.catalog, ...): a local path resolved, a URI redacted."""
    return redact(loc) if is_uri(loc) else os.path.realpath(loc)


class BadURI(OSError):
    """A URI that is malformed or that no filesystem of pyarrow opens: for one listed file, that file's error row."""


def _split(uri: str) -> tuple[str, str, str]:
    """(scheme://authority, path without leading '/', query) of a URI; the path percent-decoded. BadURI when
    malformed."""
    try:
        u = urllib.parse.urlsplit(uri)
    except ValueError as e:
        raise BadURI(f"malformed URI: {one_line(e)}") from None
    return f"{u.scheme}://{u.netloc}", urllib.parse.unquote(u.path).lstrip("/"), u.query


def join(loc: Location, name: str) -> str | Path:
    """`loc`/`name` (name: a relative posix path, e.g. a key below a catalog prefix)."""
    if not is_uri(loc):
        return Path(loc) / name
    base, path, query = _split(str(loc))
    full = f"{path.rstrip('/')}/{name}" if path else name
    return f"{base}/{urllib.parse.quote(full)}" + (f"?{query}" if query else "")


def with_suffix_name(loc: Location, suffix: str) -> str | Path:
    """A sibling of `loc` named its name + suffix (OUT -> OUT.work)."""
    if not is_uri(loc):
        p = Path(loc)
        return p.with_name(p.name + suffix)
    base, path, query = _split(str(loc))
    return f"{base}/{urllib.parse.quote(path + suffix)}" + (f"?{query}" if query else "")


def name_of(loc: Location) -> str:
    """The last component of a location's path ('' for a malformed URI)."""
    if not is_uri(loc):
        return Path(loc).name
    try:
        return _split(str(loc))[1].rstrip("/").rsplit("/", 1)[-1]
    except BadURI:
        return ""


def has_dot_segments(loc: Location) -> bool:
    """Whether a URI's key has a '.' or '..' component ('cat/hires/../small/1.jpg'). HTTP clients collapse such
    segments before sending (RFC 3986), so that object can be neither read nor written under its own key: another
    one would be."""
    return is_uri(loc) and any(part in (".", "..") for part in _split(str(loc))[1].split("/"))


class AmbiguousKey(OSError):
    """An object whose key has a '.' or '..' component: reading it would read another object (see
    has_dot_segments), so it is an error row, never read."""


def check_names_file(loc: Location, what: str) -> None:
    """UsageError when `loc` names no file to write ('', '/', '.', '..', a bare bucket), or an object whose key has
    '.' or '..' components (the client would write another object: a photo of the catalog, say)."""
    if is_uri(loc):
        try:
            _split(str(loc))
        except BadURI as e:
            raise UsageError(f"{what} {redact(loc)!r}: {e}") from None
    if name_of(loc) in ("", ".", ".."):
        raise UsageError(f"{what} must name a file, got {redact(loc)!r}")
    if has_dot_segments(loc):
        raise UsageError(
            f"{what} {redact(loc)!r} has a '.' or '..' component in its key, which the store would resolve to "
            "another object; write the key without them"
        )


def relative_key(root: Location, loc: Location) -> str | None:
    """`loc`'s path below `root`, posix style, when both are URIs of one store and loc lies under root; else None."""
    if not (is_uri(root) and is_uri(loc)):
        return None
    rb, rp, _ = _split(str(root))
    lb, lp, _ = _split(str(loc))
    prefix = rp.rstrip("/") + "/" if rp else ""
    if _place(rb)[:3] != _place(lb)[:3] or not lp.startswith(prefix):
        return None
    return lp[len(prefix) :] or None


def has_latency(loc: Location) -> bool:
    """Whether reading `loc` costs a network round trip (tens of ms): worth fetching ahead in threads."""
    return is_uri(loc)


STORE_TIMEOUT_ENV = "TAGGER_STORE_TIMEOUT"
DEFAULT_STORE_TIMEOUT = 60.0  # seconds a store may fail with transient errors before a call gives up
MAX_BACKOFF_S = 5.0


def store_timeout() -> float:
    """How long one store call keeps retrying transient errors (seconds): TAGGER_STORE_TIMEOUT, else 60. Read from
    the environment so that decode workers, in other processes, follow the same bound."""
    raw = os.environ.get(STORE_TIMEOUT_ENV)
    if not raw:
        return DEFAULT_STORE_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"{STORE_TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if not 0 < value <= 86400:
        raise UsageError(f"{STORE_TIMEOUT_ENV} must be between 0 and 86400 seconds, got {raw!r}")
    return value


def request_timeouts(bound: float) -> tuple[float, float]:
    """(connect, request) timeouts of one attempt, in whole seconds (the S3 client rounds down, and 0 would mean
    none): a quarter of the bound, at most 10 s to connect and 15 s without receiving a byte (curl's low-speed
    limit: a slow large transfer is not cut). A PUT may wait that long in each of its phases (headers, body,
    answer), so one attempt stays within 3/4 of the bound and a call within twice the bound."""
    quarter = max(1, int(bound / 4))
    return float(min(10, quarter)), float(min(15, quarter))


@functools.lru_cache(maxsize=16)
def _filesystem(base: str, query: str, bound: float) -> tuple[pafs.FileSystem, str]:
    """One filesystem per store, options and bound, per process (clients hold connection pools and credentials).

    Credentials come from the standard chains (AWS env vars, ~/.aws profiles, instance roles, AWS_ENDPOINT_URL;
    GCS application default credentials) unless the URI carries them. S3: allow_delayed_open makes a small object
    one PUT instead of create + upload part + complete (3 round trips); its errors surface at close(), which
    publish calls itself. Every attempt gets connect and request timeouts and the SDK retries nothing: _retrying
    retries transient errors, so one bound covers a whole call.
    """
    options = urllib.parse.parse_qs(query)
    if base.startswith("s3://") and "allow_delayed_open" not in options:
        query = (query + "&" if query else "") + "allow_delayed_open=true"
    fs, root = pafs.FileSystem.from_uri(f"{base}/?{query}" if query else f"{base}/")
    if isinstance(fs, pafs.S3FileSystem):
        _, (kw,) = fs.__reduce__()  # the options from_uri resolved (region, endpoint, credentials), to rebuild with
        connect, request = request_timeouts(bound)
        kw.update(connect_timeout=connect, request_timeout=request,
                  retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))  # fmt: skip
        kw["region"] = kw["region"] or None
        if not kw["proxy_options"]["host"]:
            kw["proxy_options"] = None
        fs = pafs.S3FileSystem(**kw)
    return fs, root.rstrip("/")  # s3://bkt/ -> 'bkt', file:/// -> ''


# A store's answer that may change by itself: connection refused or reset, timeouts, throttling, 5xx. Matched
# against pyarrow's messages (AWS SDK error names, curl's) and against error rows written by earlier runs.
TRANSIENT_PATTERN = (
    r"NETWORK_CONNECTION|REQUEST_TIMEOUT|SLOW_DOWN|THROTTL|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|REQUEST_LIMIT|"
    r"Timeout was reached|Connection reset|Could not connect|Connection refused|timed out|"
    r"HTTP (?:status|response code):? ?(?:5\d\d|429)|\[code (?:5\d\d|429)\]"
)
_TRANSIENT = re.compile(TRANSIENT_PATTERN, re.IGNORECASE)


def is_transient(e: BaseException) -> bool:
    """Whether a store error may go away by itself (retry it) rather than be the object's answer (403, missing)."""
    return isinstance(e, (OSError, pa.ArrowException)) and not isinstance(e, FileNotFoundError) and (
        isinstance(e, (ConnectionError, TimeoutError)) or _TRANSIENT.search(str(e)) is not None
    )


class StoreUnavailable(TaggerError):
    """The object store kept failing with transient errors past the bound: the run stops, it blames no file."""


_T = TypeVar("_T")

_gave_up: dict[str, float] = {}  # store (scheme://authority) -> when a call last gave up on it (monotonic)
_hurry_until: float | None = None  # set by hurry(): no store call waits past this (monotonic)


def _store_of(loc: Location) -> str:
    return _split(str(loc))[0]


_CALL_THREAD = "tagger-store-call"


def _attempt(call: Callable[[], _T]) -> _T:
    """call() once, in a helper thread that the caller waits for: a signal (SIGTERM, Ctrl-C) is handled at once in
    the main thread, and once a stopping run hurries (hurry, abort_fast) no thread waits past its deadline for a
    store that does not answer (TimeoutError; the helper is a daemon, so nothing waits for it at exit either)."""
    result: list[_T] = []
    error: list[BaseException] = []
    done = threading.Event()

    def target() -> None:
        try:
            result.append(call())
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            error.append(e)
        finally:
            done.set()

    threading.Thread(target=target, name=_CALL_THREAD, daemon=True).start()
    while not done.wait(0.25):
        if _hurry_until is not None and time.monotonic() >= _hurry_until:
            raise TimeoutError("the run is stopping; no answer from the store in time")
    if error:
        raise error[0]
    return result[0]


def _retrying(loc: Location, what: str, call: Callable[[], _T]) -> _T:
    """call(), retried with bounded exponential backoff while it fails transiently; StoreUnavailable once
    store_timeout() has passed since the first attempt (a call ends within the bound plus one request timeout).
    Permanent errors are raised as they are, at once. A store this process gave up on less than a bound ago is
    not waited for again: the run is stopping, its clean-up must not take another bound."""
    bound = store_timeout()
    store = _store_of(loc)
    deadline = time.monotonic() + bound
    gave_up = time.monotonic() - _gave_up.get(store, -math.inf)
    if gave_up < bound:  # the run is stopping because of it: its clean-up must not wait another bound
        raise StoreUnavailable(f"object store unreachable ({STORE_TIMEOUT_ENV}: gave up {gave_up:.0f} s ago)")
    delay = 0.2
    while True:
        try:
            return _attempt(call)
        except (OSError, pa.ArrowException) as e:
            if not is_transient(e):
                raise
            hurry_until = _hurry_until  # may have been set meanwhile (SIGTERM)
            if time.monotonic() + delay >= (deadline if hurry_until is None else min(deadline, hurry_until)):
                _gave_up[store] = time.monotonic()
                raise StoreUnavailable(
                    f"object store unreachable for {bound:g} s ({STORE_TIMEOUT_ENV}) while trying to {what} "
                    f"{redact(loc)}: {_why(e, loc)}"
                ) from None
            log.debug("transient store error on %s, retrying in %.1f s: %s", redact(loc), delay, _why(e, loc))
        time.sleep(delay)
        delay = min(delay * 2, MAX_BACKOFF_S)


def exit_if_stuck(code: int) -> None:
    """End the process at once with `code` while store calls still wait for an answer (a store that never
    answers): pyarrow's exit handler would wait for each of them, up to its request timeouts. For the CLI, after the
    run has cleaned up and said why it stops; nothing happens when no call is left waiting."""
    if any(t.name == _CALL_THREAD and t.is_alive() for t in threading.enumerate()):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


CLEANUP_SECONDS = 3.0  # the most a stopping run waits for a store in all: its last rows, its lock


def stop_waiting(seconds: float = CLEANUP_SECONDS) -> None:
    """From now on, no store call in this process waits more than `seconds` in all. For a SIGTERM handler, before
    it unwinds the run: threads reading ahead stop waiting for a store that does not answer, so the run's clean-up
    is not held up by them."""
    global _hurry_until
    until = time.monotonic() + seconds
    _hurry_until = until if _hurry_until is None else min(_hurry_until, until)


def aborting(exc_type: type[BaseException] | None) -> bool:
    """Whether a block ends because the run was told to stop (SIGTERM, Ctrl-C) or its store stopped answering:
    then its clean-up hurries."""
    return exc_type is not None and (not issubclass(exc_type, Exception) or issubclass(exc_type, StoreUnavailable))


@contextlib.contextmanager
def hurry(seconds: float) -> Iterator[None]:
    """Within the block no store call waits more than `seconds` in all: the clean-up of a run that was told to stop
    or whose store failed, which must end soon whatever the store does."""
    global _hurry_until
    saved = _hurry_until
    _hurry_until = time.monotonic() + seconds if saved is None else min(saved, time.monotonic() + seconds)
    try:
        yield
    finally:
        _hurry_until = saved


@contextlib.contextmanager
def abort_fast(seconds: float) -> Iterator[Callable[..., bool]]:
    """For a run's ExitStack: yields an exit callback to push last. When the run aborts (see aborting), it makes
    the clean-up of everything pushed before it (decode threads, work parts, the lock) wait for the store at most
    `seconds` in all; the block's end restores the normal bound."""
    global _hurry_until
    saved = _hurry_until

    def on_exit(exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        global _hurry_until
        if aborting(exc_type):
            _hurry_until = time.monotonic() + seconds if saved is None else min(saved, time.monotonic() + seconds)
        return False

    try:
        yield on_exit
    finally:
        _hurry_until = saved
        _gave_up.clear()  # the next run tries the store afresh


def _fs(loc: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path in it) of a URI (an S3 or GCS path starts with the bucket); TaggerError (redacted) when
    pyarrow does not understand it (StoreUnavailable when the store does not answer as it is opened: S3 may ask
    it for the bucket's region)."""
    try:
        base, path, query = _split(loc)
        bound = store_timeout()
        try:
            fs, root = _filesystem(base, query, bound)  # cached: no call to the store after the first
        except (OSError, pa.ArrowException) as e:
            if not is_transient(e):
                raise
            fs, root = _retrying(loc, "open", lambda: _filesystem(base, query, bound))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise TaggerError(f"cannot open {redact(loc)}: {_why(e, loc)}") from None
    return fs, f"{root}/{path}" if root or base.startswith("file:") else path


def _file_fs(loc: str) -> tuple[pafs.FileSystem, str]:
    """_fs for one file of a catalog or list: a URI that cannot be opened is that file's error (BadURI, its row),
    not the run's; a store that does not answer still stops the run."""
    try:
        return _fs(loc)
    except StoreUnavailable:
        raise
    except TaggerError as e:
        raise BadURI(str(e)) from None


def arrow_source(loc: Location) -> tuple[str, pafs.FileSystem | None]:
    """(path, filesystem) to hand pyarrow readers (pq.ParquetFile, pq.read_metadata): a local path with None."""
    if not is_uri(loc):
        return os.fspath(loc), None
    fs, path = _fs(str(loc))
    return path, fs


@dataclass(frozen=True)
class Entry:
    """A file found by list_files: its path below the listed root (posix), its location, size and mtime."""

    rel: str
    location: str
    size: int  # bytes
    mtime: float  # seconds since the epoch; an object's LastModified (1 s granularity)


def list_files(root: str) -> Iterator[Entry]:
    """Every object below a URI prefix, sorted by relative path (plain string order, like the local walk).

    pyarrow's recursive FileSelector returns the whole listing at once: ~100 bytes a key, 100 MB for a million.
    TaggerError when the prefix cannot be listed (no bucket, no permission) or holds nothing.
    """
    fs, path = _fs(root)
    prefix = path.rstrip("/")
    try:
        infos = _retrying(root, "list", lambda: fs.get_file_info(pafs.FileSelector(prefix, recursive=True)))
    except (OSError, pa.ArrowException) as e:
        raise TaggerError(f"cannot list catalog {redact(root)}: {_why(e, root)}") from None
    entries = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(prefix) + 1 :] if prefix else info.path
        entries.append((rel, info))
    entries.sort(key=lambda e: e[0])
    for rel, info in entries:
        yield Entry(rel, str(join(root, rel)), info.size, (info.mtime_ns or 0) / 1e9)


def stat_file(loc: Location) -> tuple[int, float]:
    """(size, mtime) of a file or object; OSError when it is missing or unreadable."""
    if not is_uri(loc):
        st = os.stat(loc)
        return st.st_size, st.st_mtime
    fs, path = _file_fs(str(loc))
    info = _retrying(loc, "read", lambda: fs.get_file_info(path))
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(2, "No such object")
    return info.size, (info.mtime_ns or 0) / 1e9


def exists(loc: Location) -> bool:
    """Whether a file or object (or a local folder) is there."""
    if not is_uri(loc):
        return os.path.exists(loc)
    fs, path = _fs(str(loc))
    try:
        return _retrying(loc, "read", lambda: fs.get_file_info(path)).type != pafs.FileType.NotFound
    except (OSError, pa.ArrowException) as e:
        raise TaggerError(f"cannot read {redact(loc)}: {_why(e, loc)}") from None


def is_folder(loc: Location) -> bool:
    """A local folder; for a URI, whether objects lie below it (a key prefix) or it is a bucket."""
    if not is_uri(loc):
        return os.path.isdir(loc)
    fs, path = _fs(str(loc))
    try:
        return _retrying(loc, "read", lambda: fs.get_file_info(path)).type == pafs.FileType.Directory
    except (OSError, pa.ArrowException):
        return False  # no bucket or no access: writing it says so


class NotARegularFile(OSError):
    """A catalog path that names a FIFO, socket, device or folder: never read (a FIFO would block forever)."""


_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a folder"),
)


def _check_regular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "a special file")
        raise NotARegularFile(f"{kind}, not a regular file")


def read_file(path: Location) -> bytes:
    """The whole content of a catalog file; NotARegularFile (an OSError) for anything but a regular file. An object
    is read in one call (a HEAD and a GET); its errors (403, deleted) are OSErrors too.

    Checked with stat before opening, and opened non-blocking and checked again on the descriptor, so a path swapped
    for a FIFO in between cannot block either (a non-blocking open of a FIFO returns at once; a socket fails).
    """
    if is_uri(path):
        if has_dot_segments(path):
            raise AmbiguousKey("a key with a '.' or '..' component, which the store would resolve to another object")
        fs, key = _file_fs(str(path))

        def get() -> bytes:
            with fs.open_input_stream(key, compression=None) as f:  # never 'detect': a photo named x.gz stays bytes
                data: bytes = f.read()
                return data

        return _retrying(path, "read", get)
    _check_regular(os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with open(fd, "rb", buffering=0) as f:
        _check_regular(os.fstat(fd).st_mode)
        return f.readall()


def sha256_hex(data: bytes) -> str:
    """The digest tagger records for a file's bytes (the output's sha256 column): hex SHA-256."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """sha256_hex of a local file of any size (a model, its weights), read in 1 MiB blocks, not all at once."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Location) -> str:
    """sha256_hex of a catalog file's bytes, read by read_file (same errors)."""
    return sha256_hex(read_file(path))


def check_destination(out: Path, source: Path, source_kind: str = "model") -> None:
    """TaggerError unless a file derived from `source` may be written at `out`: not a folder, not `source` itself."""
    if out.is_dir():
        raise TaggerError(f"output {out} is a directory; give a file name such as {out / 'model.onnx'}")
    check_not_input(out, source, source_kind)


def check_not_input(out: Location, source: Location, source_kind: str) -> None:
    """TaggerError when `out` is the file `source` (by any name: links, relative paths): writing would destroy it."""
    if same_file(out, source):
        raise TaggerError(f"output {redact(out)} is the {source_kind} itself; choose another name")


def same_file(a: Location, b: Location) -> bool:
    """Whether two paths name one file: the same inode when both exist (hard links too), else the same resolved path;
    two URIs the same object (a URI and a local path never)."""
    if is_uri(a) or is_uri(b):
        return is_uri(a) and is_uri(b) and _object_id(str(a)) == _object_id(str(b))
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _object_id(uri: str) -> tuple[object, ...]:
    """What names one object: scheme, host, port and decoded path (not the user info or query it is reached with)."""
    return (*_place(uri)[:3], _split(uri)[1])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename in `path` durable: without this a power loss can undo it, or keep the name but not the data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def reserve_temp(out: Location, tmp_dir: Location | None = None) -> Path:
    """Create the temp file for `out` now (beside it, or in tmp_dir on the same file system), so the final rename
    stays on one file system and an unwritable destination fails before any expensive work. For an object: a file
    in the system's temp folder, uploaded by publish."""
    name = name_of(out)
    if is_uri(out):
        folder: Location | None = tmp_dir if tmp_dir is not None and not is_uri(tmp_dir) else None
    else:
        folder = tmp_dir or Path(out).parent
    try:
        fd, name = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise TaggerError(f"cannot write {redact(out)}: {_why(e, out)}") from None
    os.close(fd)
    return Path(name)


def reserve_temp_dir(out: Path) -> Path:
    """A hidden temp folder beside `out`, to fill with files and then publish as `out` (absent or empty)."""
    try:
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise TaggerError(f"cannot write {out}: {one_line(e)}") from None


def publish(tmp: Path, out: Location) -> None:
    """Move a complete temp file (file or folder) onto `out` durably, with the mode a new one would get.

    Files are fsynced before the rename and the folder after it, so after a power loss `out` is either what it was
    or the complete new one. mkstemp/mkdtemp create owner-only entries; the runtime may run as another user, so
    the umask decides, as for any new file.

    An object is uploaded from the finished file (see _upload) and only the store's answer says it is there:
    a refused or failed upload is a TaggerError and the previous object stays.
    """
    if is_uri(out):
        try:
            check_names_file(out, "output")
            _upload(tmp, str(out))
        finally:
            discard(tmp)
        return
    out = Path(out)
    try:
        if tmp.is_dir():
            tmp.chmod(0o777 & ~_umask())
            for entry in tmp.iterdir():
                _fsync_file(entry)
            fsync_dir(tmp)
            if out.is_dir():
                out.rmdir()  # only an empty folder can be replaced; callers check that before the run
        else:
            tmp.chmod(0o666 & ~_umask())
            _fsync_file(tmp)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except OSError as e:
        discard(tmp)
        raise TaggerError(f"cannot write {out}: {one_line(e)}") from None


UPLOAD_IN_ONE_WRITE = 64 << 20  # bytes: a file up to this size is uploaded from memory, in one write


def _put(fs: pafs.FileSystem, key: str, data: bytes) -> None:
    """Write `data` as the whole object `key` and close the stream ourselves: close() is where the store answers
    (a delayed or multipart upload is sent or completed there), and a destructor would only log its error. All of
    `data` goes in one write, so whatever interrupts us, the object is complete or absent."""
    f = fs.open_output_stream(key)
    try:
        f.write(data)
    finally:
        f.close()


def _upload(tmp: Path, out: str) -> None:
    """Upload a finished local file as the object `out`, verified by the store's answer (TaggerError otherwise).

    Up to UPLOAD_IN_ONE_WRITE bytes: one write of the whole file (_put). Larger: streamed to a hidden staging
    object beside it, then copied server-side onto `out` in one call (CopyObject, up to 5 GB) and the staging object
    deleted: a stream interrupted halfway can only ever complete the staging object, never `out`.
    """
    fs, path = _fs(out)
    try:
        size = tmp.stat().st_size
        if size <= UPLOAD_IN_ONE_WRITE:
            data = tmp.read_bytes()
            _retrying(out, "write", lambda: _put(fs, path, data))
            return
        head, _, name = path.rpartition("/")
        staging = f"{head}/.{name}.{uuid.uuid4().hex}.upload.tmp"

        def stream() -> None:
            with open(tmp, "rb") as src:
                f = fs.open_output_stream(staging)
                try:
                    for block in iter(lambda: src.read(8 << 20), b""):
                        f.write(block)
                finally:
                    f.close()

        try:
            _retrying(out, "write", stream)
            _retrying(out, "write", lambda: fs.copy_file(staging, path))
        finally:
            # Retried a little only: the store may be what failed. A staging object left behind is hidden.
            with contextlib.suppress(OSError, pa.ArrowException, TaggerError), hurry(CLEANUP_SECONDS):
                _retrying(out, "remove", lambda: fs.delete_file(staging))
    except (OSError, pa.ArrowException) as e:
        raise TaggerError(f"cannot write {redact(out)}: {_why(e, out)}") from None


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def discard(tmp: Path) -> None:
    """Remove a temp file or folder that will not be published."""
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def publishing(out: Location, tmp_dir: Location | None = None) -> Iterator[Path]:
    """Yield a temp path to write `out` to; publish it when the block ends normally, remove it otherwise."""
    out = as_location(out)
    tmp = reserve_temp(out, tmp_dir)
    try:
        yield tmp
    except BaseException:
        discard(tmp)
        raise
    publish(tmp, out)


def publish_bytes(out: Location, data: bytes, tmp_dir: Location | None = None) -> None:
    """Write `data` as the whole of `out`, atomically and durably: an object in one write, answered by the store."""
    if is_uri(out):
        check_names_file(out, "output")
        fs, path = _fs(str(out))
        try:
            _retrying(out, "write", lambda: _put(fs, path, data))
        except (OSError, pa.ArrowException) as e:
            raise TaggerError(f"cannot write {redact(out)}: {_why(e, out)}") from None
        return
    with publishing(out, tmp_dir) as tmp:
        try:
            tmp.write_bytes(data)
        except OSError as e:
            raise TaggerError(f"cannot write {redact(out)}: {_why(e, out)}") from None


def make_folder(loc: Location) -> None:
    """Create a local folder (parents must exist); nothing for an object store, whose folders are key prefixes."""
    if not is_uri(loc):
        Path(loc).mkdir(exist_ok=True)


def list_names(folder: Location) -> list[str]:
    """The names of the files directly in a folder (or below a key prefix), sorted; [] when there is none.
    TaggerError (redacted) when a key prefix cannot be listed (403, no server)."""
    if not is_uri(folder):
        try:
            return sorted(e.name for e in os.scandir(folder) if e.is_file())
        except FileNotFoundError:
            return []
    return sorted(i.base_name for i in _list_prefix(folder) if i.type == pafs.FileType.File)


def list_entries(folder: Location) -> list[str] | None:
    """Every name directly in a folder (files, folders, links) or directly below a key prefix, sorted; [] when there
    is nothing there; None when a local `folder` is something else (a file, or a symbolic link: never followed)."""
    if not is_uri(folder):
        try:
            if not stat.S_ISDIR(os.lstat(folder).st_mode):
                return None
            return sorted(os.listdir(folder))
        except (FileNotFoundError, NotADirectoryError):  # nothing there (making it says why it cannot be)
            return []
        except OSError as e:
            raise TaggerError(f"cannot list {folder}: {one_line(e)}") from None
    return sorted(i.base_name for i in _list_prefix(folder))


def _list_prefix(folder: Location) -> list[pafs.FileInfo]:
    """What lies directly below a key prefix; TaggerError (redacted) when it cannot be listed (403, no server)."""
    fs, path = _fs(str(folder))
    selector = pafs.FileSelector(path.rstrip("/"), recursive=False, allow_not_found=True)
    try:
        infos: list[pafs.FileInfo] = _retrying(folder, "list", lambda: fs.get_file_info(selector))
    except (OSError, pa.ArrowException) as e:
        raise TaggerError(f"cannot list {redact(folder)}: {_why(e, folder)}") from None
    return infos


def remove(loc: Location) -> None:
    """Delete a file or object; nothing when it is already gone; TaggerError (redacted) when an object cannot be."""
    if not is_uri(loc):
        Path(loc).unlink(missing_ok=True)
        return
    fs, path = _fs(str(loc))
    try:
        _retrying(loc, "remove", lambda: fs.delete_file(path))
    except FileNotFoundError:
        pass
    except (OSError, pa.ArrowException) as e:
        raise TaggerError(f"cannot remove {redact(loc)}: {_why(e, loc)}") from None


def remove_tree(loc: Location) -> None:
    """Delete a folder (or every object below a key prefix) and what it holds, as far as possible."""
    if not is_uri(loc):
        shutil.rmtree(loc, ignore_errors=True)
        return
    fs, path = _fs(str(loc))
    with contextlib.suppress(OSError, TaggerError):  # delete_dir: also the folder marker S3 leaves
        _retrying(loc, "remove", lambda: fs.delete_dir(path))


LOCK_LEASE_S = 900.0  # an object lock not refreshed for this long belongs to a dead run


class Lock:
    """Keeps two runs off one output: taken on a folder (OUT.work/), released by release().

    Local: flock on folder/lock, released by the kernel however the process ends; exclusive and atomic.

    Object store: pyarrow.fs has no conditional put, so this is best effort, not atomic: the lock object
    (token, host, pid, expiry) is written, then read back to see that this run's token won. Two runs starting within
    one round trip of each other can both read back their own token (the later write wins at the store, and the
    earlier run only finds out at its next refresh). A lock of a dead run is taken over when its lease (LOCK_LEASE_S,
    renewed by refresh()) has run out, or at once when it names this host and a pid that no longer runs.
    """

    def __init__(self, folder: Location, what: str) -> None:
        self.folder, self.what = folder, what
        self._fd: int | None = None
        self._token = uuid.uuid4().hex
        self._refreshed = 0.0
        if is_uri(folder):
            self._take_object()
        else:
            self._take_flock()

    def _take_flock(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; keeping two runs off one output is up to the scheduler
            return
        path = Path(self.folder) / "lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise TaggerError(f"cannot write output {self.what}: {one_line(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TaggerError(f"another tagger run is writing {self.what} (it holds {path})") from None
        self._fd = fd

    def _object(self) -> str:
        return str(join(self.folder, "lock"))

    def _holder(self) -> dict[str, object] | None:
        """The lock object's content; None when there is none or it is not ours to read (torn, not JSON).
        TaggerError when the store refuses the read (credentials, no bucket): that is the cause to name."""
        try:
            data = json.loads(read_file(self._object()))
        except FileNotFoundError:
            return None
        except OSError as e:
            raise TaggerError(f"cannot write output {self.what}: {_why(e, self._object())}") from None
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def _take_object(self) -> None:
        holder = self._holder()
        if holder is not None and holder.get("token") != self._token and not _dead(holder):
            raise TaggerError(
                f"another tagger run is writing {self.what} (pid {holder.get('pid')} on {holder.get('host')} holds "
                f"{redact(self._object())} until its lease runs out)"
            )
        self.refresh()
        holder = self._holder()
        if holder is None or holder.get("token") != self._token:
            raise TaggerError(f"another tagger run took the lock on {self.what} at the same time; try again")

    def refresh(self) -> None:
        """Renew an object lock's lease (called as the run commits); nothing for a local flock."""
        if not is_uri(self.folder):
            return
        self._refreshed = time.monotonic()
        info = {"token": self._token, "host": socket.gethostname(), "pid": os.getpid(),
                "expires": time.time() + LOCK_LEASE_S}  # fmt: skip
        publish_bytes(self._object(), json.dumps(info).encode())

    def refresh_due(self) -> bool:
        return is_uri(self.folder) and time.monotonic() - self._refreshed > LOCK_LEASE_S / 3

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        elif is_uri(self.folder):
            try:
                holder = self._holder()
                if holder is not None and holder.get("token") == self._token:
                    remove(self._object())
            except (OSError, TaggerError) as e:  # the store is down or refuses: the lease runs out by itself
                log.warning("could not release the lock %s: %s", redact(self._object()), e)


def _dead(holder: dict[str, object]) -> bool:
    """Whether an object lock's run is gone: its lease ran out, or it names this host and a pid not running."""
    expires = holder.get("expires")
    if not isinstance(expires, (int, float)) or expires < time.time():
        return True
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(int(holder["pid"]), 0)  # type: ignore[call-overload]
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


__all__ = [
    "AmbiguousKey",
    "BadURI",
    "Entry",
    "DEFAULT_STORE_TIMEOUT",
    "LOCK_LEASE_S",
    "STORE_TIMEOUT_ENV",
    "StoreUnavailable",
    "TRANSIENT_PATTERN",
    "Location",
    "Lock",
    "NotARegularFile",
    "abort_fast",
    "aborting",
    "absolute",
    "arrow_source",
    "as_location",
    "exists",
    "exit_if_stuck",
    "has_dot_segments",
    "has_latency",
    "hurry",
    "is_folder",
    "is_transient",
    "is_uri",
    "join",
    "list_entries",
    "list_files",
    "list_names",
    "make_folder",
    "name_of",
    "redact",
    "relative_key",
    "remove",
    "remove_tree",
    "stat_file",
    "stop_waiting",
    "store_timeout",
    "with_suffix_name",
    "CLEANUP_SECONDS",
    "check_destination",
    "check_not_input",
    "discard",
    "file_sha256",
    "fsync_dir",
    "publish",
    "publish_bytes",
    "publishing",
    "read_file",
    "reserve_temp",
    "reserve_temp_dir",
    "same_file",
    "sha256_file",
    "sha256_hex",
]
