"""`tagger run --incremental --checksum`: a file rewritten with other bytes of the same size and the old mtime (what
`touch -r` or `rsync -t` leave) is tagged again only with --checksum. Real files, real runs, Parquet read back."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import quadrant_image

from tagger import RunConfig, run
from tagger.cli import main
from tagger.errors import UsageError


def _cfg(root: Path, out: Path, model: Path, **kw: object) -> RunConfig:
    return RunConfig(root, out, model=model, device="cpu", workers=0, batch_size=4, **kw)  # type: ignore[arg-type]


def _rows(out: Path) -> dict[str, dict]:
    return {r["path"]: r for r in pq.read_table(out).to_pylist()}


def _catalog(root: Path, n: int = 6) -> None:
    rng = np.random.default_rng(0)
    root.mkdir()
    for i in range(n):
        colors = [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(4)]
        quadrant_image(64, 48, colors).save(root / f"{i:02d}.png", compress_level=1)  # type: ignore[arg-type]


def test_same_size_same_mtime_rewrite_is_retagged_only_with_checksum(contract_onnx: Path, tmp_path: Path) -> None:
    root, out = tmp_path / "catalog", tmp_path / "tags.parquet"
    _catalog(root)
    run(_cfg(root, out, contract_onnx))
    victim = root / "03.png"
    st = victim.stat()
    # Other pixels, same length: the 02.png photo's bytes padded or cut to 03.png's size still decode as an image.
    new = (root / "02.png").read_bytes()
    new = (new + b"\0" * st.st_size)[: st.st_size]
    assert new != victim.read_bytes() and len(new) == st.st_size
    victim.write_bytes(new)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (victim.stat().st_size, victim.stat().st_mtime) == (st.st_size, st.st_mtime)
    old_sha = _rows(out)["03.png"]["sha256"]

    plain = run(_cfg(root, out, contract_onnx, incremental=True))
    assert plain.changes is not None and (plain.changes.changed, plain.changes.unchanged) == (0, 6)
    assert _rows(out)["03.png"]["sha256"] == old_sha  # the stale row, kept

    checked = run(_cfg(root, out, contract_onnx, incremental=True, checksum=True))
    assert checked.changes is not None
    assert checked.changes.line() == "new 0, changed 1, unchanged 5, retagged 0, removed 0, retried 0, failed 0"
    assert (checked.tagged, checked.reused) == (1, 5)
    rows = _rows(out)
    assert rows["03.png"]["sha256"] == hashlib.sha256(victim.read_bytes()).hexdigest() != old_sha
    assert rows["03.png"]["status"] == "ok" and rows["03.png"]["class"] == rows["02.png"]["class"]

    again = run(_cfg(root, out, contract_onnx, incremental=True, checksum=True))
    assert again.changes is not None and (again.changes.unchanged, again.tagged, again.reused) == (6, 0, 6)
    for path, r in _rows(out).items():
        assert r["sha256"] == hashlib.sha256((root / path).read_bytes()).hexdigest()


def test_checksum_never_blocks_on_a_fifo_that_took_a_files_place(contract_onnx: Path, tmp_path: Path) -> None:
    root, out = tmp_path / "catalog", tmp_path / "tags.parquet"
    _catalog(root, n=2)
    victim = root / "empty.png"
    victim.write_bytes(b"")
    listing = tmp_path / "list.txt"
    listing.write_text("00.png\nempty.png\n01.png\n")
    run(_cfg(root, out, contract_onnx, files_from=listing))
    assert _rows(out)["empty.png"]["sha256"] == hashlib.sha256(b"").hexdigest()  # read, hashed, failed to decode
    st = victim.stat()
    victim.unlink()
    os.mkfifo(victim)  # same size (0) and mtime: only --checksum reads it, and must neither block nor keep the row
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    summary = run(_cfg(root, out, contract_onnx, files_from=listing, incremental=True, checksum=True))
    assert summary.changes is not None and (summary.changes.changed, summary.changes.unchanged) == (1, 2)
    row = _rows(out)["empty.png"]
    assert row["error"] == "NotARegularFile: a FIFO, not a regular file" and row["sha256"] is None


def test_checksum_needs_incremental(contract_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--checksum only applies with --incremental"):
        _cfg(tmp_path, tmp_path / "t.parquet", contract_onnx, checksum=True)
    result = CliRunner().invoke(main, ["run", str(tmp_path), "--out", str(tmp_path / "t.parquet"), "--checksum"])
    assert result.exit_code == 2 and "--checksum only applies with --incremental" in result.output
