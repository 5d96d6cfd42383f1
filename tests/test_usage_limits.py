"""Out-of-range and empty option values are usage errors, a huge --batch-size on a small catalog just works, and
whatever still fails is one line on stderr, never a traceback. Real processes where the CLI is the subject."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from tagger import RunConfig
from tagger.cli import _friendly, main
from tagger.errors import UsageError
from tagger.compose import MAX_BATCH_SIZE
from tagger.pipeline.decode import MAX_DECODE_MEMORY

REPO = Path(__file__).resolve().parents[1]
PHOTO = (REPO / "sample_images/images/10003.jpg").read_bytes()


def _catalog(root: Path, n: int) -> Path:
    root.mkdir()
    for i in range(n):
        (root / f"{i}.jpg").write_bytes(PHOTO)
    return root


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", ""], "--out must name a file, got ''"),
        (["--out", "/"], "--out must name a file, got '/'"),
        (["--out", "s3://bucket"], "--out must name a file, got 's3://bucket'"),
        (["--out", "o.parquet", "--commit-seconds", "nan"], "must be finite and >= 0"),
        (["--out", "o.parquet", "--commit-seconds", "inf"], "must be finite and >= 0"),
        (["--out", "o.parquet", "--decode-memory", "8589934592GiB"], "--decode-memory must be at most 1 EiB"),
    ],
)
def test_run_refuses_values_it_cannot_use(contract_onnx: Path, tmp_path: Path, args: list[str], message: str) -> None:
    root = _catalog(tmp_path / "cat", 1)
    result = CliRunner().invoke(main, ["run", str(root), "--model", str(contract_onnx), "--device", "cpu", *args])
    assert result.exit_code == UsageError.exit_code, result.output
    assert isinstance(result.exception, SystemExit)  # a clean exit, not an escaped exception
    last = result.output.splitlines()[-1]
    assert last.startswith("error: ") and message in last and "Traceback" not in result.output


def test_merge_refuses_an_empty_out(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["merge", "", str(tmp_path / "s0.parquet")])
    assert result.exit_code == UsageError.exit_code and isinstance(result.exception, SystemExit), result.output
    assert result.output.strip() == "error: OUT must name a file, got ''"


def test_decode_memory_is_bounded_where_it_is_validated(tmp_path: Path) -> None:
    assert RunConfig(tmp_path, tmp_path / "o.parquet", decode_memory=MAX_DECODE_MEMORY).decode_memory == 2**60
    for too_big in (MAX_DECODE_MEMORY + 1, 2**63):
        with pytest.raises(UsageError, match="at most 1 EiB"):
            RunConfig(tmp_path, tmp_path / "o.parquet", decode_memory=too_big)


def test_a_batch_size_far_above_the_catalog_just_works(contract_onnx: Path, tmp_path: Path) -> None:
    root, out = _catalog(tmp_path / "cat", 4), tmp_path / "tags.parquet"
    cmd = [sys.executable, "-m", "tagger.cli", "run", str(root), "--out", str(out), "--model", str(contract_onnx),
           "--device", "cpu", "--batch-size", str(MAX_BATCH_SIZE), "--workers", "2"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert pq.read_table(out).column("status").to_pylist() == ["ok"] * 4


def test_a_memory_error_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    @_friendly
    def allocate() -> None:
        bytearray(2**62)  # more than any machine: MemoryError

    with pytest.raises(SystemExit) as exit_info:
        allocate()
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: out of memory: MemoryError\n"
