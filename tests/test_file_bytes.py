"""How a catalog file's bytes are read: never from a FIFO, socket or device (real ones, through the real CLI), and
hashed once into the sha256 column; outputs written before that column are refused by --incremental."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tagger import RunConfig, run
from tagger.errors import TaggerError
from tagger.output.reader import read_output_info
from tagger.storage import NotARegularFile, read_file

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO / "sample_images" / "images" / "10003.jpg"


def _cli(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "tagger.cli", "run", *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_fifo_socket_and_device_in_files_from_are_error_rows_never_read(
    contract_onnx: Path, tmp_path: Path, workers: str
) -> None:
    root = tmp_path / "f"
    root.mkdir()
    shutil.copy(PHOTO, root / "ok.jpg")
    os.mkfifo(root / "x.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "s.jpg"))  # bound, so a path that names a live socket
    listing = tmp_path / "f.txt"
    listing.write_text("ok.jpg\nx.jpg\ns.jpg\n/dev/null\n")
    out = tmp_path / "f.parquet"
    try:
        proc = _cli(root, "--files-from", listing, "--out", out, "--workers", workers, "--model", contract_onnx,
                    "--max-errors", "3")  # fmt: skip
    finally:
        sock.close()
    assert proc.returncode == 0, proc.stderr
    rows = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    assert list(rows) == ["ok.jpg", "x.jpg", "s.jpg", "/dev/null"]
    assert rows["ok.jpg"]["status"] == "ok"
    assert rows["ok.jpg"]["sha256"] == hashlib.sha256(PHOTO.read_bytes()).hexdigest()
    kinds = {"x.jpg": "a FIFO", "s.jpg": "a socket", "/dev/null": "a character device"}
    for path, kind in kinds.items():
        assert rows[path]["status"] == "error" and rows[path]["sha256"] is None
        assert rows[path]["error"] == f"NotARegularFile: {kind}, not a regular file"


def test_read_file_refuses_special_files_and_reads_regular_ones(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    for special in (tmp_path / "fifo", Path("/dev/zero"), tmp_path):
        with pytest.raises(NotARegularFile):
            read_file(special)  # /dev/zero would never end, the FIFO never start
    assert issubclass(NotARegularFile, OSError)
    assert read_file(PHOTO) == PHOTO.read_bytes()
    with pytest.raises(FileNotFoundError):
        read_file(tmp_path / "gone.jpg")


def test_sha256_column_is_the_files_bytes_even_when_decoding_fails(
    catalog: tuple[Path, dict[str, str]], contract_onnx: Path, tmp_path: Path
) -> None:
    root, expected = catalog
    out = tmp_path / "tags.parquet"
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([*sorted(expected), "no/such.jpg"]) + "\n")
    run(RunConfig(root, out, model=contract_onnx, device="cpu", batch_size=4, workers=2, files_from=listing))
    names = pq.read_schema(out).names
    assert names[names.index("mtime") + 1] == "sha256"
    rows = pq.read_table(out).to_pylist()
    undecodable = [r for r in rows if r["status"] == "error" and r["sha256"] is not None]
    assert undecodable, "the catalog's broken images are read and hashed, then fail to decode"
    for r in rows:
        if r["path"] == "no/such.jpg":
            assert r["sha256"] is None and r["error"].startswith("FileNotFoundError")
        else:
            assert r["sha256"] == hashlib.sha256((root / r["path"]).read_bytes()).hexdigest(), r["path"]


def test_output_without_sha256_is_an_older_format_refused_by_incremental(
    catalog: tuple[Path, dict[str, str]], contract_onnx: Path, tmp_path: Path
) -> None:
    root, _ = catalog
    out = tmp_path / "tags.parquet"
    run(RunConfig(root, out, model=contract_onnx, device="cpu", batch_size=4, workers=0))
    old = pq.read_table(out).drop_columns(["sha256"])  # what tagger wrote before the column: same metadata
    pq.write_table(old, out)
    with pytest.raises(TaggerError, match="older output format, without the sha256 column"):
        read_output_info(out)
    before = out.read_bytes()
    proc = _cli(root, "--out", out, "--incremental", "--model", contract_onnx, "--workers", "0")
    assert proc.returncode == 1
    message = proc.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert "older output format" in message and "run once without --incremental" in message
    assert out.read_bytes() == before  # left untouched
    assert _cli(root, "--out", out, "--model", contract_onnx, "--workers", "0").returncode == 0
    assert "sha256" in pq.read_schema(out).names
