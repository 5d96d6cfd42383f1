"""Local files: FIFO-safe reads, publishing by fsync and rename, flock; a Store over the local file system."""

from __future__ import annotations

import builtins
import logging
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import pyarrow.fs as pafs

from tagger.errors import TaggerError, UsageError, one_line
from tagger.storage.base import MISSING_SIZE, Entry, NotARegularFile, StoreLock
from tagger.storage.uri import Location

log = logging.getLogger(__name__)

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


_LOOKS_ESCAPED = re.compile(r"\\(?=x[0-9A-Fa-f]{2})")  # a literal backslash that would read as the start of \xNN


def path_text(name: str) -> str:
    """An os name (str, undecodable bytes as surrogateescape's surrogates) as the text of a row's path: each
    undecodable byte written as the four characters \\xNN, and a literal backslash that is followed by x and two hex
    digits written as \\x5c, so every \\xNN in a path is the escape of one byte and two names never share a path.
    Other names (valid UTF-8, no such backslash) are unchanged; the text is the same on every run, so rows,
    incremental reuse and shard hashes stay stable."""
    if "\\" in name:
        name = _LOOKS_ESCAPED.sub(r"\\x5c", name)
    if name.isascii():
        return name
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _listing(
    abs_dir: str, rel_dir: str, seen: set[tuple[int, int]]
) -> list[tuple[str, os.DirEntry[str], bool]] | None:
    """(relative path, entry, is a folder) of a folder's visible entries in walk order; None when the folder was
    walked already. Raises OSError when it cannot be listed."""
    st = os.stat(abs_dir)
    key = (st.st_dev, st.st_ino)
    if key in seen:
        log.warning("skipping %s: folder already walked (symlink loop or duplicate link)", abs_dir)
        return None
    seen.add(key)
    with os.scandir(abs_dir) as it:
        entries = [e for e in it if not e.name.startswith(".")]
    # A folder sorts as name + '/', which makes the depth-first walk emit paths in global string order.
    keyed: list[tuple[str, str, os.DirEntry[str], bool]] = []
    for entry in entries:
        try:
            is_dir = entry.is_dir()  # follows symlinks
        except OSError:
            is_dir = False
        name = path_text(entry.name)
        keyed.append((name + "/" if is_dir else name, name, entry, is_dir))
    keyed.sort(key=lambda k: k[0])
    return [(rel_dir + name, entry, is_dir) for _, name, entry, is_dir in keyed]


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


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def temp_file(name: str, folder: Location | None, shown: str) -> Path:
    """A new hidden temp file named after `name` in `folder` (None: the system's); TaggerError naming `shown`."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise TaggerError(f"cannot write {shown}: {one_line(e)}") from None
    os.close(fd)
    return Path(tmp)


def reserve_temp_dir(out: Path) -> Path:
    """A hidden temp folder beside `out`, to fill with files and then publish as `out` (absent or empty)."""
    try:
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise TaggerError(f"cannot write {out}: {one_line(e)}") from None


def discard(tmp: Path) -> None:
    """Remove a temp file or folder that will not be published."""
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


class FileLock:
    """flock on folder/lock, released by the kernel however the process ends; exclusive and atomic. Windows has
    no advisory locks: keeping two runs off one output is up to the scheduler there."""

    def __init__(self, folder: Path, what: str) -> None:
        self._fd: int | None = None
        try:
            import fcntl
        except ImportError:
            return
        path = folder / "lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise TaggerError(f"cannot write output {what}: {one_line(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TaggerError(f"another tagger run is writing {what} (it holds {path})") from None
        self._fd = fd

    def refresh(self) -> None:
        """Nothing to renew: the kernel holds a flock as long as the process lives."""

    def refresh_due(self) -> bool:
        return False

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class LocalStore:
    """The local file system: keys are Paths."""

    remote = False

    def redact(self, key: Location) -> str:
        return os.fspath(key)

    def absolute(self, key: Location) -> str:
        return os.path.realpath(key)

    def join(self, key: Location, name: str) -> Path:
        return Path(key) / name

    def sibling(self, key: Location, suffix: str) -> Path:
        p = Path(key)
        return p.with_name(p.name + suffix)

    def name(self, key: Location) -> str:
        return Path(key).name

    def check_names_file(self, key: Location, what: str) -> None:
        if self.name(key) in ("", ".", ".."):
            raise UsageError(f"{what} must name a file, got {os.fspath(key)!r}")

    def same(self, a: Location, b: Location) -> bool:
        """The same inode when both exist (hard links too), else the same resolved path."""
        try:
            return os.path.samefile(a, b)
        except OSError:
            return os.path.realpath(a) == os.path.realpath(b)

    def relative(self, root: Location, key: Location) -> str | None:
        """As written (absolute, not resolved), in the walk's text (path_text); '.' for the root itself."""
        rel = os.path.relpath(os.path.abspath(key), os.path.abspath(root))
        if rel == os.pardir or rel.startswith(os.pardir + os.sep):
            return None
        return path_text(Path(rel).as_posix())

    def resolve(self, key: Location) -> Path:
        return Path(os.path.realpath(key))

    def locate(self, root: Location, name: str) -> Path:
        return Path(os.path.normpath(os.path.join(os.path.abspath(root), name)))  # join keeps an absolute name

    def exists(self, key: Location) -> bool:
        return os.path.exists(key)

    def is_folder(self, key: Location) -> bool:
        return os.path.isdir(key)

    def list(self, key: Location, keep: Callable[[str], bool]) -> Iterator[Entry]:
        """Symlinked folders are followed once: a folder already being walked (a loop) or already walked through
        another link is skipped, so no file appears twice. A folder that cannot be listed (permissions, a path too
        long, an I/O error) is one Entry with `unlistable` set, never a silent drop. A generator with a stack, not
        recursion: millions of files stream without being listed first, at any depth."""
        if not Path(key).is_dir():
            raise TaggerError(f"catalog {os.fspath(key)} is not a folder")
        seen: set[tuple[int, int]] = set()
        try:
            top = _listing(os.fspath(key), "", seen)
        except OSError as e:
            raise TaggerError(f"cannot list catalog {os.fspath(key)}: {one_line(e)}") from None
        # One listing per open folder.
        stack: builtins.list[Iterator[tuple[str, os.DirEntry[str], bool]]] = [iter(top or [])]
        while stack:
            item = next(stack[-1], None)
            if item is None:
                stack.pop()
                continue
            rel, entry, is_dir = item
            if is_dir:
                try:
                    listing = _listing(entry.path, rel + "/", seen)
                except OSError as e:
                    log.warning("cannot list folder %s/: %s", rel, one_line(e))
                    yield Entry(rel + "/", entry.path, MISSING_SIZE, float("nan"), one_line(e, named=True))
                    continue
                if listing is not None:
                    stack.append(iter(listing))
                continue
            if not keep(rel):
                continue
            try:
                est = entry.stat()
            except OSError:  # a dangling symlink: still a listed file, so it becomes an error row
                yield Entry(rel, entry.path, MISSING_SIZE, float("nan"))
                continue
            # A FIFO, socket or device under an image name is listed too: read refuses it (NotARegularFile)
            # without opening it for reading.
            yield Entry(rel, entry.path, est.st_size, est.st_mtime)

    def stat(self, key: Location) -> tuple[int, float]:
        st = os.stat(key)
        return st.st_size, st.st_mtime

    def read(self, key: Location) -> bytes:
        """Checked with stat before opening, and opened non-blocking and checked again on the descriptor, so a path
        swapped for a FIFO in between cannot block either (a non-blocking open of a FIFO returns at once; a socket
        fails)."""
        _check_regular(os.stat(key).st_mode)
        fd = os.open(key, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with open(fd, "rb", buffering=0) as f:
            _check_regular(os.fstat(fd).st_mode)
            return f.readall()

    def open(self, key: Location) -> BinaryIO:
        return open(key, "rb")

    def names(self, key: Location) -> builtins.list[str]:
        try:
            return sorted(e.name for e in os.scandir(key) if e.is_file())
        except FileNotFoundError:
            return []

    def entries(self, key: Location) -> builtins.list[str] | None:
        """Symbolic links are never followed: a link where a folder should be is None."""
        try:
            if not stat.S_ISDIR(os.lstat(key).st_mode):
                return None
            return sorted(os.listdir(key))
        except (FileNotFoundError, NotADirectoryError):  # nothing there (making it says why it cannot be)
            return []
        except OSError as e:
            raise TaggerError(f"cannot list {os.fspath(key)}: {one_line(e)}") from None

    def make_folder(self, key: Location) -> None:
        Path(key).mkdir(exist_ok=True)

    def reserve_temp(self, key: Location, tmp_dir: Location | None = None) -> Path:
        """Beside `key` (or in tmp_dir, on the same file system), so the final rename stays on one file system and
        an unwritable destination fails before any expensive work."""
        return temp_file(self.name(key), tmp_dir or Path(key).parent, os.fspath(key))

    def publish(self, tmp: Path, key: Location) -> None:
        """Files are fsynced before the rename and the folder after it, so after a power loss `key` is either what
        it was or the complete new one. mkstemp/mkdtemp create owner-only entries; the runtime may run as another
        user, so the umask decides the mode, as for any new file."""
        out = Path(key)
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

    def publish_bytes(self, key: Location, data: bytes, tmp_dir: Location | None = None) -> None:
        tmp = self.reserve_temp(key, tmp_dir)
        try:
            tmp.write_bytes(data)
        except OSError as e:
            discard(tmp)
            raise TaggerError(f"cannot write {os.fspath(key)}: {one_line(e)}") from None
        self.publish(tmp, key)

    def remove(self, key: Location) -> None:
        Path(key).unlink(missing_ok=True)

    def remove_tree(self, key: Location) -> None:
        shutil.rmtree(key, ignore_errors=True)

    def lock(self, key: Location, what: str) -> StoreLock:
        return FileLock(Path(key), what)

    def arrow_source(self, key: Location) -> tuple[str, pafs.FileSystem | None]:
        return os.fspath(key), None
