"""A job that did not do its job says so: --max-errors, an OUT.work that is not tagger's, resource bounds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from tagger import ErrorLimit, RunConfig, run
from tagger.cli import main
from tagger.errors import TaggerError, UsageError
from tagger.nightly.workdir import MARKER_FILE
from tagger.compose import MAX_BATCH_SIZE, MAX_IO_THREADS, max_per_machine

REPO = Path(__file__).resolve().parents[1]
PHOTO = (REPO / "sample_images/images/10003.jpg").read_bytes()


def _catalog(root: Path, good: int, bad: int = 0) -> Path:
    root.mkdir()
    for i in range(good):
        (root / f"ok{i}.jpg").write_bytes(PHOTO)
    for i in range(bad):
        (root / f"bad{i}.jpg").write_bytes(b"not a photo")
    return root


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tagger.cli", "run", *map(str, args), "--device", "cpu"], cwd=REPO,
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def test_an_all_error_run_fails_by_default_and_keeps_the_previous_output(contract_onnx: Path, tmp_path: Path) -> None:
    root, out = _catalog(tmp_path / "cat", 0, 3), tmp_path / "tags.parquet"
    out.write_bytes(b"previous output")
    proc = _cli(root, "--out", out, "--model", contract_onnx, "--workers", "0", "--commit-every", "1")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"error: 3 of 3 rows are errors, more than --max-errors 50%; {out} was not replaced"
    )
    assert out.read_bytes() == b"previous output"
    parts = sorted(p.name for p in (tmp_path / "tags.parquet.work").glob("part-*.parquet"))
    assert parts, "the rows tagged so far stay for --resume"
    # --resume with a threshold the rows pass publishes them without tagging again.
    done = _cli(root, "--out", out, "--model", contract_onnx, "--workers", "0", "--resume", "--max-errors", "100%")
    assert done.returncode == 0, done.stderr
    assert "tagged 0, reused 0, resumed 3" in done.stdout
    assert pq.read_table(out).column("status").to_pylist() == ["error"] * 3


@pytest.mark.parametrize(
    ("limit", "fails"), [("1", True), ("2", False), ("49%", True), ("50%", False), ("0", True), ("100%", False)]
)
def test_max_errors_takes_a_count_or_a_percentage(
    contract_onnx: Path, tmp_path: Path, limit: str, fails: bool
) -> None:
    root, out = _catalog(tmp_path / "cat", 2, 2), tmp_path / "tags.parquet"  # 2 error rows of 4: 50%
    config = RunConfig(root, out, model=contract_onnx, device="cpu", workers=0, max_errors=ErrorLimit.parse(limit))
    if fails:
        with pytest.raises(TaggerError, match=f"2 of 4 rows are errors, more than --max-errors {limit};"):
            run(config)
        assert not out.exists()
    else:
        summary = run(config)
        assert (summary.files, summary.errors) == (4, 2) and out.exists()


@pytest.mark.parametrize("value", ["many", "-1", "101%", "-5%", "nan%", "5%%"])
def test_a_bad_max_errors_is_a_usage_error(contract_onnx: Path, tmp_path: Path, value: str) -> None:
    root = _catalog(tmp_path / "cat", 1)
    result = CliRunner().invoke(
        main, ["run", str(root), "--out", str(tmp_path / "o.parquet"), "--model", str(contract_onnx),
               "--max-errors", value],
    )  # fmt: skip
    assert result.exit_code == UsageError.exit_code, result.output
    assert result.output.startswith("error: --max-errors ") and len(result.output.splitlines()) == 1


def test_a_work_folder_that_is_a_link_is_refused_and_its_target_untouched(
    contract_onnx: Path, tmp_path: Path
) -> None:
    root, out = _catalog(tmp_path / "cat", 2), tmp_path / "tags.parquet"
    target = tmp_path / "precious"
    target.mkdir()
    (target / "part-000001-0123456789abcdef.parquet").write_bytes(b"someone's data")
    (target / "identity.json").write_bytes(b"{}")
    (tmp_path / "tags.parquet.work").symlink_to(target)
    proc = _cli(root, "--out", out, "--model", contract_onnx, "--workers", "0")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == [
        f"error: {out}.work is not a folder tagger made (a link or a file); move it away: it was left untouched"
    ]
    assert sorted(p.name for p in target.iterdir()) == ["identity.json", "part-000001-0123456789abcdef.parquet"]
    assert (target / "identity.json").read_bytes() == b"{}" and not out.exists()


def test_a_work_folder_of_other_files_is_refused_and_kept(contract_onnx: Path, tmp_path: Path) -> None:
    root, out = _catalog(tmp_path / "cat", 2), tmp_path / "tags.parquet"
    work = tmp_path / "tags.parquet.work"
    (work / "notes").mkdir(parents=True)
    (work / "notes" / "todo.txt").write_text("mine")
    (work / "part-000001-0123456789abcdef.parquet").write_bytes(b"not tagger's")
    config = RunConfig(root, out, model=contract_onnx, device="cpu", workers=0, resume=True)
    with pytest.raises(TaggerError, match=f"holds files tagger did not put there \\(no {MARKER_FILE}\\)"):
        run(config)
    assert sorted(p.name for p in work.iterdir()) == ["notes", "part-000001-0123456789abcdef.parquet"]
    assert (work / "notes" / "todo.txt").read_text() == "mine" and not out.exists()


def test_a_work_folder_tagger_made_is_resumed_and_removed(contract_onnx: Path, tmp_path: Path) -> None:
    root, out = _catalog(tmp_path / "cat", 2), tmp_path / "tags.parquet"
    empty = tmp_path / "tags.parquet.work"
    empty.mkdir()  # an empty folder holds nothing to lose: claimed
    assert run(RunConfig(root, out, model=contract_onnx, device="cpu", workers=0)).files == 2
    assert not empty.exists()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--threads", 4096),
        ("--threads", max_per_machine() + 1),
        ("--workers", max_per_machine() + 1),
        ("--workers", 100_000),
        ("--io-threads", MAX_IO_THREADS + 1),
        ("--batch-size", MAX_BATCH_SIZE + 1),
    ],
)
def test_resource_options_past_the_machine_are_usage_errors(
    contract_onnx: Path, tmp_path: Path, option: str, value: int
) -> None:
    root, out = _catalog(tmp_path / "cat", 1), tmp_path / "tags.parquet"
    proc = _cli(root, "--out", out, "--model", contract_onnx, option, str(value))
    assert proc.returncode == UsageError.exit_code, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(f"error: {option} must be ")
    assert not out.exists() and not (tmp_path / "tags.parquet.work").exists()


def test_the_largest_allowed_values_are_accepted(tmp_path: Path) -> None:
    config = RunConfig(tmp_path, tmp_path / "o.parquet", workers=max_per_machine(), threads=max_per_machine(),
                       io_threads=MAX_IO_THREADS, batch_size=MAX_BATCH_SIZE)  # fmt: skip
    assert config.threads == max_per_machine()


def test_a_model_with_a_fixed_batch_size_is_refused_up_front(contract_onnx: Path, tmp_path: Path) -> None:
    import onnx

    model = onnx.load(str(contract_onnx))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # the graph still runs at batch 1 only
    fixed = tmp_path / "fixed.onnx"
    onnx.save(model, str(fixed))
    root, out = _catalog(tmp_path / "cat", 3), tmp_path / "tags.parquet"
    proc = _cli(root, "--out", out, "--model", fixed, "--batch-size", "2", "--workers", "0")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == [
        f"error: {fixed} has a fixed batch size of 1 (input 'images' is [1, 32, 32, 3]); the contract wants a "
        "symbolic batch axis N: export the model again with a dynamic batch (tagger export does)"
    ]
    assert not out.exists()


def test_files_from_a_pipe_is_read_once(contract_onnx: Path, tmp_path: Path) -> None:
    root, out = _catalog(tmp_path / "cat", 3), tmp_path / "tags.parquet"
    tagger = [sys.executable, "-m", "tagger.cli", "run", str(root), "--out", str(out), "--model", str(contract_onnx),
              "--device", "cpu", "--workers", "0"]  # fmt: skip
    script = " ".join(f"'{a}'" for a in tagger) + " --files-from <(printf 'ok2.jpg\\nok0.jpg\\n')"
    proc = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert pq.read_table(out).column("path").to_pylist() == ["ok2.jpg", "ok0.jpg"]


@pytest.mark.parametrize("command", ["info", "run"])
def test_a_closed_stdout_is_no_traceback(contract_onnx: Path, tmp_path: Path, command: str) -> None:
    import os

    root, out = _catalog(tmp_path / "cat", 2), tmp_path / "tags.parquet"
    args = ["info", str(contract_onnx)] if command == "info" else [
        "run", str(root), "--out", str(out), "--model", str(contract_onnx), "--device", "cpu", "--workers", "0"
    ]  # fmt: skip
    read, write = os.pipe()
    os.close(read)  # nobody reads stdout: the first line printed fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "tagger.cli", *args], cwd=REPO, stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=180)  # fmt: skip
    finally:
        os.close(write)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr  # 128 + SIGPIPE, as a Unix tool's
    if command == "run":
        assert pq.read_table(out).num_rows == 2  # the run was done before its line could not be printed


def test_a_shard_onto_an_unsharded_output_is_refused(contract_onnx: Path, tmp_path: Path) -> None:
    from tagger.nightly.shard import Shard

    root, out = _catalog(tmp_path / "cat", 6), tmp_path / "tags.parquet"
    run(RunConfig(root, out, model=contract_onnx, device="cpu", workers=0))
    before = out.read_bytes()
    for incremental in (False, True):
        config = RunConfig(root, out, model=contract_onnx, device="cpu", workers=0, shard=Shard(0, 2),
                           incremental=incremental)  # fmt: skip
        with pytest.raises(TaggerError, match=r"holds every shard's rows \(an unsharded run\); --shard 0/2 would"):
            run(config)
        assert out.read_bytes() == before
    shard_out = tmp_path / "tags-0.parquet"
    run(RunConfig(root, shard_out, model=contract_onnx, device="cpu", workers=0, shard=Shard(0, 2)))
    again = run(RunConfig(root, shard_out, model=contract_onnx, device="cpu", workers=0, shard=Shard(0, 2),
                          incremental=True))  # fmt: skip
    assert again.reused == again.files  # the same shard onto its own output is the nightly case
    with pytest.raises(TaggerError, match="holds the rows of shard 0/2; --shard 1/2 would"):
        run(RunConfig(root, shard_out, model=contract_onnx, device="cpu", workers=0, shard=Shard(1, 2)))


def test_incremental_onto_another_catalogs_output_is_refused_unless_allowed(
    contract_onnx: Path, tmp_path: Path
) -> None:
    first, out = _catalog(tmp_path / "first", 3), tmp_path / "tags.parquet"
    other = _catalog(tmp_path / "other", 2)
    run(RunConfig(first, out, model=contract_onnx, device="cpu", workers=0))
    before = out.read_bytes()
    proc = _cli(other, "--out", out, "--model", contract_onnx, "--workers", "0", "--incremental")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == [
        f"error: --incremental: {out} is the output of another catalog ({first}, not {other}); left untouched "
        "(--allow-other-catalog reuses its rows of files with the same path, size and mtime)"
    ]
    assert out.read_bytes() == before
    # A catalog moved: the same files under another folder keep their rows with the flag.
    moved = tmp_path / "moved"
    first.rename(moved)
    summary = run(RunConfig(moved, out, model=contract_onnx, device="cpu", workers=0, incremental=True,
                            allow_other_catalog=True))  # fmt: skip
    assert (summary.files, summary.reused) == (3, 3)
    with pytest.raises(UsageError, match="--allow-other-catalog only applies with --incremental"):
        RunConfig(moved, out, allow_other_catalog=True)
