"""Where files live, decided once: open_location(loc) -> (Store, key), then only calls on that store.

Two stores stand behind one protocol (base.Store): the local file system (local.py) and object stores through
pyarrow.fs (arrow.py: s3://, gs://, any URI pyarrow.fs.FileSystem.from_uri understands). A new backend is one new
class and one line in open_location. The functions below take a location, resolve it and call its store; the
publishing of outputs (a temp file made whole, then moved or uploaded at once) lives here only. redact() is how a
location is shown or recorded: never with its credentials.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

from tagger.storage.arrow import ArrowStore
from tagger.storage.base import MISSING_SIZE, AmbiguousKey, Entry, NotARegularFile, Store, StoreLock
from tagger.storage.local import LocalStore, discard, fsync_dir, path_text, reserve_temp_dir
from tagger.storage.lock import LOCK_LEASE_S
from tagger.storage.retry import (
    CLEANUP_SECONDS,
    DEFAULT_STORE_TIMEOUT,
    STORE_TIMEOUT_ENV,
    TRANSIENT_PATTERN,
    StoreUnavailable,
    abort_fast,
    aborting,
    exit_if_stuck,
    hurry,
    is_transient,
    stop_waiting,
    store_timeout,
)
from tagger.storage.uri import BadURI, Location, is_uri, redact

LOCAL: Store = LocalStore()
OBJECTS: Store = ArrowStore()


def open_location(loc: Location) -> tuple[Store, str | Path]:
    """The store `loc` lives in and its key there: a URI (scheme://...) kept as the exact string for the object
    stores, anything else a local Path. The one place that tells them apart."""
    if is_uri(loc):
        return OBJECTS, str(loc)
    return LOCAL, Path(loc)


def as_location(loc: Location) -> str | Path:
    """A URI kept as the exact string, anything else as a Path: what RunConfig and friends hold."""
    return open_location(loc)[1]


def absolute(loc: Location) -> str:
    """The location a run records (tagger.output.catalog, ...): a local path resolved, a URI redacted."""
    store, key = open_location(loc)
    return store.absolute(key)


def join(loc: Location, name: str) -> str | Path:
    """`loc`/`name` (name: a relative posix path, e.g. a key below a catalog prefix)."""
    store, key = open_location(loc)
    return store.join(key, name)


def with_suffix_name(loc: Location, suffix: str) -> str | Path:
    """A sibling of `loc` named its name + suffix (OUT -> OUT.work)."""
    store, key = open_location(loc)
    return store.sibling(key, suffix)


def name_of(loc: Location) -> str:
    """The last component of a location's path ('' for a malformed URI)."""
    store, key = open_location(loc)
    return store.name(key)


def check_names_file(loc: Location, what: str) -> None:
    """UsageError when `loc` names no file to write ('', '/', '.', '..', a bare bucket), or an object whose key has
    '.' or '..' components (the client would write another object: a photo of the catalog, say). The message
    shows `loc` as given ('' stays '')."""
    open_location(loc)[0].check_names_file(loc, what)


def same_file(a: Location, b: Location) -> bool:
    """Whether two locations name one file: the same inode when both exist (hard links too), else the same resolved
    path; two URIs the same object (a URI and a local path never)."""
    (sa, ka), (sb, kb) = open_location(a), open_location(b)
    return sa is sb and sa.same(ka, kb)


def relative_key(root: Location, loc: Location) -> str | None:
    """`loc`'s path below `root`, posix style, when both lie in one store and loc lies under root; else None."""
    (sr, kr), (sl, kl) = open_location(root), open_location(loc)
    return sr.relative(kr, kl) if sr is sl else None


def exists(loc: Location) -> bool:
    """Whether a file or object (or a local folder) is there."""
    store, key = open_location(loc)
    return store.exists(key)


def is_folder(loc: Location) -> bool:
    """A local folder; for a URI, whether objects lie below it (a key prefix) or it is a bucket."""
    store, key = open_location(loc)
    return store.is_folder(key)


def stat_file(loc: Location) -> tuple[int, float]:
    """(size, mtime) of a file or object; OSError when it is missing or unreadable."""
    store, key = open_location(loc)
    return store.stat(key)


def read_file(loc: Location) -> bytes:
    """The whole content of a catalog file; NotARegularFile (an OSError) for anything but a regular file, never
    blocking on a FIFO. An object is read in one call (a HEAD and a GET); its errors (403, deleted) are OSErrors."""
    store, key = open_location(loc)
    return store.read(key)


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


def file_sha256(loc: Location) -> str:
    """sha256_hex of a catalog file's bytes, read by read_file (same errors)."""
    return sha256_hex(read_file(loc))


def arrow_source(loc: Location) -> tuple[str, pafs.FileSystem | None]:
    """(path, filesystem) to hand pyarrow readers (pq.ParquetFile, pq.read_metadata): a local path with None."""
    store, key = open_location(loc)
    return store.arrow_source(key)


def make_folder(loc: Location) -> None:
    """Create a local folder (parents must exist); nothing for an object store, whose folders are key prefixes."""
    store, key = open_location(loc)
    store.make_folder(key)


def list_names(folder: Location) -> list[str]:
    """The names of the files directly in a folder (or below a key prefix), sorted; [] when there is none.
    TaggerError (redacted) when a key prefix cannot be listed (403, no server)."""
    store, key = open_location(folder)
    return store.names(key)


def list_entries(folder: Location) -> list[str] | None:
    """Every name directly in a folder (files, folders, links) or directly below a key prefix, sorted; [] when there
    is nothing there; None when a local `folder` is something else (a file, or a symbolic link: never followed)."""
    store, key = open_location(folder)
    return store.entries(key)


def remove(loc: Location) -> None:
    """Delete a file or object; nothing when it is already gone; TaggerError (redacted) when an object cannot be."""
    store, key = open_location(loc)
    store.remove(key)


def remove_tree(loc: Location) -> None:
    """Delete a folder (or every object below a key prefix) and what it holds, as far as possible."""
    store, key = open_location(loc)
    store.remove_tree(key)


def reserve_temp(out: Location, tmp_dir: Location | None = None) -> Path:
    """Create the temp file for `out` now (beside it, or in tmp_dir on the same file system), so the final rename
    stays on one file system and an unwritable destination fails before any expensive work. For an object: a file
    in the system's temp folder, uploaded by publish."""
    store, key = open_location(out)
    return store.reserve_temp(key, tmp_dir)


def publish(tmp: Path, out: Location) -> None:
    """Move a complete temp file (file or folder) onto `out` durably, with the mode a new one would get: after a
    power loss `out` is either what it was or the complete new one. An object is uploaded from the finished file,
    and only the store's answer says it is there: a refused or failed upload is a TaggerError and the previous
    object stays."""
    store, key = open_location(out)
    store.publish(tmp, key)


@contextlib.contextmanager
def publishing(out: Location, tmp_dir: Location | None = None) -> Iterator[Path]:
    """Yield a temp path to write `out` to; publish it when the block ends normally, remove it otherwise. The one
    shape of an atomic write: every output, model and report goes through it (or publish_bytes)."""
    store, key = open_location(out)
    tmp = store.reserve_temp(key, tmp_dir)
    try:
        yield tmp
    except BaseException:
        discard(tmp)
        raise
    store.publish(tmp, key)


def publish_bytes(out: Location, data: bytes, tmp_dir: Location | None = None) -> None:
    """Write `data` as the whole of `out`, atomically and durably: an object in one write, answered by the store."""
    store, key = open_location(out)
    store.publish_bytes(key, data, tmp_dir)


class Lock:
    """Keeps two runs off one output: taken on a folder (OUT.work/) by its store, released by release(). Local: a
    flock, exclusive and atomic. Object store: a best-effort lease lock object (lock.LeaseLock: not atomic)."""

    def __init__(self, folder: Location, what: str) -> None:
        store, key = open_location(folder)
        self._held = store.lock(key, what)

    def refresh(self) -> None:
        """Renew an object lock's lease (called as the run commits); nothing for a local flock."""
        self._held.refresh()

    def refresh_due(self) -> bool:
        return self._held.refresh_due()

    def release(self) -> None:
        self._held.release()


__all__ = [
    "AmbiguousKey",
    "BadURI",
    "CLEANUP_SECONDS",
    "DEFAULT_STORE_TIMEOUT",
    "Entry",
    "LOCAL",
    "LOCK_LEASE_S",
    "Location",
    "Lock",
    "MISSING_SIZE",
    "NotARegularFile",
    "OBJECTS",
    "STORE_TIMEOUT_ENV",
    "Store",
    "StoreLock",
    "StoreUnavailable",
    "TRANSIENT_PATTERN",
    "abort_fast",
    "aborting",
    "absolute",
    "arrow_source",
    "as_location",
    "discard",
    "exists",
    "exit_if_stuck",
    "file_sha256",
    "fsync_dir",
    "hurry",
    "is_folder",
    "is_transient",
    "join",
    "list_entries",
    "list_names",
    "make_folder",
    "name_of",
    "open_location",
    "path_text",
    "publish",
    "publish_bytes",
    "publishing",
    "read_file",
    "redact",
    "relative_key",
    "remove",
    "remove_tree",
    "reserve_temp",
    "reserve_temp_dir",
    "same_file",
    "sha256_file",
    "sha256_hex",
    "stat_file",
    "stop_waiting",
    "store_timeout",
    "with_suffix_name",
]
