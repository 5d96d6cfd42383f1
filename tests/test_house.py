"""The house rules, checked from outside: exit codes, quiet output, no process-wide side effects, imports point down."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import cuda_really_works
from tagger import RunConfig, RunSummary, run
from tagger.cli import main
from tagger.nightly.shard import Shard

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_images"


def _tagger(*args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "tagger.cli", *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for p in sorted((SAMPLES / "images").glob("*.jpg"))[:4]:
        shutil.copy(p, root / p.name)
    return root


@pytest.mark.parametrize(
    "args",
    [
        ["--shard", "9/2"],
        ["--shard", "one of two"],
        ["--top-k", "-1"],
        ["--retry-errors"],
        ["--ext", ","],
        ["--no-such-option"],
    ],
)
def test_usage_errors_exit_2(args: list[str], photos: Path, contract_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    result = CliRunner().invoke(main, ["run", str(photos), "--out", str(out), "--model", str(contract_onnx), *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not out.exists()


def test_a_job_that_cannot_be_done_exits_1_with_one_line(photos: Path, contract_onnx: Path, tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("a file where the output folder should be")
    proc = _tagger("run", photos, "--out", not_a_folder / "tags.parquet", "--model", contract_onnx, "--workers", "0")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: cannot write") and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stdout == ""


def test_a_read_only_output_folder_exits_1(photos: Path, contract_onnx: Path, tmp_path: Path) -> None:
    """As root, the folder's mode binds only once the DAC override capabilities are dropped (setpriv)."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        prefix = ["setpriv", "--bounding-set", "-dac_override", "--inh-caps", "-dac_override"]
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: a read-only folder does not bind root")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    cmd = [*prefix, sys.executable, "-m", "tagger.cli", "run", str(photos), "--out", str(folder / "t.parquet")]
    proc = subprocess.run([*cmd, "--model", str(contract_onnx)], cwd=REPO, capture_output=True, text=True, timeout=300)
    if proc.returncode == 0 and prefix:
        pytest.skip("setpriv could not drop the DAC override capability here")
    assert proc.returncode == 1 and proc.stderr.startswith("error: cannot write"), proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and list(folder.iterdir()) == []


def test_missing_cuda_is_one_clean_line(photos: Path, contract_onnx: Path, tmp_path: Path) -> None:
    if cuda_really_works(contract_onnx):
        pytest.skip("CUDA works on this machine")
    proc = _tagger("run", photos, "--out", tmp_path / "t.parquet", "--model", contract_onnx, "--device", "cuda")
    assert proc.returncode == 1
    # Nothing from onnxruntime's own log before our line.
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: --device cuda"), proc.stderr


def test_a_run_prints_one_summary_line_and_nothing_else(photos: Path, contract_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.parquet"
    proc = _tagger("run", photos, "--out", out, "--model", contract_onnx, "--workers", "0")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.count("\n") == 1 and proc.stdout.startswith("4 files, 4 ok, 0 errors"), proc.stdout

    again = _tagger("run", photos, "--out", out, "--model", contract_onnx, "--workers", "0", "--incremental")
    # Nothing was tagged: no rate of 0.0 img/s, and the counts add up.
    assert "img/s" not in again.stdout and "unchanged 4" in again.stdout and "tagged 0, reused 4" in again.stdout

    verbose = _tagger("-v", "run", photos, "--out", tmp_path / "v.parquet", "--model", contract_onnx, "--workers", "0")
    assert verbose.returncode == 0 and " INFO " in verbose.stderr and verbose.stdout.count("\n") == 1


def test_info_without_a_model_describes_the_default_one() -> None:
    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0, result.output
    assert "tagger-default.onnx" in result.output and "class" in result.output


def test_merge_with_out_forgotten_says_out_comes_first(photos: Path, contract_onnx: Path, tmp_path: Path) -> None:
    shards = [tmp_path / f"s{i}.parquet" for i in range(2)]
    for i, shard in enumerate(shards):
        run(RunConfig(photos, shard, model=contract_onnx, workers=0, shard=Shard(i, 2)))
    before = [s.read_bytes() for s in shards]
    result = CliRunner().invoke(main, ["merge", *map(str, shards)])
    assert result.exit_code == 1 and "OUT comes first" in result.output, result.output
    result = CliRunner().invoke(main, ["merge", str(shards[0]), *map(str, shards)])
    assert result.exit_code == 1 and "is one of the shards" in result.output, result.output
    assert [s.read_bytes() for s in shards] == before


def test_a_run_in_process_leaves_pillows_bomb_guard_as_it_was(photos: Path, contract_onnx: Path, tmp_path: Path) -> None:
    before = Image.MAX_IMAGE_PIXELS
    summary = run(RunConfig(photos, tmp_path / "t.parquet", model=contract_onnx, workers=0))
    assert summary.ok == 4 and Image.MAX_IMAGE_PIXELS == before


def test_summary_shows_no_rate_when_nothing_was_tagged() -> None:
    summary = RunSummary(Path("t.parquet"), 3, 3, 0, 0.2, "CPUExecutionProvider", tagged=0, reused=3)
    assert "img/s" not in summary.line() and "tagged 0, reused 3" in summary.line()


def _imports(path: Path) -> set[str]:
    """The tagger modules a file imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("tagger.")}


def _part(module: str) -> str:
    """tagger.pipeline.decode -> pipeline; tagger.export -> export."""
    return module.split(".")[1]


def test_no_import_cycle_between_taggers_parts() -> None:
    package = REPO / "tagger"
    modules = {
        ".".join(p.relative_to(REPO).with_suffix("").parts): p
        for p in package.rglob("*.py")
        if p.name != "__init__.py" or p.parent != package
    }
    parts = {_part(name) for name in modules}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        part = _part(name)
        for target in _imports(path):
            if _part(target) in parts and _part(target) != part:
                graph.setdefault(part, set()).add(_part(target))
    assert "cli" not in {t for targets in graph.values() for t in targets}, "nothing imports the CLI"

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(p for p in graph if reaches(p, p, {p}))
    assert not cycles, {p: sorted(graph[p]) for p in cycles}


def test_stages_do_not_import_the_parts_above_them() -> None:
    stages = sorted((REPO / "tagger" / "pipeline").glob("*.py"))
    assert {p.stem for p in stages} >= {"discover", "decode", "batch", "session", "postprocess"}
    for path in stages:
        above = {m for m in _imports(path) if _part(m) in ("output", "nightly", "engines", "cli", "compose")}
        assert not above, (path.name, above)
