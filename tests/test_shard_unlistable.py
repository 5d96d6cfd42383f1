"""Sharded incremental runs over a folder that cannot be listed: every shard keeps its own rows beneath it, the
folder's owner alone writes its error row, and the merge equals the unsharded incremental run. Real processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_messy_catalog import PHOTO, _drop_dac

from tagger import RunConfig, run
from tagger.nightly.shard import Shard, shard_of
from tagger.output.reader import file_metadata

REPO = Path(__file__).resolve().parents[1]
NAMES = ["a.jpg", *(f"sub/{i}.jpg" for i in range(8)), "sub/deeper/x.jpg", "z.jpg"]


def _cli(*args: str, prefix: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    cmd = [*prefix, sys.executable, "-m", "tagger.cli", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_sharded_incremental_keeps_every_shards_rows_under_an_unlistable_folder(
    contract_onnx: Path, tmp_path: Path
) -> None:
    root = tmp_path / "cat"
    for rel in NAMES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(PHOTO)
    beneath = [n for n in NAMES if n.startswith("sub/")]
    owner = shard_of("sub/", 3)
    assert len({shard_of(n, 3) for n in beneath} - {owner}) == 2  # rows beneath it in the other two shards too
    whole, shards = tmp_path / "whole.parquet", [tmp_path / f"s{i}.parquet" for i in range(3)]
    model = ("--model", str(contract_onnx), "--device", "cpu", "--workers", "0")
    run(RunConfig(root, whole, model=contract_onnx, device="cpu", workers=0))
    for i, s in enumerate(shards):
        run(RunConfig(root, s, model=contract_onnx, device="cpu", workers=0, shard=Shard(i, 3)))
    (root / "sub").chmod(0)
    try:
        prefix = _drop_dac(root / "sub")
        proc = _cli("run", str(root), "--out", str(whole), *model, "--incremental", prefix=prefix)
        assert proc.returncode == 0, proc.stderr[-2000:]
        for i, s in enumerate(shards):
            proc = _cli("run", str(root), "--out", str(s), *model, "--incremental", "--shard", f"{i}/3", prefix=prefix)
            assert proc.returncode == 0, proc.stderr[-2000:]
            assert "Traceback" not in proc.stderr
    finally:
        (root / "sub").chmod(0o755)
    merged = tmp_path / "merged.parquet"
    proc = _cli("merge", str(merged), *map(str, shards), prefix=())
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = pq.read_table(whole).to_pylist()
    assert [r["path"] for r in expected] == ["a.jpg", "sub/", *beneath, "z.jpg"]
    assert pq.read_table(merged).to_pylist() == expected
    changes = [json.loads(file_metadata(s)["tagger.run.changes"]) for s in shards]
    per_shard = [sum(shard_of(n, 3) == i for n in beneath) for i in range(3)]
    assert [c["unreadable"] for c in changes] == per_shard and sum(per_shard) == len(beneath)
    assert [c["removed"] for c in changes] == [0, 0, 0]
    assert [file_metadata(s)["tagger.run.unlistable"] for s in shards] == [str(int(i == owner)) for i in range(3)]
    assert [r["path"] for r in pq.read_table(shards[owner]).to_pylist()].count("sub/") == 1
