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
import os
import re
import shutil
import socket
import stat
import tempfile
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

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
    scheme, host, port, path = _place(str(loc))
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
    u = urllib.parse.urlsplit(str(loc))
    secrets = [u.username, u.password, u.query] + [v for _, v in urllib.parse.parse_qsl(u.query)]
    for secret in sorted((s for s in secrets if s and len(s) > 2), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def absolute(loc: Location) -> str:
    """The location a run records (tagger.output.catalog, ...): a local path resolved, a URI redacted."""
    return redact(loc) if is_uri(loc) else os.path.realpath(loc)


def _split(uri: str) -> tuple[str, str, str]:
    """(scheme://authority, path without leading '/', query) of a URI; the path percent-decoded."""
    u = urllib.parse.urlsplit(uri)
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
    """The last component of a location's path."""
    return _split(str(loc))[1].rstrip("/").rsplit("/", 1)[-1] if is_uri(loc) else Path(loc).name


def check_names_file(loc: Location, what: str) -> None:
    """UsageError when `loc` names no file to write ('', '/', '.', '..', a bare bucket): `what` must name a file."""
    if name_of(loc) in ("", ".", ".."):
        raise UsageError(f"{what} must name a file, got {redact(loc)!r}")


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


@functools.lru_cache(maxsize=16)
def _filesystem(base: str, query: str) -> tuple[pafs.FileSystem, str]:
    """One filesystem per store and options, per process (clients hold connection pools and credentials).

    Credentials come from the standard chains (AWS env vars, ~/.aws profiles, instance roles, AWS_ENDPOINT_URL;
    GCS application default credentials) unless the URI carries them. S3: allow_delayed_open makes a small object
    one PUT instead of create + upload part + complete (3 round trips); errors still surface at close, inside the
    same call here.
    """
    options = urllib.parse.parse_qs(query)
    if base.startswith("s3://") and "allow_delayed_open" not in options:
        query = (query + "&" if query else "") + "allow_delayed_open=true"
    fs, root = pafs.FileSystem.from_uri(f"{base}/?{query}" if query else f"{base}/")
    return fs, root.rstrip("/")  # s3://bkt/ -> 'bkt', file:/// -> ''


def _fs(loc: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path in it) of a URI (an S3 or GCS path starts with the bucket); TaggerError (redacted) when
    pyarrow does not understand it."""
    base, path, query = _split(loc)
    try:
        fs, root = _filesystem(base, query)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise TaggerError(f"cannot open {redact(loc)}: {_why(e, loc)}") from None
    return fs, f"{root}/{path}" if root or base.startswith("file:") else path


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
        infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=False))
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
    fs, path = _fs(str(loc))
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(2, "No such object")
    return info.size, (info.mtime_ns or 0) / 1e9


def exists(loc: Location) -> bool:
    """Whether a file or object (or a local folder) is there."""
    if not is_uri(loc):
        return os.path.exists(loc)
    fs, path = _fs(str(loc))
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except (OSError, pa.ArrowException) as e:
        raise TaggerError(f"cannot read {redact(loc)}: {_why(e, loc)}") from None


def is_folder(loc: Location) -> bool:
    """A local folder; for a URI, whether objects lie below it (a key prefix) or it is a bucket."""
    if not is_uri(loc):
        return os.path.isdir(loc)
    fs, path = _fs(str(loc))
    try:
        return fs.get_file_info(path).type == pafs.FileType.Directory
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
        fs, key = _fs(str(path))
        with fs.open_input_stream(key, compression=None) as f:  # never 'detect': a photo named x.gz stays bytes
            data: bytes = f.read()
            return data
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

    An object is uploaded from the finished file in one call (pyarrow's copy, in C++: a large file goes as one
    multipart upload, completed only once every part is sent, and a completed upload is atomic). Nothing is ever
    streamed from Python into an open object stream: its destructor would complete a half-written upload.
    """
    if is_uri(out):
        fs, path = _fs(str(out))
        try:
            pafs.copy_files(str(tmp), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        except (OSError, pa.ArrowException) as e:
            raise TaggerError(f"cannot write {redact(out)}: {_why(e, out)}") from None
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
    """Write `data` as the whole of `out`, atomically and durably. An object too goes through a finished temp file
    and publish's one-call upload: a write failing in an open object stream could still complete a partial object."""
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
    fs, path = _fs(str(folder))
    try:
        infos = fs.get_file_info(pafs.FileSelector(path.rstrip("/"), recursive=False, allow_not_found=True))
    except (OSError, pa.ArrowException) as e:
        raise TaggerError(f"cannot list {redact(folder)}: {_why(e, folder)}") from None
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)


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
    fs, path = _fs(str(folder))
    try:
        infos = fs.get_file_info(pafs.FileSelector(path.rstrip("/"), recursive=False, allow_not_found=True))
    except (OSError, pa.ArrowException) as e:
        raise TaggerError(f"cannot list {redact(folder)}: {_why(e, folder)}") from None
    return sorted(i.base_name for i in infos)


def remove(loc: Location) -> None:
    """Delete a file or object; nothing when it is already gone; TaggerError (redacted) when an object cannot be."""
    if not is_uri(loc):
        Path(loc).unlink(missing_ok=True)
        return
    fs, path = _fs(str(loc))
    try:
        fs.delete_file(path)
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
    with contextlib.suppress(OSError):  # delete_dir: also the folder marker S3 leaves once its last object goes
        fs.delete_dir(path)


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
        try:
            data = json.loads(read_file(self._object()))
        except (OSError, ValueError):
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
            holder = self._holder()
            if holder is not None and holder.get("token") == self._token:
                with contextlib.suppress(OSError, TaggerError):
                    remove(self._object())


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
    "Entry",
    "LOCK_LEASE_S",
    "Location",
    "Lock",
    "NotARegularFile",
    "absolute",
    "arrow_source",
    "as_location",
    "exists",
    "has_latency",
    "is_folder",
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
    "with_suffix_name",
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
