"""The one guard of "an output is never an input": no command writes over a file it reads or a photo a walk lists."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Mapping

from tagger.errors import TaggerError
from tagger.pipeline.discover import DEFAULT_EXTENSIONS, ImageRef, listed, parse_extensions, visible_image
from tagger.storage import Location, name_of, open_location, redact, same_file


def check_no_input(
    out: Location,
    *,
    what: str = "output",
    sources: Mapping[str, Location | None] | None = None,
    catalog: Location | None = None,
    walked: bool = True,
    extensions: Iterable[str] = DEFAULT_EXTENSIONS,
    catalog_kind: str = "the catalog",
    reader: str = "that the run tags",
    files_from: Location | None = None,
    list_copy: BinaryIO | None = None,
) -> None:
    """TaggerError when `out` would destroy an input: one of `sources` (kind -> file: the model, a table, a
    --files-from list; by any name, links too), a file `files_from` lists (list_copy: its copy_of_list, read
    instead; its lines are below `catalog`), or, when `walked`, a file a walk of `catalog` with `extensions` lists,
    existing or not (the next run's photo). Other files inside the catalog are fine."""
    for kind, source in (sources or {}).items():
        if source is not None:
            check_not_input(out, source, kind, what)
    if catalog is not None and files_from is not None and list_contains(catalog, files_from, out, list_copy):
        raise TaggerError(
            f"{what} {redact(out)} is listed in {redact(files_from)} as a file to tag; choose another name"
        )
    if catalog is not None and walked and walk_would_list(catalog, out, extensions):
        raise TaggerError(
            f"{what} {redact(out)} is a file of {catalog_kind} {redact(catalog)} {reader} (an image extension); "
            "choose another name"
        )


def check_not_input(out: Location, source: Location, source_kind: str, what: str = "output") -> None:
    """TaggerError when `out` is the file `source` (by any name: links, relative paths): writing would destroy it."""
    if same_file(out, source):
        raise TaggerError(f"{what} {redact(out)} is the {source_kind} itself; choose another name")


def check_destination(out: Path, source: Path, source_kind: str = "model") -> None:
    """TaggerError unless a file derived from `source` may be written at `out`: not a folder, not `source` itself."""
    if out.is_dir():
        raise TaggerError(f"output {out} is a directory; give a file name such as {out / 'model.onnx'}")
    check_not_input(out, source, source_kind)


def walk_would_list(root: Location, path: Location, extensions: Iterable[str]) -> bool:
    """Whether discover(root, extensions) lists `path`, existing or not: inside root (links resolved, or as
    written: the walk follows a folder linked in, so root/linked/x.jpg is listed wherever it points), a visible
    image name. A file reached only by its real name through a folder linked in from outside root is not found here
    (refusing_out guards against that one as the run lists)."""
    (root_store, root_key), (store, key) = open_location(root), open_location(path)
    if store is not root_store:
        return False
    exts = parse_extensions(extensions)
    real_root = store.resolve(root_key)
    names = (
        store.relative(real_root, store.resolve(key)),
        store.relative(root_key, key),
        store.relative(real_root, key),
    )
    return any(rel is not None and visible_image(rel, exts) for rel in names)


def list_contains(root: Location, list_file: Location, path: Location, copy: BinaryIO | None = None) -> bool:
    """Whether `list_file` (as refs_from_list reads it; copy: its copy_of_list) names `path`, directly or through a
    link. One pass over the list with a string compare per line; only lines ending in the same file name are
    resolved."""
    store, key = open_location(path)
    names = {store.name(key), store.name(store.resolve(key))}
    return any(name_of(loc) in names and same_file(loc, path) for loc in listed(root, list_file, copy))


def refusing_out(refs: Iterator[ImageRef], catalog: Location, out: Location) -> Iterator[ImageRef]:
    """`refs` of a walk of a local `catalog`, raising TaggerError at one that is the existing `out`: a file reached
    through a folder linked in from outside the catalog, which walk_would_list cannot see. A string compare per
    ref; only refs named like `out` are stat'ed. A run publishes its output only at the end, so raising here leaves
    everything as it was."""
    (catalog_store, _), (store, key) = open_location(catalog), open_location(out)
    if catalog_store.remote or store.remote or not store.exists(key):
        return refs
    return _refusing(refs, out, {store.name(key), store.name(store.resolve(key))})


def _refusing(refs: Iterator[ImageRef], out: Location, names: set[str]) -> Iterator[ImageRef]:
    for ref in refs:
        if os.path.basename(ref.abspath) in names and same_file(ref.abspath, out):
            raise TaggerError(
                f"output {redact(out)} is a file of the catalog ({redact(ref.abspath)}) that the run tags; "
                "choose another name"
            )
        yield ref
