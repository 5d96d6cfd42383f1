"""discover: recursive, sorted, filtered, hidden-skipping, loop-safe walk; explicit file lists."""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path

import pytest

from tagger.errors import TaggerError
from tagger.pipeline.discover import MISSING_SIZE, discover, parse_extensions, path_text, refs_from_list


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


def make_deep(root: Path, names: list[str], leaf: str, data: bytes) -> None:
    """Folders names[0]/names[1]/... under root, with file `leaf` at the bottom; made through folder descriptors,
    one level at a time, so the whole path may exceed PATH_MAX (4096 bytes)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            os.mkdir(name, dir_fd=fd)
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        out = os.open(leaf, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, data)
        os.close(out)
    finally:
        os.close(fd)


def test_non_utf8_names_get_an_escaped_path_and_keep_their_real_name(tmp_path: Path) -> None:
    root = os.fsencode(tmp_path)
    os.mkdir(root + b"/dir_\xfe")
    for name in (b"/bad_\xff_.jpg", b"/ok.jpg", b"/dir_\xfe/caf\xe9.jpg", b"/caf\xc3\xa9.jpg"):
        with open(root + name, "wb") as f:
            f.write(b"x")
    refs = list(discover(tmp_path))
    assert [r.path for r in refs] == ["bad_\\xff_.jpg", "café.jpg", "dir_\\xfe/caf\\xe9.jpg", "ok.jpg"]
    assert path_text(os.fsdecode(b"bad_\xff_.jpg")) == "bad_\\xff_.jpg" == refs[0].path
    for r in refs:
        r.path.encode("utf-8")  # valid text for the output
        assert os.stat(r.abspath).st_size == r.size == 1  # the real name opens the file
    assert os.fsencode(refs[2].abspath) == root + b"/dir_\xfe/caf\xe9.jpg"


def test_files_from_reads_names_as_bytes(tmp_path: Path) -> None:
    root = tmp_path / "cat"
    root.mkdir()
    with open(os.fsencode(root) + b"/bad_\xff_.jpg", "wb") as f:
        f.write(b"xy")
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"bad_\xff_.jpg\r\n" + os.fsencode(root) + b"/bad_\xff_.jpg\nmissing_\xfe.jpg\n")
    refs = list(refs_from_list(root, listing))
    assert [r.path for r in refs] == ["bad_\\xff_.jpg", "bad_\\xff_.jpg", "missing_\\xfe.jpg"]
    assert [r.size for r in refs] == [2, 2, MISSING_SIZE]


def test_unlistable_folder_yields_one_error_ref_in_walk_order(tmp_path: Path) -> None:
    # 25 names of 200 bytes: the walk reaches a folder whose path is longer than PATH_MAX; scandir fails on it.
    names = [f"d{i:02d}" + "d" * 197 for i in range(25)]
    make_deep(tmp_path, names, "deep.jpg", b"x")
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "z.jpg").write_bytes(b"x")
    refs = list(discover(tmp_path))
    k = next(k for k in range(1, 26) if len(os.fsencode(tmp_path)) + sum(1 + len(n) for n in names[:k]) >= 4096)
    folder = "/".join(names[:k]) + "/"
    assert [r.path for r in refs] == ["a.jpg", folder, "z.jpg"]
    bad = refs[1]
    assert bad.unlistable == "OSError: File name too long" and bad.missing
    assert all(r.unlistable is None for r in (refs[0], refs[2]))


@pytest.mark.parametrize("depth", [200, 1200])
def test_very_deep_tree_is_walked_without_recursion(tmp_path: Path, depth: int) -> None:
    make_deep(tmp_path, ["d"] * depth, "bottom.jpg", b"x")
    (tmp_path / "top.jpg").write_bytes(b"x")
    try:
        assert [r.path for r in discover(tmp_path)] == ["d/" * depth + "bottom.jpg", "top.jpg"]
    finally:  # bottom up: shutil.rmtree (pytest's cleanup) recurses once per level and fails at 1000
        for k in range(depth, 0, -1):
            folder = os.path.join(tmp_path, *["d"] * k)
            for name in os.listdir(folder):
                os.unlink(os.path.join(folder, name))
            os.rmdir(folder)


def test_folder_named_like_an_image_is_walked_and_odd_names_keep_their_path(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").mkdir()
    (tmp_path / "x.jpg" / "in.jpg").write_bytes(b"x")
    (tmp_path / "two\nlines.jpg").write_bytes(b"x")
    (tmp_path / "tab\tand\rcr.png").write_bytes(b"x")
    paths = [r.path for r in discover(tmp_path)]
    assert paths == ["tab\tand\rcr.png", "two\nlines.jpg", "x.jpg/in.jpg"]


def test_path_text_escapes_are_unambiguous(tmp_path: Path) -> None:
    cases = {
        b"x\xff.jpg": "x\\xff.jpg",  # an undecodable byte
        b"x\\xff.jpg": "x\\x5cxff.jpg",  # a literal backslash that reads as an escape is escaped itself
        b"x\\xFF\\x41.jpg": "x\\x5cxFF\\x5cx41.jpg",
        b"a\\b\\x4.jpg": "a\\b\\x4.jpg",  # other backslashes stay as they are
        b"\\\xff.jpg": "\\\\xff.jpg",
        b"caf\xc3\xa9.jpg": "café.jpg",
    }
    for name, text in cases.items():
        assert path_text(os.fsdecode(name)) == text
    root = tmp_path / "cat"
    root.mkdir()
    for name in cases:
        with open(os.fsencode(root) + b"/" + name, "wb") as f:
            f.write(b"x")
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\n".join(cases))
    assert sorted(r.path for r in discover(root)) == sorted(cases.values())
    assert [r.path for r in refs_from_list(root, listing)] == list(cases.values())


def test_fifo_socket_and_device_are_refs_of_the_walk(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.jpg")
    os.mkfifo(tmp_path / "fifo.txt")  # not an image name: not listed
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    refs = list(discover(tmp_path))
    assert [(r.path, r.size, r.missing) for r in refs] == [("fifo.jpg", 0, False), ("zero.png", 0, False)]
