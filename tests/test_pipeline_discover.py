"""discover: recursive, sorted, filtered, hidden-skipping, loop-safe walk; explicit file lists."""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path

import pytest

from tagger.errors import TaggerError
from tagger.pipeline.discover import MISSING_SIZE, discover, parse_extensions, refs_from_list


def test_walk_is_sorted_filtered_and_skips_hidden(catalog: tuple[Path, dict[str, str]]) -> None:
    root, expected = catalog
    refs = list(discover(root))
    paths = [r.path for r in refs]
    assert paths == sorted(expected)  # plain string order, nested and non-ASCII folders included
    assert "résumé/日本語 フォルダ/café.jpg" in paths
    assert "good/UPPER.JPG" in paths  # extensions match case-insensitively
    assert not any(p.startswith(".") or "/." in p for p in paths)
    assert not any(p.endswith(".txt") for p in paths)
    assert not any(p.startswith("good/loop/") for p in paths)  # the symlink loop is walked once, not forever


def test_refs_carry_relative_posix_path_size_and_mtime(catalog: tuple[Path, dict[str, str]]) -> None:
    root, _ = catalog
    for ref in discover(root):
        st = os.stat(root / ref.path)
        assert Path(ref.abspath) == root / ref.path
        assert (ref.size, ref.mtime) == (st.st_size, st.st_mtime)
        assert not ref.missing


def test_walk_streams_and_orders_folders_like_strings(tmp_path: Path) -> None:
    for rel in ("a/x.jpg", "a-b/x.jpg", "a.jpg", "a0.jpg", "b/c/d.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    gen = discover(tmp_path)
    assert inspect.isgenerator(gen)
    assert [r.path for r in gen] == sorted(["a/x.jpg", "a-b/x.jpg", "a.jpg", "a0.jpg", "b/c/d.png"])


def test_extension_filter(catalog: tuple[Path, dict[str, str]]) -> None:
    root, expected = catalog
    exts = parse_extensions("PNG, .gif")
    assert exts == {"png", "gif"}
    paths = [r.path for r in discover(root, exts)]
    assert paths == sorted(p for p in expected if p.lower().endswith((".png", ".gif")))
    with pytest.raises(TaggerError):
        parse_extensions(" , .")


def test_missing_catalog_is_a_tagger_error(tmp_path: Path) -> None:
    with pytest.raises(TaggerError, match="not a folder"):
        list(discover(tmp_path / "nope"))


def test_files_from_keeps_order_and_turns_missing_files_into_refs(
    catalog: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    root, _ = catalog
    outside = tmp_path / "outside.jpg"
    outside.write_bytes((root / "good/photo.jpg").read_bytes())
    listing = tmp_path / "list.txt"
    lines = ["modes/rgba.png", "", str(root / "good/photo.jpg"), "gone/missing.jpg", str(outside), "good/notes.txt"]
    listing.write_text("\n".join(lines) + "\n", encoding="utf-8")
    refs = list(refs_from_list(root, listing))
    assert [r.path for r in refs] == [
        "modes/rgba.png",
        "good/photo.jpg",  # absolute inside the catalog -> relative
        "gone/missing.jpg",
        outside.as_posix(),  # outside the catalog -> stays absolute
        "good/notes.txt",  # listed explicitly: no extension filter
    ]
    missing = refs[2]
    assert missing.missing and missing.size == MISSING_SIZE and math.isnan(missing.mtime)
    with pytest.raises(TaggerError, match="files-from"):
        list(refs_from_list(root, tmp_path / "no-such-list.txt"))
