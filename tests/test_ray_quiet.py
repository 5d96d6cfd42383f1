"""`tagger run --engine ray` at default verbosity: warnings only on stderr (no INFO from Ray or Ray Data, no line of
Ray's C++ core), and Ray's loggers are left as they were. One real CLI process with its own local Ray instance."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
PHOTO = (REPO / "sample_images/images/10003.jpg").read_bytes()

# The CLI in-process, so that the Ray loggers' levels can be compared before and after the run.
SCRIPT = """
import logging, sys
import ray.data  # Ray Data sets up its loggers on import
from tagger.cli import main
names = ("ray", "ray.data")
before = [logging.getLogger(n).level for n in names]
main(sys.argv[1:], standalone_mode=False)
print("ray loggers restored:", before == [logging.getLogger(n).level for n in names])
"""


def test_default_verbosity_prints_no_info_lines(contract_onnx: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray.data", reason="needs the ray extra: pip install 'tagger[ray]'")
    root, out = tmp_path / "cat", tmp_path / "tags.parquet"
    root.mkdir()
    for i in range(4):
        (root / f"{i}.jpg").write_bytes(PHOTO)
    args = ["run", str(root), "--out", str(out), "--model", str(contract_onnx), "--device", "cpu", "--engine", "ray",
            "--batch-size", "2"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *args], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert pq.read_table(out).num_rows == 4
    assert "ray loggers restored: True" in proc.stdout
    info = [ln for ln in proc.stderr.splitlines() if " INFO " in ln or "\tINFO " in ln]
    assert info == [], "\n".join(info)
    # Ray's C++ core logs outside Python's logging, in lines like '[2026-... E 123 123] core_worker.cc:2465: ...'.
    core = [ln for ln in proc.stderr.splitlines() if re.search(r"\[\d{4}-\d\d-\d\d [\d:,]+ [DIWEF] \d+ \d+\]", ln)]
    assert core == [], "\n".join(core)
