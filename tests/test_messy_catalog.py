"""`tagger run` on messy catalogs: non-UTF-8 names, folders that cannot be listed, odd names and links, very deep
trees, files gone mid-run. Real files, real ONNX Runtime sessions, real processes; Parquet read back."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO, Iterator

import pyarrow.parquet as pq
import pytest
from test_pipeline_discover import make_deep

import tagger.engines.plan as plan_module
from tagger import ErrorLimit, RunConfig, run
from tagger.engines.plan import list_refs
from tagger.nightly.shard import Shard, shard_of
from tagger.output.reader import file_metadata
from tagger.pipeline.discover import ImageRef

REPO = Path(__file__).resolve().parents[1]
PHOTO = (REPO / "sample_images/images/10003.jpg").read_bytes()
NO_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps", "-dac_override,-dac_read_search"]


def _cfg(root: Path, out: Path, model: Path, **kw: object) -> RunConfig:
    return RunConfig(root, out, model=model, device="cpu", batch_size=4, **kw)  # type: ignore[arg-type]


def _rows(out: Path) -> list[dict]:
    return pq.read_table(out).to_pylist()


def _cli(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    cmd = [*prefix, sys.executable, "-m", "tagger.cli", "run", *args, "--device", "cpu"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("workers", [0, 2])
def test_non_utf8_file_name_gets_a_row_and_is_reused(contract_onnx: Path, tmp_path: Path, workers: int) -> None:
    root, out = tmp_path / "cat", tmp_path / "tags.parquet"
    root.mkdir()
    for name in (b"ok.jpg", b"bad_\xff_.jpg"):
        fd = os.open(os.fsencode(root) + b"/" + name, os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, PHOTO)
        os.close(fd)
    summary = run(_cfg(root, out, contract_onnx, workers=workers))
    rows = _rows(out)
    assert [(r["path"], r["status"]) for r in rows] == [("bad_\\xff_.jpg", "ok"), ("ok.jpg", "ok")]
    assert rows[0]["bytes"] == len(PHOTO) and rows[0]["class"] == rows[1]["class"]
    assert summary.errors == 0
    again = run(_cfg(root, out, contract_onnx, workers=workers, incremental=True))
    assert (again.tagged, again.reused, again.files) == (0, 2, 2)
    assert again.changes is not None and again.changes.unchanged == 2 and again.changes.new == 0


def test_cli_tags_a_non_utf8_name_and_a_listed_one(contract_onnx: Path, tmp_path: Path) -> None:
    root = tmp_path / "cat"
    root.mkdir()
    for name in (b"ok.jpg", b"caf\xe9.jpg"):
        with open(os.fsencode(root) + b"/" + name, "wb") as f:
            f.write(PHOTO)
    out = tmp_path / "walk.parquet"
    proc = _cli(str(root), "--out", str(out), "--model", str(contract_onnx), "--workers", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [(r["path"], r["status"]) for r in _rows(out)] == [("caf\\xe9.jpg", "ok"), ("ok.jpg", "ok")]
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"caf\xe9.jpg\nok.jpg\n")
    listed = tmp_path / "listed.parquet"
    summary = run(_cfg(root, listed, contract_onnx, workers=0, files_from=listing))
    assert [(r["path"], r["status"]) for r in _rows(listed)] == [("caf\\xe9.jpg", "ok"), ("ok.jpg", "ok")]
    assert summary.errors == 0


def _drop_dac(folder: Path) -> tuple[str, ...]:
    """The command prefix under which `folder` (mode 000) cannot be listed, or skip: root lists anything unless its
    DAC override capabilities are dropped."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot drop the capability to read any folder")
    probe = subprocess.run([*NO_DAC, "ls", str(folder)], capture_output=True)
    if probe.returncode == 0:
        pytest.skip("setpriv could not drop the DAC override capabilities here")
    return tuple(NO_DAC)


def test_unlistable_folder_is_an_error_row_and_keeps_its_earlier_rows(contract_onnx: Path, tmp_path: Path) -> None:
    root, out = tmp_path / "cat", tmp_path / "tags.parquet"
    for rel in ("a.jpg", "sub/1.jpg", "sub/2.jpg", "sub/deeper/3.jpg", "z.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(PHOTO)
    run(_cfg(root, out, contract_onnx, workers=0))
    before = {r["path"]: r for r in _rows(out)}
    sub = root / "sub"
    sub.chmod(0)
    try:
        prefix = _drop_dac(sub)
        args = (str(root), "--out", str(out), "--model", str(contract_onnx), "--incremental", "--batch-size", "4")
        for workers in ("2", "0"):  # twice: the folder's own earlier error row is replaced, its rows kept again
            proc = _cli(*args, "--workers", workers, prefix=prefix)
            assert proc.returncode == 0, proc.stderr[-2000:]
            rows = _rows(out)
            assert [r["path"] for r in rows] == ["a.jpg", "sub/", "sub/1.jpg", "sub/2.jpg", "sub/deeper/3.jpg", "z.jpg"]
            assert rows[1]["status"] == "error" and rows[1]["error"] == "PermissionError: Permission denied"
            assert rows[1]["bytes"] is None and rows[1]["class"] is None
            assert all(r == before[r["path"]] for r in rows if r["path"] != "sub/")  # kept exactly as they were
            assert "unchanged 2, retagged 0, removed 0, retried 0, failed 1, unreadable 3)" in proc.stdout
            assert "; 1 folder could not be listed" in proc.stdout
            assert "Traceback" not in proc.stderr
            meta = file_metadata(out)
            assert (meta["tagger.run.unlistable"], meta["tagger.run.files"], meta["tagger.run.reused"]) == ("1", "6", "5")
    finally:
        sub.chmod(0o755)
    summary = run(_cfg(root, out, contract_onnx, workers=0, incremental=True))  # listable again
    assert [r["path"] for r in _rows(out)] == ["a.jpg", "sub/1.jpg", "sub/2.jpg", "sub/deeper/3.jpg", "z.jpg"]
    assert summary.changes is not None and summary.changes.unchanged == 5 and summary.unlistable == 0
    assert file_metadata(out)["tagger.run.unlistable"] == "0"


def test_folder_path_beyond_path_max_is_an_error_row(contract_onnx: Path, tmp_path: Path) -> None:
    root, out = tmp_path / "cat", tmp_path / "tags.parquet"
    root.mkdir()
    make_deep(root, ["d" * 250] * 17, "lost.jpg", PHOTO)
    (root / "top.jpg").write_bytes(PHOTO)
    summary = run(_cfg(root, out, contract_onnx, workers=2))
    rows = _rows(out)
    assert len(rows) == 2 and rows[1]["path"] == "top.jpg" and rows[1]["status"] == "ok"
    assert rows[0]["path"].startswith("d" * 250 + "/") and rows[0]["path"].endswith("/")
    assert (rows[0]["status"], rows[0]["error"]) == ("error", "OSError: File name too long")
    assert (summary.files, summary.errors, summary.unlistable) == (2, 1, 1)
    assert "1 folder could not be listed" in summary.line()


def test_links_folders_and_odd_names(contract_onnx: Path, tmp_path: Path) -> None:
    root, out = tmp_path / "cat", tmp_path / "tags.parquet"
    root.mkdir()
    if not os.path.isfile("/etc/passwd"):
        pytest.skip("no /etc/passwd to link to")
    (root / "passwd.jpg").symlink_to("/etc/passwd")
    (root / "x.jpg").mkdir()
    (root / "x.jpg" / "in.jpg").write_bytes(PHOTO)
    (root / "two\nlines.jpg").write_bytes(PHOTO)
    make_deep(root, ["d"] * 200, "bottom.jpg", PHOTO)
    summary = run(_cfg(root, out, contract_onnx, workers=0))
    rows = {r["path"]: r for r in _rows(out)}
    assert list(rows) == ["d/" * 200 + "bottom.jpg", "passwd.jpg", "two\nlines.jpg", "x.jpg/in.jpg"]
    assert rows["passwd.jpg"]["status"] == "error" and rows["passwd.jpg"]["error"].startswith("UnidentifiedImageError")
    secret = Path("/etc/passwd").read_text(errors="replace").split(":")[0]  # e.g. 'root'
    assert secret not in str(rows["passwd.jpg"])
    assert all(r["status"] == "ok" for p, r in rows.items() if p != "passwd.jpg")
    assert (summary.files, summary.errors) == (4, 1)


def test_files_deleted_after_listing_become_error_rows(
    contract_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, out = tmp_path / "cat", tmp_path / "tags.parquet"
    root.mkdir()
    for i in range(6):
        (root / f"{i}.jpg").write_bytes(PHOTO)

    def list_then_empty(config: RunConfig, list_copy: BinaryIO | None = None) -> Iterator[ImageRef]:
        refs = list(list_refs(config, list_copy))  # listed, then the catalog is emptied before any file is decoded
        for r in refs:
            os.unlink(r.abspath)
        return iter(refs)

    monkeypatch.setattr(plan_module, "list_refs", list_then_empty)
    summary = run(_cfg(root, out, contract_onnx, workers=2, max_errors=ErrorLimit.parse("100%")))
    rows = _rows(out)
    assert [r["path"] for r in rows] == [f"{i}.jpg" for i in range(6)]
    assert all(r["status"] == "error" and r["error"].startswith("FileNotFoundError") for r in rows)
    assert (summary.files, summary.errors) == (6, 6)


@pytest.mark.parametrize("workers", [0, 2])
def test_fifo_socket_and_device_met_in_the_walk_are_error_rows_never_read(
    contract_onnx: Path, tmp_path: Path, workers: int
) -> None:
    root, out = tmp_path / "cat", tmp_path / "tags.parquet"
    root.mkdir()
    (root / "ok.jpg").write_bytes(PHOTO)
    os.mkfifo(root / "fifo.jpg")
    (root / "zero.jpg").symlink_to("/dev/zero")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock.jpg"))  # a live socket
    try:
        proc = _cli(str(root), "--out", str(out), "--model", str(contract_onnx), "--workers", str(workers),
                    "--max-errors", "3")  # fmt: skip
    finally:
        sock.close()
    assert proc.returncode == 0, proc.stderr[-2000:]  # within the timeout: no FIFO or /dev/zero was read
    rows = {r["path"]: r for r in _rows(out)}
    assert list(rows) == ["fifo.jpg", "ok.jpg", "sock.jpg", "zero.jpg"]
    assert rows["ok.jpg"]["status"] == "ok"
    kinds = {"fifo.jpg": "a FIFO", "sock.jpg": "a socket", "zero.jpg": "a character device"}
    for path, kind in kinds.items():
        assert rows[path]["status"] == "error" and rows[path]["error"] == f"NotARegularFile: {kind}, not a regular file"
    assert rows["fifo.jpg"]["bytes"] == 0


def test_a_catalog_of_only_a_fifo_is_one_error_row(contract_onnx: Path, tmp_path: Path) -> None:
    root, out = tmp_path / "cat", tmp_path / "tags.parquet"
    root.mkdir()
    os.mkfifo(root / "only.jpg")
    summary = run(_cfg(root, out, contract_onnx, workers=0, max_errors=ErrorLimit(count=1)))
    assert [(r["path"], r["error"]) for r in _rows(out)] == [("only.jpg", "NotARegularFile: a FIFO, not a regular file")]
    assert (summary.files, summary.errors) == (1, 1)


def test_a_photo_replaced_by_a_fifo_is_changed_under_incremental(contract_onnx: Path, tmp_path: Path) -> None:
    root, out = tmp_path / "cat", tmp_path / "tags.parquet"
    root.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (root / name).write_bytes(PHOTO)
    run(_cfg(root, out, contract_onnx, workers=0))
    (root / "b.jpg").unlink()
    os.mkfifo(root / "b.jpg")
    again = run(_cfg(root, out, contract_onnx, workers=0, incremental=True))
    assert again.changes is not None
    assert (again.changes.unchanged, again.changes.changed, again.changes.removed) == (1, 1, 0)
    rows = {r["path"]: r for r in _rows(out)}
    assert rows["a.jpg"]["status"] == "ok"
    assert rows["b.jpg"]["status"] == "error" and rows["b.jpg"]["error"].startswith("NotARegularFile: a FIFO")


def _write_named(root: Path, name: bytes, data: bytes) -> None:
    with open(os.fsencode(root) + b"/" + name, "wb") as f:
        f.write(data)


def test_a_byte_name_and_a_name_spelling_its_escape_get_their_own_paths_and_rows(
    contract_onnx: Path, tmp_path: Path
) -> None:
    root, out = tmp_path / "cat", tmp_path / "tags.parquet"
    root.mkdir()
    other = (REPO / "sample_images/images/10257.jpg").read_bytes()
    _write_named(root, b"x\xff.jpg", PHOTO)  # one undecodable byte
    _write_named(root, b"x\\xff.jpg", other)  # backslash, x, f, f: the text that byte's escape used to be
    run(_cfg(root, out, contract_onnx, workers=0))
    rows = {r["path"]: r for r in _rows(out)}
    assert list(rows) == ["x\\x5cxff.jpg", "x\\xff.jpg"]
    assert rows["x\\xff.jpg"]["bytes"] == len(PHOTO) and rows["x\\x5cxff.jpg"]["bytes"] == len(other)
    # Incremental reuse finds each file's own row (by path, then size and mtime).
    before = {p: (r["bytes"], r["sha256"]) for p, r in rows.items()}
    again = run(_cfg(root, out, contract_onnx, workers=0, incremental=True))
    assert (again.tagged, again.reused) == (0, 2)
    assert {p: (r["bytes"], r["sha256"]) for p, r in ((r["path"], r) for r in _rows(out))} == before
    # Shards hash the same text: each row lands in exactly one shard, and the shards hold both files.
    shards = [tmp_path / f"s{i}.parquet" for i in range(2)]
    for i, s in enumerate(shards):
        run(_cfg(root, s, contract_onnx, workers=0, shard=Shard(i, 2)))
        assert all(shard_of(r["path"], 2) == i for r in _rows(s))
    assert sorted(r["path"] for s in shards for r in _rows(s)) == sorted(rows)
