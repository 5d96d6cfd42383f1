"""Discover stage: stream the image files of a catalog folder (or of a list) as ImageRefs, in a deterministic order."""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from tagger.errors import TaggerError, UsageError, one_line
from tagger.storage import same_file

log = logging.getLogger(__name__)

# AVIF decodes where Pillow was built with it (PIL.features.check('avif')); elsewhere such files become error rows.
DEFAULT_EXTENSIONS: frozenset[str] = frozenset(
    {"jpg", "jpeg", "jfif", "png", "webp", "avif", "bmp", "gif", "tif", "tiff"}
)

MISSING_SIZE = -1  # ImageRef.size of a listed file that could not be stat'ed; it becomes an error row


@dataclass(frozen=True)
class ImageRef:
    """One file to tag. `path` is relative to the catalog root, posix style (absolute when listed outside it), as
    path_text writes it; abspath is the real name (os.fsdecode'd: undecodable bytes kept as surrogates).

    A folder that could not be listed is a ref too: path 'sub/', `unlistable` the reason, which decode turns into its
    error row without opening anything.
    """

    path: str
    abspath: str
    size: int  # bytes; MISSING_SIZE when the file could not be stat'ed
    mtime: float  # seconds since the epoch (os.stat's st_mtime); NaN when missing
    unlistable: str | None = None  # a folder that could not be listed: why, one line

    @property
    def missing(self) -> bool:
        return self.size == MISSING_SIZE


def path_text(name: str) -> str:
    """An os name (str, undecodable bytes as surrogateescape's surrogates) as the text of a row's path: each
    undecodable byte written as the four characters \\xNN. Valid UTF-8 names are unchanged; the text is the same
    on every run, so rows, incremental reuse and shard hashes stay stable."""
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
        st = os.stat(abspath)
    except OSError:
        return ImageRef(path, abspath, MISSING_SIZE, float("nan"))
    return ImageRef(path, abspath, st.st_size, st.st_mtime)


def discover(root: str | os.PathLike[str], extensions: Iterable[str] = DEFAULT_EXTENSIONS) -> Iterator[ImageRef]:
    """Walk `root` recursively and yield its image files, sorted by relative path (plain string order).

    Hidden files and folders (name starting with '.') are skipped. Symlinked folders are followed once: a folder
    already being walked (a loop) or already walked through another link is skipped, so no file appears twice.
    A folder that cannot be listed (permissions, a path too long, an I/O error) yields one ref with `unlistable`
    set, never a silent drop; the root itself is a TaggerError. A generator: millions of files stream without being
    listed first; the walk keeps a stack, not recursion, so any depth works.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise TaggerError(f"catalog {root} is not a folder")
    exts = frozenset(e.lower().lstrip(".") for e in extensions)
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
        if stat.S_ISREG(est.st_mode):
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


def refs_from_list(root: str | os.PathLike[str], list_file: str | os.PathLike[str]) -> Iterator[ImageRef]:
    """Yield one ImageRef per line of `list_file` (paths relative to `root`, or absolute), in the listed order.

    No extension filter: the list is explicit. A listed file that does not exist still yields a ref (size
    MISSING_SIZE) so it becomes an error row rather than a silent drop. Blank lines are skipped; a path listed twice
    gives two rows (no set of seen paths, so memory stays flat on lists of millions).
    """
    root_abs = os.path.abspath(root)
    for abspath in _listed(root, list_file):
        rel = os.path.relpath(abspath, root_abs)
        outside = rel == os.pardir or rel.startswith(os.pardir + os.sep)
        yield _ref(path_text(Path(abspath if outside else rel).as_posix()), abspath)


def _listed(root: str | os.PathLike[str], list_file: str | os.PathLike[str]) -> Iterator[str]:
    """The absolute path of each line of `list_file` (os.fsdecode'd: a name need not be UTF-8)."""
    root_path = Path(root)
    if not root_path.is_dir():
        raise TaggerError(f"catalog {root} is not a folder")
    try:
        f = open(list_file, "rb")
    except OSError as e:
        raise TaggerError(f"cannot read --files-from {list_file}: {one_line(e)}") from None
    root_abs = os.path.abspath(root_path)
    with f:
        for line in f:
            name = os.fsdecode(line.rstrip(b"\r\n"))
            if name.strip():
                yield os.path.normpath(os.path.join(root_abs, name))  # join keeps `name` when it is absolute


def _extension(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def walk_would_list(root: str | os.PathLike[str], path: str | os.PathLike[str], extensions: Iterable[str]) -> bool:
    """Whether discover(root, extensions) lists `path`, existing or not: inside root (links resolved), no hidden
    name on the way, a listed extension. Folders linked in from outside root are not followed here."""
    rel = os.path.relpath(os.path.realpath(path), os.path.realpath(root))
    if rel == os.pardir or rel.startswith(os.pardir + os.sep) or rel == os.curdir:
        return False
    exts = frozenset(e.lower().lstrip(".") for e in extensions)
    return not any(part.startswith(".") for part in Path(rel).parts) and _extension(Path(rel).name) in exts


def list_names(root: str | os.PathLike[str], list_file: str | os.PathLike[str], path: str | os.PathLike[str]) -> bool:
    """Whether `list_file` (as refs_from_list reads it) names `path`, directly or through a link. One pass over the
    list with a string compare per line; only lines ending in the same file name are resolved."""
    names = {os.path.basename(os.path.abspath(path)), os.path.basename(os.path.realpath(path))}
    return any(
        os.path.basename(abspath) in names and same_file(abspath, path) for abspath in _listed(root, list_file)
    )
