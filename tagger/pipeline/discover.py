"""Discover stage: stream a catalog's image files (a folder, a bucket prefix or a list) as ImageRefs, in order."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from tagger.errors import TaggerError, UsageError, one_line
from tagger.storage import MISSING_SIZE, Location, open_location, path_text, relative_key, stat_file

log = logging.getLogger(__name__)

# AVIF decodes where Pillow was built with it (PIL.features.check('avif')); elsewhere such files become error rows.
DEFAULT_EXTENSIONS: frozenset[str] = frozenset(
    {"jpg", "jpeg", "jfif", "png", "webp", "avif", "bmp", "gif", "tif", "tiff"}
)



@dataclass(frozen=True)
class ImageRef:
    """One file to tag. `path` is relative to the catalog root, posix style (absolute when listed outside it), as
    path_text writes it; abspath is the real name (os.fsdecode'd: undecodable bytes kept as surrogates), or the
    object's URI (storage reads either).

    A folder that could not be listed is a ref too: path 'sub/', `unlistable` the reason, which decode turns into its
    error row without opening anything.
    """

    path: str
    abspath: str
    size: int  # bytes; MISSING_SIZE when the file could not be stat'ed
    mtime: float  # seconds since the epoch (os.stat's st_mtime, an object's LastModified); NaN when missing
    unlistable: str | None = None  # a folder that could not be listed: why, one line

    @property
    def missing(self) -> bool:
        return self.size == MISSING_SIZE


def parse_extensions(text: str | Iterable[str]) -> frozenset[str]:
    """'jpg,.PNG, webp' -> {'jpg', 'png', 'webp'}; matching is case-insensitive."""
    items = text.split(",") if isinstance(text, str) else list(text)
    exts = frozenset(e.strip().lower().lstrip(".") for e in items if e.strip().lstrip("."))
    if not exts:
        raise UsageError(f"no file extensions in {text!r}")
    return exts


def _ref(path: str, abspath: str) -> ImageRef:
    try:
        size, mtime = stat_file(abspath)
    except OSError:
        return ImageRef(path, abspath, MISSING_SIZE, float("nan"))
    return ImageRef(path, abspath, size, mtime)


def discover(root: Location, extensions: Iterable[str] = DEFAULT_EXTENSIONS) -> Iterator[ImageRef]:
    """List `root` recursively through its store and yield its visible image files (visible_image), sorted by
    relative path (plain string order), as a generator: millions of files stream.

    A local folder is walked with links followed once (no file twice, no loop); a folder that cannot be listed
    yields one ref with `unlistable` set, never a silent drop; the root itself is a TaggerError. A bucket prefix is
    listed the same way, so a catalog in a bucket gives the rows the same catalog on disk gives. A FIFO, socket or
    device under an image name is a ref too: reading refuses it without opening it for reading.
    """
    exts = parse_extensions(extensions)
    store, key = open_location(root)
    for e in store.list(key, lambda rel: visible_image(rel, exts)):
        yield ImageRef(e.rel, e.location, e.size, e.mtime, e.unlistable)


def copy_of_list(list_file: Location) -> BinaryIO | None:
    """A --files-from list that cannot be read twice (a pipe or FIFO, as `<(printf ...)` gives), copied once into an
    anonymous temp file, so that the output guard and the listing both read it; None for a regular file or an
    object, which are read again where they are. TaggerError when it cannot be read."""
    store, key = open_location(list_file)
    if store.remote:
        return None
    try:
        if stat.S_ISREG(os.stat(key).st_mode):
            return None
        copy = tempfile.TemporaryFile()
        with store.open(key) as f:
            shutil.copyfileobj(f, copy)
        copy.flush()
    except OSError as e:
        raise TaggerError(f"cannot read --files-from {store.redact(key)}: {one_line(e)}") from None
    return copy


def refs_from_list(root: Location, list_file: Location, copy: BinaryIO | None = None) -> Iterator[ImageRef]:
    """Yield one ImageRef per line of `list_file` (paths relative to `root`, or absolute), in the listed order.

    Under a URI root a line is a key relative to it or a URI (list_file itself may be a URI too); a listed object
    is stat'ed with one HEAD request. A URI outside the root keeps its (redacted) URI as its path.

    No extension filter: the list is explicit. A listed file that does not exist still yields a ref (size
    MISSING_SIZE) so it becomes an error row rather than a silent drop. Blank lines are skipped; a path listed twice
    gives two rows (no set of seen paths, so memory stays flat on lists of millions). copy: the list's copy_of_list,
    read instead of list_file.
    """
    for loc in listed(root, list_file, copy):
        try:
            rel = relative_key(root, loc)
        except OSError:  # a malformed URI line: its row says so (BadURI, as it is read)
            rel = None
        if rel is None:  # outside the root: an object by its redacted URI, a file by its absolute path
            store, key = open_location(loc)
            rel = store.redact(key) if store.remote else path_text(Path(loc).as_posix())
        yield _ref(rel, loc)


def listed(root: Location, list_file: Location, copy: BinaryIO | None = None) -> Iterator[str]:
    """The location of each line of `list_file`, or of its copy_of_list (os.fsdecode'd: a name need not be UTF-8):
    a URI as it is, any other line below `root` (an absolute local line under a local root stays itself)."""
    root_store, root_key = open_location(root)
    if not root_store.remote and not root_store.is_folder(root_key):
        raise TaggerError(f"catalog {root_store.redact(root_key)} is not a folder")
    list_store, list_key = open_location(list_file)
    try:
        if copy is not None:
            f: BinaryIO = os.fdopen(os.dup(copy.fileno()), "rb")  # closed after this pass, the copy stays open
            f.seek(0)
        else:
            f = list_store.open(list_key)
    except OSError as e:
        raise TaggerError(f"cannot read --files-from {list_store.redact(list_key)}: {one_line(e)}") from None
    with f:
        for line in f:
            name = os.fsdecode(line.rstrip(b"\r\n"))
            if not name.strip():
                continue
            yield name if open_location(name)[0].remote else os.fspath(root_store.locate(root_key, name))


def _extension(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def visible_image(rel: str, extensions: frozenset[str]) -> bool:
    """What a walk tags, the one filter: a path below the catalog (posix) with no hidden name on the way and a
    listed extension. '.' and '..' are not hidden names: an object key with them gets its row (an AmbiguousKey
    error, never read)."""
    parts = rel.split("/")
    return _extension(parts[-1]) in extensions and not any(
        part.startswith(".") and part not in (".", "..") for part in parts
    )
