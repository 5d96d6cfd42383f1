"""decode's worker pool: a worker that dies costs no rows; --decode-memory bounds decoding across all workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from gated import Gate, gate_photo
from PIL import Image

from tagger.cli import main
from tagger.contract import PreprocessSpec
from tagger.pipeline.decode import DecodeMemory, Failure, Sample, decode_many
from tagger.pipeline.discover import discover

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20


def _cli(*args: str | Path, script: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    entry = [str(script)] if script else ["-m", "tagger.cli"]
    return subprocess.Popen(
        [sys.executable, *entry, "run", *map(str, args), "--device", "cpu"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def _rows(out: Path) -> list[dict[str, object]]:
    return pq.read_table(out, columns=["path", "status", "error"]).to_pylist()


def _children(pid: int) -> list[int]:
    """Direct children of pid, from /proc."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def _decode_workers(pid: int) -> list[int]:
    """pid's spawned decode workers (not multiprocessing's resource tracker)."""
    found = []
    for kid in _children(pid):
        try:
            cmdline = Path(f"/proc/{kid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            found.append(kid)
    return found


def _decoding(pid: int) -> bool:
    """Whether a decode worker has an arena slot mapped: it is decoding a chunk (not starting, not idle)."""
    try:
        return "tagger-decode-" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _noise_catalog(root: Path, n: int) -> Path:
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i:04d}.jpg", quality=80)
    return root


def _wait_until_decoding(proc: subprocess.Popen[str], gate: Gate) -> int:
    """The decode worker that waits at the gate, once both workers of the run exist; it is mid-chunk."""
    pid = gate.wait_reached(proc)
    deadline = time.monotonic() + 60
    while len(workers := _decode_workers(proc.pid)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "the run never started its second worker"
        time.sleep(0.005)
    assert pid in workers and _decoding(pid), (pid, workers)
    return pid


def test_a_worker_killed_mid_run_costs_no_rows(contract_onnx: Path, tmp_path: Path) -> None:
    catalog = _noise_catalog(tmp_path / "catalog", 160)
    gate_photo(catalog / "0090.jpg")  # its worker waits there until it is killed: the kill lands mid-chunk
    gate = Gate(tmp_path / "gate")
    out = tmp_path / "out.parquet"
    proc = _cli(catalog, "--out", out, "--model", contract_onnx, "--workers", "2", "--batch-size", "16",
                script=gate.script(), env=gate.env)  # fmt: skip
    os.kill(_wait_until_decoding(proc, gate), signal.SIGKILL)
    gate.open()  # the chunk sent again to the fresh pool decodes
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "a decode worker died" in stderr
    rows = _rows(out)
    assert [r["path"] for r in rows] == [f"{i:04d}.jpg" for i in range(160)]
    assert {r["status"] for r in rows} == {"ok"}


# Run as the CLI's __main__, so spawned decode workers import it too: a Pillow plugin that kills the process
# decoding any file starting with b"CRASH" with SIGSEGV, as a decoder bug would. Only the crash is staged.
CRASHING_DECODER = """
import os, resource, signal
from PIL import Image, ImageFile

class Crash(ImageFile.ImageFile):
    format = "CRASH"

    def _open(self):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.kill(os.getpid(), signal.SIGSEGV)

Image.register_open("CRASH", Crash, lambda prefix: prefix[:5] == b"CRASH")

if __name__ == "__main__":
    from tagger.cli import main
    main()
"""


@pytest.mark.slow
def test_a_file_that_crashes_the_decoder_gets_an_error_row(contract_onnx: Path, tmp_path: Path) -> None:
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    for i in range(60):
        Image.new("RGB", (40, 30), (i * 4, 100, 200)).save(catalog / f"{i:02d}.png")
    (catalog / "37.png").write_bytes(b"CRASH, not a PNG")
    script = tmp_path / "crashing_tagger.py"
    script.write_text(CRASHING_DECODER)
    out = tmp_path / "out.parquet"
    proc = _cli(catalog, "--out", out, "--model", contract_onnx, "--workers", "2", "--batch-size", "8", script=script)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr
    rows = _rows(out)
    assert [r["path"] for r in rows] == [f"{i:02d}.png" for i in range(60)]
    bad = rows.pop(37)
    assert bad["status"] == "error"
    assert str(bad["error"]).startswith("DecoderCrashed: ") and "SIGSEGV" in str(bad["error"]), bad
    assert {r["status"] for r in rows} == {"ok"}


def _tree(pid: int) -> list[int]:
    """pid's descendants, from /proc."""
    found, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        found += kids
        todo += kids
    return found


def _alive(pid: int) -> bool:
    """Whether pid runs (a zombie waiting for a reaper does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_killing_the_run_leaves_no_process_behind(contract_onnx: Path, tmp_path: Path) -> None:
    catalog = _noise_catalog(tmp_path / "catalog", 64)
    gate_photo(catalog / "0040.jpg")  # the gate stays shut: a worker is mid-chunk when the run is killed
    gate = Gate(tmp_path / "gate")
    proc = _cli(catalog, "--out", tmp_path / "out.parquet", "--model", contract_onnx, "--workers", "2",
                "--batch-size", "16", script=gate.script(), env=gate.env)  # fmt: skip
    _wait_until_decoding(proc, gate)
    tree = _tree(proc.pid)
    names = [Path(f"/proc/{p}/cmdline").read_bytes() for p in tree if _alive(p)]
    assert len(tree) >= 3 and any(b"resource_tracker" in n for n in names), names  # 2 workers and the tracker
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while (left := [p for p in tree if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes() for p in left]


# Run from standard input, as `python - <<EOF`: spawn imports the main module again in each worker, and there is no
# file to import, so every worker dies before it decodes anything.
FROM_STDIN = """
import sys
from tagger import RunConfig, run
from tagger.errors import TaggerError
try:
    run(RunConfig(sys.argv[1], sys.argv[2], model=sys.argv[3], workers=2, device="cpu"))
except TaggerError as e:
    sys.exit(f"error: {e}")
"""


def test_a_pool_that_cannot_start_fails_the_run_and_blames_no_file(contract_onnx: Path, tmp_path: Path) -> None:
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    for i in range(12):
        Image.new("RGB", (40, 30), (i * 20, 100, 200)).save(catalog / f"{i:02d}.png")
    out = tmp_path / "out.parquet"
    previous = b"the previous output"
    out.write_bytes(previous)
    proc = subprocess.run(
        [sys.executable, "-", str(catalog), str(out), str(contract_onnx)], input=FROM_STDIN, cwd=tmp_path,
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("error: decode workers cannot start: its workers died before decoding anything ("), last
    assert "No such file or directory" in last and "<stdin>" in last  # the workers' own error
    assert "DecoderCrashed" not in proc.stderr and "kills the decoder" not in proc.stderr
    assert out.read_bytes() == previous
    assert not (tmp_path / "out.parquet.work").exists()  # nothing was tagged: no parts to keep


# A main module that cannot be imported again in a spawned worker: each worker fails at start-up, in its own words.
BROKEN_WORKERS = """
if __name__ == "__mp_main__":
    raise ImportError("libfoo.so.1: cannot open shared object file")

if __name__ == "__main__":
    from tagger.cli import main
    main()
"""


def test_the_cli_names_why_the_workers_cannot_start(contract_onnx: Path, tmp_path: Path) -> None:
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    for i in range(4):
        Image.new("RGB", (40, 30), (i * 20, 100, 200)).save(catalog / f"{i}.png")
    (catalog / "bad.png").write_bytes(b"not a photo")
    out = tmp_path / "out.parquet"
    # An earlier run that failed (--max-errors 0) left its rows in parts; then two more photos arrive.
    first = _cli(catalog, "--out", out, "--model", contract_onnx, "--workers", "0", "--commit-every", "1",
                 "--max-errors", "0")  # fmt: skip
    assert first.wait(timeout=180) == 1
    parts = sorted((tmp_path / "out.parquet.work").glob("part-*"))
    assert parts
    for i in range(4, 6):
        Image.new("RGB", (40, 30), (i * 20, 100, 200)).save(catalog / f"{i}.png")
    script = tmp_path / "broken_tagger.py"
    script.write_text(BROKEN_WORKERS)
    proc = _cli(catalog, "--out", out, "--model", contract_onnx, "--workers", "2", "--resume", script=script)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 1, stderr[-2000:]
    assert stderr.splitlines()[-1] == (
        "error: decode workers cannot start: its workers died before decoding anything (ImportError: libfoo.so.1: "
        "cannot open shared object file); --workers 0 decodes in this process"
    )
    assert not out.exists() and sorted((tmp_path / "out.parquet.work").glob("part-*")) == parts


SPEC = PreprocessSpec(size=32)


def test_an_image_larger_than_the_whole_budget_is_an_error_row_that_says_why(tmp_path: Path) -> None:
    Image.new("L", (3000, 2000), 128).save(tmp_path / "big.png")  # ~29 MiB to decode: 1 byte + 4 for RGB
    Image.new("RGB", (300, 200), (1, 2, 3)).save(tmp_path / "small.png")
    refs = list(discover(tmp_path))
    results = decode_many(refs, SPEC, memory=DecodeMemory(20 * MiB)).results
    assert isinstance(results[0], Failure) and isinstance(results[1], Sample)
    assert results[0].error == "DecodeMemoryError: 3000x2000 needs ~28.7 MiB to decode, more than --decode-memory 20 MiB"
    assert isinstance(decode_many(refs, SPEC, memory=DecodeMemory(30 * MiB)).results[0], Sample)


def test_an_image_larger_than_a_tiny_budget_says_its_size_unrounded(tmp_path: Path) -> None:
    Image.new("RGB", (60, 80)).save(tmp_path / "small.png")  # 60 x 80 x (4 + 4) bytes to decode
    for budget, shown in ((1, "1 byte"), (1000, "1000 bytes"), (int(37.45 * 1024), "37.4 KiB")):
        (result,) = decode_many(list(discover(tmp_path)), SPEC, memory=DecodeMemory(budget)).results
        assert isinstance(result, Failure)
        assert result.error == f"DecodeMemoryError: 60x80 needs ~37.5 KiB to decode, more than --decode-memory {shown}"


@pytest.mark.parametrize(("value", "ok"), [("512MiB", True), ("4GiB", True), ("1000000", True), ("lots", False),
                                           ("0", False), ("-3MiB", False), ("1048576TiB", True),
                                           ("1048577TiB", False), ("8589934592GiB", False), ("1e400", False)])  # fmt: skip
def test_decode_memory_option_takes_sizes(value: str, ok: bool, tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    # --model that does not exist: a good size gets as far as loading it (exit 1), a bad one stops at usage (exit 2).
    result = CliRunner().invoke(
        main, ["run", str(tmp_path), "--out", str(tmp_path / "o.parquet"), "--model", str(tmp_path / "none.onnx"),
               "--decode-memory", value],
    )  # fmt: skip
    assert result.exit_code == (1 if ok else 2), result.output
    if not ok:
        assert "--decode-memory" in result.output


def _tree_rss(pid: int) -> int:
    """Summed RSS in bytes of pid and its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
        todo += _children(p)
    return total


def _peak_tree_rss(args: list[str | Path]) -> int:
    """Run the CLI, sampling its process tree's RSS every ~20 ms; the peak in bytes."""
    proc = _cli(*args)
    peak = 0

    def sample() -> None:
        nonlocal peak
        while proc.poll() is None:
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, stderr = proc.communicate(timeout=300)
    sampler.join()
    assert proc.returncode == 0, stderr
    return peak


@pytest.mark.slow
def test_decode_memory_bounds_the_process_tree(contract_onnx: Path, tmp_path: Path) -> None:
    small, big = tmp_path / "small", tmp_path / "big"
    small.mkdir()
    big.mkdir()
    banner = np.tile(np.arange(6000, dtype=np.uint8), (6000, 1))  # 6000 x 6000 grayscale: 36 MB, ~172 MiB to decode
    for i in range(6):
        Image.new("L", (64, 48), i * 40).save(small / f"{i}.png")
        Image.fromarray(np.roll(banner, i * 7, axis=1), "L").save(big / f"{i}.png", compress_level=1)
    common: list[str | Path] = ["--model", contract_onnx, "--workers", "3", "--batch-size", "2"]
    baseline = _peak_tree_rss([small, "--out", tmp_path / "small.parquet", *common])
    budget = 300 * MiB
    bounded = _peak_tree_rss([big, "--out", tmp_path / "bounded.parquet", *common, "--decode-memory", str(budget)])
    assert {r["status"] for r in _rows(tmp_path / "bounded.parquet")} == {"ok"}
    # Without the budget the peak depends on how the workers happen to overlap (measured once: 680 MiB against
    # 475 MiB here); the wait that holds the bound is tested on its own below.
    assert bounded < baseline + budget


def test_a_decode_waits_until_the_budget_has_room() -> None:
    """Two decoders of one budget: the second one's share waits until the first releases its own, across processes
    as across threads (a spawn Condition and a shared counter)."""
    memory = DecodeMemory(300 * MiB)
    memory.acquire(200 * MiB, "first")
    acquired = threading.Event()

    def second() -> None:
        memory.acquire(200 * MiB, "second")
        acquired.set()

    waiter = threading.Thread(target=second)
    waiter.start()
    assert not acquired.wait(0.5)  # 200 + 200 MiB does not fit in 300
    memory.release(200 * MiB)
    assert acquired.wait(10)
    waiter.join()
    memory.release(200 * MiB)
