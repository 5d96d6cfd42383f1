"""The Store protocol: what every backend (local files, pyarrow.fs object stores) does for the rest of tagger."""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Protocol

import pyarrow.fs as pafs

from tagger.storage.uri import Location


MISSING_SIZE = -1  # Entry.size of a listed file that could not be stat'ed


@dataclass(frozen=True)
class Entry:
    """A file found by Store.list: its path below the listed root (posix), its location, size and mtime; or a
    folder that could not be listed (rel 'sub/', `unlistable` the reason, one line)."""

    rel: str
    location: str
    size: int  # bytes; MISSING_SIZE when the file could not be stat'ed
    mtime: float  # seconds since the epoch; an object's LastModified (1 s granularity); NaN when missing
    unlistable: str | None = None


class NotARegularFile(OSError):
    """A catalog path that names a FIFO, socket, device or folder: never read (a FIFO would block forever)."""


class AmbiguousKey(OSError):
    """An object whose key has a '.' or '..' component: reading it would read another object (HTTP clients collapse
    such segments), so it is an error row, never read."""


class StoreLock(Protocol):
    """Keeps two runs off one output folder until release()."""

    def refresh(self) -> None: ...

    def refresh_due(self) -> bool: ...

    def release(self) -> None: ...


class Store(Protocol):
    """Where files live. A key is what open_location resolved a location to (a Path, a URI); a new backend is one
    class with these methods. Errors: OSError for one file's trouble (its row), TaggerError for the run's
    (redacted), StoreUnavailable when the store stops answering."""

    remote: bool  # a read costs a network round trip (worth reading ahead); folders are key prefixes

    def redact(self, key: Location) -> str:
        """How `key` may be shown: never with credentials."""

    def absolute(self, key: Location) -> str:
        """What a run records (tagger.output.catalog, ...): a local path resolved, a URI redacted."""

    def join(self, key: Location, name: str) -> str | Path:
        """`key`/`name` (name: a relative posix path)."""

    def sibling(self, key: Location, suffix: str) -> str | Path:
        """A sibling of `key` named its name + suffix (OUT -> OUT.work)."""

    def name(self, key: Location) -> str:
        """The last component of `key`'s path ('' when there is none)."""

    def check_names_file(self, key: Location, what: str) -> None:
        """UsageError unless `key` names a file that can be written under its own name."""

    def same(self, a: Location, b: Location) -> bool:
        """Whether two keys of this store name one file."""

    def relative(self, root: Location, key: Location) -> str | None:
        """`key`'s path below `root` (posix), as a listing of root names it; None when it lies outside."""

    def resolve(self, key: Location) -> str | Path:
        """`key` with its links resolved (a walk follows links in)."""

    def locate(self, root: Location, name: str) -> str | Path:
        """Where a name listed for `root` (--files-from) lives: below root, or itself when absolute and local."""

    def exists(self, key: Location) -> bool: ...

    def is_folder(self, key: Location) -> bool:
        """A folder; for a store of keys, whether objects lie below it or it is a bucket."""

    def list(self, key: Location, keep: Callable[[str], bool]) -> Iterator[Entry]:
        """Every file below a folder whose relative path passes `keep` (asked before any stat), sorted by relative
        path (plain string order); a walk need not enter hidden folders (names starting with '.'). TaggerError when
        the folder itself cannot be listed."""

    def stat(self, key: Location) -> tuple[int, float]:
        """(size, mtime) of a file; OSError when it is missing or unreadable."""

    def read(self, key: Location) -> bytes:
        """The whole content of a catalog file; NotARegularFile for anything else; OSError (its row) on error."""

    def open(self, key: Location) -> BinaryIO:
        """A file to read from start to end (a --files-from list, a pipe too)."""

    def names(self, key: Location) -> builtins.list[str]:
        """The names of the files directly in a folder, sorted; [] when there is none."""

    def entries(self, key: Location) -> builtins.list[str] | None:
        """Every name directly in a folder, sorted; None when a local key is no folder (a file, a link)."""

    def make_folder(self, key: Location) -> None: ...

    def reserve_temp(self, key: Location, tmp_dir: Location | None = None) -> Path:
        """A local temp file to write `key` to, then hand to publish; TaggerError when `key` cannot be written."""

    def publish(self, tmp: Path, key: Location) -> None:
        """Move a complete local temp file (or folder) onto `key`, atomically and durably; the temp is gone after."""

    def publish_bytes(self, key: Location, data: bytes, tmp_dir: Location | None = None) -> None:
        """Write `data` as the whole of `key`, atomically and durably."""

    def remove(self, key: Location) -> None:
        """Delete a file; nothing when it is already gone."""

    def remove_tree(self, key: Location) -> None:
        """Delete a folder and what it holds, as far as possible."""

    def lock(self, key: Location, what: str) -> StoreLock:
        """Take the lock on an output folder; TaggerError when another run holds it."""

    def arrow_source(self, key: Location) -> tuple[str, pafs.FileSystem | None]:
        """(path, filesystem) for pyarrow readers; None: a local path."""
