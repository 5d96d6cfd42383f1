"""Where files live: the one way tagger reads a catalog file's bytes, and the one way it publishes a file (temp file
beside it, fsync, rename, fsync the folder)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator

from tagger.errors import TaggerError, one_line


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


def read_file(path: str | os.PathLike[str]) -> bytes:
    """The whole content of a catalog file; NotARegularFile (an OSError) for anything but a regular file.

    Checked with stat before opening, and opened non-blocking and checked again on the descriptor, so a path swapped
    for a FIFO in between cannot block either (a non-blocking open of a FIFO returns at once; a socket fails).
    """
    _check_regular(os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with open(fd, "rb", buffering=0) as f:
        _check_regular(os.fstat(fd).st_mode)
        return f.readall()


def sha256_hex(data: bytes) -> str:
    """The digest tagger records for a file's bytes (the output's sha256 column): hex SHA-256."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256_hex of a catalog file's bytes, read by read_file (same errors)."""
    return sha256_hex(read_file(path))


def check_destination(out: Path, source: Path, source_kind: str = "model") -> None:
    """TaggerError unless a file derived from `source` may be written at `out`: not a folder, not `source` itself."""
    if out.is_dir():
        raise TaggerError(f"output {out} is a directory; give a file name such as {out / 'model.onnx'}")
    check_not_input(out, source, source_kind)


def check_not_input(out: Path, source: Path, source_kind: str) -> None:
    """TaggerError when `out` is the file `source` (by any name: links, relative paths): writing would destroy it."""
    if same_file(out, source):
        raise TaggerError(f"output {out} is the {source_kind} itself; choose another name")


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name one file: the same inode when both exist (hard links too), else the same resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


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


def reserve_temp(out: Path, tmp_dir: str | os.PathLike[str] | None = None) -> Path:
    """Create the temp file for `out` now (beside it, or in tmp_dir on the same file system), so the final rename
    stays on one file system and an unwritable destination fails before any expensive work."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=tmp_dir or out.parent)
    except OSError as e:
        raise TaggerError(f"cannot write {out}: {one_line(e)}") from None
    os.close(fd)
    return Path(name)


def reserve_temp_dir(out: Path) -> Path:
    """A hidden temp folder beside `out`, to fill with files and then publish as `out` (absent or empty)."""
    try:
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise TaggerError(f"cannot write {out}: {one_line(e)}") from None


def publish(tmp: Path, out: Path) -> None:
    """Move a complete temp file (file or folder) onto `out` durably, with the mode a new one would get.

    Files are fsynced before the rename and the folder after it, so after a power loss `out` is either what it was
    or the complete new one. mkstemp/mkdtemp create owner-only entries; the runtime may run as another user, so
    the umask decides, as for any new file.
    """
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
def publishing(out: str | os.PathLike[str], tmp_dir: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """Yield a temp path to write `out` to; publish it when the block ends normally, remove it otherwise."""
    out = Path(out)
    tmp = reserve_temp(out, tmp_dir)
    try:
        yield tmp
    except BaseException:
        discard(tmp)
        raise
    publish(tmp, out)


def publish_bytes(out: str | os.PathLike[str], data: bytes, tmp_dir: str | os.PathLike[str] | None = None) -> None:
    """Write `data` as the whole of `out`, atomically and durably."""
    with publishing(out, tmp_dir) as tmp:
        try:
            tmp.write_bytes(data)
        except OSError as e:
            raise TaggerError(f"cannot write {out}: {one_line(e)}") from None


__all__ = [
    "NotARegularFile",
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
    "sha256_hex",
]
