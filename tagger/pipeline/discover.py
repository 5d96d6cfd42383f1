"""Discover stage: stream a catalog's image files (a folder, a bucket prefix or a list) as ImageRefs, in order."""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from tagger.errors import TaggerError, UsageError, one_line
from tagger.storage import (
    Location,
    is_uri,
    join,
    list_files,
    name_of,
    read_file,
    redact,
    relative_key,
    same_file,
    stat_file,
)

log = logging.getLogger(__name__)

# AVIF decodes where Pillow was built with it (PIL.features.check('avif')); elsewhere such files become error rows.
DEFAULT_EXTENSIONS: frozenset[str] = frozenset(
    {"jpg", "jpeg", "jfif", "png", "webp", "avif", "bmp", "gif", "tif", "tiff"}
)

MISSING_SIZE = -1  # ImageRef.size of a listed file that could not be stat'ed; it becomes an error row


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
    """Walk `root` recursively and yield its image files, sorted by relative path (plain string order).

    Hidden files and folders (name starting with '.') are skipped. Symlinked folders are followed once: a folder
    already being walked (a loop) or already walked through another link is skipped, so no file appears twice.
    A folder that cannot be listed (permissions, a path too long, an I/O error) yields one ref with `unlistable`
    set, never a silent drop; the root itself is a TaggerError. A generator: millions of files stream without being
    listed first; the walk keeps a stack, not recursion, so any depth works.

    A URI root is listed by storage (sorted the same way, hidden names skipped the same way), so a catalog in a
    bucket gives the rows the same catalog on disk gives.
    """
    exts = parse_extensions(extensions)
    if is_uri(root):
        for obj in list_files(str(root)):
            # '.' and '..' are not hidden names: such a key gets its row (an AmbiguousKey error, never read).
            hidden = any(part.startswith(".") and part not in (".", "..") for part in obj.rel.split("/"))
            if _extension(obj.rel) in exts and not hidden:
                yield ImageRef(obj.rel, obj.location, obj.size, obj.mtime)
        return
    root_path = Path(root)
    if not root_path.is_dir():
        raise TaggerError(f"catalog {root} is not a folder")
    seen: set[tuple[int, int]] = set()
    try:
        top = _listing(str(root_path), "", seen)
    except OSError as e:
        raise TaggerError(f"cannot list catalog {root}: {one_line(e)}") from None
    stack: list[Iterator[tuple[str, os.DirEntry[str], bool]]] = [iter(top or [])]  # one listing per open folder
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
                yield ImageRef(rel + "/", entry.path, MISSING_SIZE, float("nan"), one_line(e, named=True))
                continue
            if listing is not None:
                stack.append(iter(listing))
            continue
        if _extension(entry.name) not in exts:
            continue
        try:
            est = entry.stat()
        except OSError:  # a dangling symlink: still a listed file, so it becomes an error row
            yield ImageRef(rel, entry.path, MISSING_SIZE, float("nan"))
            continue
        # A FIFO, socket or device under an image name is a row too: read_file refuses it (NotARegularFile)
        # without opening it for reading.
        yield ImageRef(rel, entry.path, est.st_size, est.st_mtime)


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


def copy_of_list(list_file: Location) -> BinaryIO | None:
    """A --files-from list that cannot be read twice (a pipe or FIFO, as `<(printf ...)` gives), copied once into an
    anonymous temp file, so that the output guard and the listing both read it; None for a regular file or an
    object, which are read again where they are. TaggerError when it cannot be read."""
    if is_uri(list_file):
        return None
    try:
        if stat.S_ISREG(os.stat(list_file).st_mode):
            return None
        copy = tempfile.TemporaryFile()
        with open(list_file, "rb") as f:
            shutil.copyfileobj(f, copy)
        copy.flush()
    except OSError as e:
        raise TaggerError(f"cannot read --files-from {redact(list_file)}: {one_line(e)}") from None
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
    root_abs = _absolute_root(root)
    for abspath in _listed(root, list_file, copy):
        if is_uri(abspath):
            try:
                rel_key = relative_key(root, abspath)
            except OSError:  # a malformed URI line: its row says so (BadURI, as it is read)
                rel_key = None
            yield _ref(rel_key if rel_key is not None else redact(abspath), abspath)
            continue
        rel = os.path.relpath(abspath, root_abs)
        outside = rel == os.pardir or rel.startswith(os.pardir + os.sep)
        yield _ref(path_text(Path(abspath if outside else rel).as_posix()), abspath)


def _listed(root: Location, list_file: Location, copy: BinaryIO | None = None) -> Iterator[str]:
    """The absolute path (or URI) of each line of `list_file`, or of its copy_of_list (os.fsdecode'd: a name need
    not be UTF-8)."""
    if not is_uri(root) and not Path(root).is_dir():
        raise TaggerError(f"catalog {root} is not a folder")
    try:
        if copy is not None:
            f: BinaryIO = os.fdopen(os.dup(copy.fileno()), "rb")  # closed after this pass, the copy stays open
            f.seek(0)
        else:
            f = io.BytesIO(read_file(list_file)) if is_uri(list_file) else open(list_file, "rb")
    except OSError as e:
        raise TaggerError(f"cannot read --files-from {redact(list_file)}: {one_line(e)}") from None
    root_abs = _absolute_root(root)
    with f:
        for line in f:
            name = os.fsdecode(line.rstrip(b"\r\n"))
            if not name.strip():
                continue
            if is_uri(name):
                yield name
            elif is_uri(root):
                yield str(join(root, name.lstrip("/")))
            else:
                yield os.path.normpath(os.path.join(root_abs, name))  # join keeps `name` when it is absolute


def _absolute_root(root: Location) -> str:
    """What a local line is joined to and made relative to: root made absolute ('' for a URI root)."""
    return "" if is_uri(root) else os.path.abspath(root)


def _extension(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def walk_would_list(root: Location, path: Location, extensions: Iterable[str]) -> bool:
    """Whether discover(root, extensions) lists `path`, existing or not: inside root (links resolved, or as
    written: the walk follows a folder linked in, so root/linked/x.jpg is listed wherever it points), no hidden name
    on the way, a listed extension. A file reached only by its real name through a folder linked in from outside
    root is not found here (list_refs guards against that one as it lists)."""
    if is_uri(root) or is_uri(path):
        key = relative_key(root, path)
        rels = [key if key is not None else os.pardir]
    else:
        real_root, lexical = os.path.realpath(root), os.path.abspath(path)
        rels = [
            os.path.relpath(os.path.realpath(path), real_root),
            os.path.relpath(lexical, os.path.abspath(root)),
            os.path.relpath(lexical, real_root),
        ]
    exts = parse_extensions(extensions)
    return any(
        not (rel == os.pardir or rel.startswith(os.pardir + os.sep) or rel == os.curdir)
        and not any(part.startswith(".") for part in Path(rel).parts)
        and _extension(Path(rel).name) in exts
        for rel in rels
    )


def list_contains(root: Location, list_file: Location, path: Location, copy: BinaryIO | None = None) -> bool:
    """Whether `list_file` (as refs_from_list reads it; copy: its copy_of_list) names `path`, directly or through a
    link. One pass over the list with a string compare per line; only lines ending in the same file name are
    resolved."""
    if is_uri(path):
        names = {name_of(path)}
    else:
        names = {os.path.basename(os.path.abspath(path)), os.path.basename(os.path.realpath(path))}
    return any(name_of(loc) in names and same_file(loc, path) for loc in _listed(root, list_file, copy))
