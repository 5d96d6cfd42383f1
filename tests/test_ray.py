"""`tagger run --engine ray`: the local engine's rows, in order, errors included; a killed actor loses none."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import QUADRANT_COLORS, quadrant_image

from tagger.cli import main
from tagger.errors import TaggerError, UsageError
from tagger import ErrorLimit, RunConfig, run

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
RUN_META = ("tagger.run.started", "tagger.run.finished", "ARROW:schema")  # times (also in the Arrow schema) differ


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    """One small local Ray instance for the module; the engine uses an already connected Ray as it is."""
    ray = pytest.importorskip("ray", reason="needs the ray extra: pip install 'tagger[ray]'")
    pytest.importorskip("ray.data", reason="needs Ray Data: pip install 'tagger[ray]'")
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False, logging_level="warning")
    yield ray
    ray.shutdown()


def _run_ray(config: RunConfig, **options: Any) -> Any:
    from tagger.engines.ray import RayOptions, run_ray

    return run_ray(config, RayOptions(**options))


def _meta(path: Path) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in pq.read_metadata(path).metadata.items() if k.decode() not in RUN_META}


def _assert_same_rows(got: list[dict], want: list[dict]) -> None:
    """Row for row after sorting by path: the same labels and fields, scores within 1e-6, embeddings within one
    float16 step."""
    got, want = sorted(got, key=lambda r: r["path"]), sorted(want, key=lambda r: r["path"])
    assert [r["path"] for r in got] == [r["path"] for r in want]
    for g, e in zip(got, want):
        for key, value in e.items():
            if key.endswith("_score") and value is not None:
                assert g[key] == pytest.approx(value, abs=1e-6), (e["path"], key)
            elif key.endswith("_topk") and value is not None:
                assert [t["label"] for t in g[key]] == [t["label"] for t in value], e["path"]
                assert [t["score"] for t in g[key]] == pytest.approx([t["score"] for t in value], abs=1e-6)
            elif key == "embedding" and value is not None:
                assert g[key] == pytest.approx(value, abs=1e-3), e["path"]
            else:
                assert g[key] == value, (e["path"], key)


@pytest.mark.parametrize("model_fixture", ["contract_onnx", "tiny_onnx"])
@pytest.mark.slow
def test_ray_engine_writes_the_local_engines_rows_in_discovery_order(
    model_fixture: str, ray_local: Any, catalog: tuple[Path, dict[str, str]], tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    root, expected = catalog
    model = request.getfixturevalue(model_fixture)
    local, remote = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    run(RunConfig(root, local, model=model, device="cpu", batch_size=4, workers=0, top_k=2, embeddings=True))
    summary = _run_ray(
        RunConfig(root, remote, model=model, device="cpu", batch_size=4, top_k=2, progress=False, embeddings=True)
    )
    want, got = pq.read_table(local), pq.read_table(remote)
    assert got.schema.equals(want.schema)  # types and nullability; the metadata is compared below
    assert "embedding" in got.schema.names
    assert _meta(remote) == _meta(local)
    rows = got.to_pylist()
    assert [r["path"] for r in rows] == sorted(expected)  # discovery order, as the local engine writes it
    assert {r["path"]: r["status"] for r in rows} == expected  # every bad-file kind is an error row
    _assert_same_rows(rows, want.to_pylist())
    n_err = sum(s == "error" for s in expected.values())
    assert (summary.files, summary.ok, summary.errors) == (len(expected), len(expected) - n_err, n_err)
    assert summary.provider == "CPUExecutionProvider"


@pytest.mark.slow
def test_folder_output_is_parts_in_order_each_a_complete_output_file(
    ray_local: Any, catalog: tuple[Path, dict[str, str]], contract_onnx: Path, tmp_path: Path
) -> None:
    root, expected = catalog
    single, folder = tmp_path / "single.parquet", tmp_path / "parts"  # a name without .parquet: a folder
    _run_ray(RunConfig(root, single, model=contract_onnx, device="cpu", batch_size=3, progress=False))
    _run_ray(RunConfig(root, folder, model=contract_onnx, device="cpu", batch_size=3, progress=False), rows_per_part=5)
    parts = sorted(folder.iterdir())
    n_parts = -(-len(expected) // 5)
    assert [p.name for p in parts] == [f"part-{i:05d}.parquet" for i in range(n_parts)] and n_parts > 1
    tables = [pq.read_table(p) for p in parts]
    assert pa.concat_tables(tables).to_pylist() == pq.read_table(single).to_pylist()
    for part, table in zip(parts, tables):
        ok = sum(s == "ok" for s in table.column("status").to_pylist())
        counts = {"files": table.num_rows, "ok": ok, "errors": table.num_rows - ok, "tagged": table.num_rows}
        assert _meta(part) == {**_meta(single), **{f"tagger.run.{k}": str(v) for k, v in counts.items()}}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    with pytest.raises(TaggerError, match="not empty"):
        _run_ray(RunConfig(root, folder, model=contract_onnx, device="cpu", progress=False))


def test_rows_are_put_back_in_discovery_order_and_a_lost_or_repeated_row_is_an_error() -> None:
    from tagger.engines.ray import INDEX, in_discovery_order

    def block(*indices: int) -> pa.Table:
        return pa.table({"path": [f"p{i}" for i in indices], INDEX: pa.array(indices, pa.int64())})

    # Out of order, and blocks mixing distant rows, as an actor batch of two decode blocks does.
    blocks = [block(5, 6, 9), block(0, 1), block(8, 7, 2), block(3, 4)]
    out = list(in_discovery_order(blocks))
    assert pa.concat_tables(out).column("path").to_pylist() == [f"p{i}" for i in range(10)]
    assert all(INDEX not in t.column_names for t in out)
    with pytest.raises(TaggerError, match="lost rows 2 to 2"):
        list(in_discovery_order([block(0, 1), block(3)]))
    with pytest.raises(TaggerError, match="row 1 twice"):
        list(in_discovery_order([block(0, 1), block(1, 2)]))


@pytest.mark.slow
def test_files_from_reports_missing_files_as_error_rows(
    ray_local: Any, catalog: tuple[Path, dict[str, str]], contract_onnx: Path, tmp_path: Path
) -> None:
    root, _ = catalog
    listing = tmp_path / "list.txt"
    listing.write_text("good/photo.png\ngone.jpg\ngood/photo.jpg\n", encoding="utf-8")
    out = tmp_path / "listed.parquet"
    summary = _run_ray(RunConfig(root, out, model=contract_onnx, device="cpu", files_from=listing, progress=False))
    rows = pq.read_table(out).to_pylist()
    assert [(r["path"], r["status"]) for r in rows] == [
        ("good/photo.png", "ok"),
        ("gone.jpg", "error"),
        ("good/photo.jpg", "ok"),
    ]
    assert rows[1]["error"].startswith("FileNotFoundError") and rows[1]["bytes"] is None
    assert summary.errors == 1


@pytest.mark.slow
def test_an_unlistable_folder_gets_its_listing_error_as_the_local_engine_does(
    ray_local: Any, contract_onnx: Path, tmp_path: Path
) -> None:
    from tagger.engines.ray import in_discovery_order, tag_dataset
    from tagger.compose import decoded_batches, tag_batches
    from tagger.pipeline.discover import MISSING_SIZE, ImageRef, discover
    from tagger.pipeline.session import open_session

    root = tmp_path / "cat"
    (root / "sub").mkdir(parents=True)  # a real folder: decoded as a file, it would be "NotARegularFile: a folder"
    (root / "top.jpg").write_bytes((REPO / "sample_images/images/10003.jpg").read_bytes())
    why = "PermissionError: [Errno 13] Permission denied"  # as discover words it; root could list the folder
    refs = [ImageRef("sub/", str(root / "sub"), MISSING_SIZE, float("nan"), why), *discover(root)]
    config = RunConfig(root, tmp_path / "unused.parquet", model=contract_onnx, device="cpu")
    session = open_session(contract_onnx, "cpu", threads=1)
    ds = tag_dataset(refs, config, session.spec, str(contract_onnx), actors=1, gpus=0.0)
    rows = pa.concat_tables(in_discovery_order(ds.iter_batches(batch_size=None, batch_format="pyarrow"))).to_pylist()
    local = [t for _, t in tag_batches(decoded_batches(refs, session.spec, workers=0), session)]
    assert [(r["path"], r["status"], r["error"]) for r in rows] == [("sub/", "error", why), ("top.jpg", "ok", None)]
    _assert_same_rows(rows, pa.concat_tables(local).to_pylist())


@pytest.mark.slow
def test_ray_shards_merge_into_the_unsharded_output(
    ray_local: Any, catalog: tuple[Path, dict[str, str]], contract_onnx: Path, tmp_path: Path
) -> None:
    from tagger.nightly.shard import Shard, merge_shards

    root, _ = catalog
    whole = tmp_path / "whole.parquet"
    run(RunConfig(root, whole, model=contract_onnx, device="cpu", workers=0))
    shards = [tmp_path / f"shard{i}.parquet" for i in range(2)]
    for i, out in enumerate(shards):
        config = RunConfig(root, out, model=contract_onnx, device="cpu", shard=Shard(i, 2), progress=False)
        _run_ray(config)
        assert pq.read_metadata(out).metadata[b"tagger.output.shard"] == f"{i}/2".encode()
    assert all(pq.read_metadata(p).num_rows for p in shards)  # the split means something
    merge_shards(tmp_path / "merged.parquet", shards)
    assert pq.read_table(tmp_path / "merged.parquet").equals(pq.read_table(whole))


def _summary_counts(output: str) -> str:
    """A run's summary line without its rate, time and output: files, ok, errors, changes, tagged/reused/resumed."""
    (line,) = [ln for ln in output.splitlines() if " files, " in ln]
    return re.sub(r"(, [\d.]+ img/s)?, [\d.]+ s on .*", "", line)


def nightly_runs_equal_the_local_engines(
    catalog: Path, tmp_path: Path, tag: Callable[[str, list[str]], tuple[int, str]]
) -> None:
    """One nightly sequence on a copy of `catalog`, for each engine in turn: a run that fails past --max-errors and
    keeps its committed parts; --resume after a file was added and one rewritten; --incremental after one was
    removed, one added and one rewritten. Each Ray step's exit code, summary counts, rows, columns and metadata
    equal the local engine's.

    tag(engine, args): run `tagger` with args and --engine engine; (exit code, output).
    """
    root = tmp_path / "cat"
    shutil.copytree(catalog, root, symlinks=True)
    outs = {"local": tmp_path / "local.parquet", "ray": tmp_path / "ray.parquet"}

    def both(*flags: str) -> dict[str, tuple[int, str]]:
        return {engine: tag(engine, [str(root), "--out", str(out), *flags]) for engine, out in outs.items()}

    failed = both("--max-errors", "0", "--commit-every", "1")
    assert all(code == 1 and "more than --max-errors 0" in text for code, text in failed.values()), failed
    assert all(not out.exists() and out.with_name(out.name + ".work").is_dir() for out in outs.values())

    quadrant_image(36, 36).save(root / "new.png")
    quadrant_image(70, 50, QUADRANT_COLORS[::-1]).save(root / "good/photo.png")
    resumed = both("--resume")
    assert {e: code for e, (code, _) in resumed.items()} == {"local": 0, "ray": 0}, resumed
    counts = {e: _summary_counts(text) for e, (_, text) in resumed.items()}
    assert counts["ray"] == counts["local"] and "tagged 2, reused 0, resumed " in counts["ray"], counts
    _assert_same_outputs(outs["ray"], outs["local"])

    (root / "modes/rgba.png").unlink()
    quadrant_image(44, 30).save(root / "new2.jpg", quality=95)
    quadrant_image(64, 48, QUADRANT_COLORS[::-1]).save(root / "exif/upright.jpg", quality=90)
    again = both("--incremental")
    assert {e: code for e, (code, _) in again.items()} == {"local": 0, "ray": 0}, again
    counts = {e: _summary_counts(text) for e, (_, text) in again.items()}
    assert counts["ray"] == counts["local"], counts
    assert "(new 1, changed 1, unchanged " in counts["ray"] and "removed 1" in counts["ray"], counts
    assert "tagged 2, reused " in counts["ray"], counts
    _assert_same_outputs(outs["ray"], outs["local"])
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".work") or p.name.startswith(".")]


def _assert_same_outputs(got_path: Path, want_path: Path) -> None:
    """The same columns, metadata (run times aside) and rows in the same order."""
    got, want = pq.read_table(got_path), pq.read_table(want_path)
    assert got.schema.equals(want.schema)
    assert _meta(got_path) == _meta(want_path)
    assert got.column("path").to_pylist() == want.column("path").to_pylist()
    _assert_same_rows(got.to_pylist(), want.to_pylist())


@pytest.mark.slow
def test_incremental_and_resume_equal_the_local_engine(
    ray_local: Any, catalog: tuple[Path, dict[str, str]], contract_onnx: Path, tmp_path: Path
) -> None:
    common = ["--model", str(contract_onnx), "--device", "cpu", "--batch-size", "4", "--workers", "0"]

    def tag(engine: str, args: list[str]) -> tuple[int, str]:
        result = CliRunner().invoke(main, ["run", *args, *common, "--engine", engine])
        return result.exit_code, result.output

    nightly_runs_equal_the_local_engines(catalog[0], tmp_path, tag)


@pytest.mark.slow
def test_a_folder_of_parts_resumes_each_part_counting_its_rows_and_is_no_incremental_output(
    ray_local: Any, catalog: tuple[Path, dict[str, str]], contract_onnx: Path, tmp_path: Path
) -> None:
    root, expected = catalog
    folder, single = tmp_path / "parts", tmp_path / "single.parquet"
    common: dict[str, Any] = {"model": contract_onnx, "device": "cpu", "progress": False}
    with pytest.raises(UsageError, match="--incremental reads the previous output as one file"):
        _run_ray(RunConfig(root, folder, incremental=True, **common))
    with pytest.raises(TaggerError, match="more than --max-errors 0"):
        _run_ray(RunConfig(root, folder, max_errors=ErrorLimit(count=0), **common), rows_per_part=5)
    assert not folder.exists() and (tmp_path / "parts.work").is_dir()
    summary = _run_ray(RunConfig(root, folder, resume=True, **common), rows_per_part=5)
    assert (summary.files, summary.tagged, summary.resumed) == (len(expected), 0, len(expected))
    run(RunConfig(root, single, workers=0, **common))
    parts = sorted(folder.iterdir())
    assert len(parts) == -(-len(expected) // 5) and not (tmp_path / "parts.work").exists()
    assert pa.concat_tables([pq.read_table(p) for p in parts]).to_pylist() == pq.read_table(single).to_pylist()
    for part in parts:
        meta, rows = _meta(part), pq.read_metadata(part).num_rows
        assert (meta["tagger.run.files"], meta["tagger.run.tagged"], meta["tagger.run.resumed"]) == (str(rows), "0", str(rows))


@pytest.mark.parametrize(
    ("case", "message"), [("ok", None), ("bad-model", "cannot load model"), ("cuda", "--device cuda")]
)
@pytest.mark.slow
def test_cli_engine_ray(
    case: str, message: str | None, ray_local: Any, catalog: tuple[Path, dict[str, str]], contract_onnx: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    from conftest import cuda_really_works

    root, expected = catalog
    model, out, extra = contract_onnx, tmp_path / "cli.parquet", ["--device", "cpu"]
    if case == "bad-model":
        model = tmp_path / "bad.onnx"
        model.write_bytes(b"\x00not an onnx model\xff" * 8)
    elif case == "cuda":
        if cuda_really_works(contract_onnx):
            pytest.skip("CUDA works on this machine")
        extra = ["--device", "cuda", "--num-gpus-per-actor", "0"]
    args = ["run", str(root), "--out", str(out), "--model", str(model), "--engine", "ray", *extra]
    result = CliRunner().invoke(main, args)
    if message is None:
        assert result.exit_code == 0, result.output
        assert f"{len(expected)} files" in result.output
        assert pq.read_table(out).num_rows == len(expected)
    else:
        # A TaggerError raised inside a Ray worker reaches the CLI as itself: one line, no traceback.
        assert result.exit_code == TaggerError.exit_code
        lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], result.output
        assert "Traceback" not in result.output
        assert not out.exists()


def test_cli_ray_options_need_engine_ray(catalog: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["run", str(catalog[0]), "--out", str(tmp_path / "x.parquet"), "--actors", "2"])
    assert result.exit_code == 2 and "need --engine ray" in result.output


def test_an_output_that_is_an_input_is_refused_before_ray_starts(contract_onnx: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray", reason="needs the ray extra: pip install 'tagger[ray]'")
    pytest.importorskip("ray.data", reason="needs Ray Data: pip install 'tagger[ray]'")
    root = tmp_path / "cat"
    root.mkdir()
    quadrant_image(40, 30).save(root / "a.jpg")
    model = tmp_path / "m.onnx"
    model.write_bytes(contract_onnx.read_bytes())
    before = {p: p.read_bytes() for p in (root / "a.jpg", model)}
    was_running = ray.is_initialized()
    for out, message in ((root / "a.jpg", "that the run tags"), (model, "is the model itself")):
        args = ["run", str(root), "--out", str(out), "--model", str(model), "--engine", "ray"]
        result = CliRunner().invoke(main, args)
        lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
        assert result.exit_code == TaggerError.exit_code and len(lines) == 1 and message in lines[0], result.output
    assert ray.is_initialized() == was_running  # refused before Ray was started or joined
    assert {p: p.read_bytes() for p in before} == before and sorted(os.listdir(root)) == ["a.jpg"]


@pytest.mark.slow
def test_folder_output_has_the_modes_a_file_output_gets(ray_local: Any, contract_onnx: Path, tmp_path: Path) -> None:
    root = tmp_path / "cat"
    root.mkdir()
    for i in range(3):
        quadrant_image(40 + i, 30).save(root / f"p{i}.jpg")
    saved = os.umask(0o022)
    try:
        folder, file = tmp_path / "parts", tmp_path / "tags.parquet"
        _run_ray(RunConfig(root, folder, model=contract_onnx, device="cpu", progress=False), rows_per_part=2)
        run(RunConfig(root, file, model=contract_onnx, device="cpu", workers=0))
    finally:
        os.umask(saved)
    parts = sorted(folder.iterdir())
    assert len(parts) == 2 and oct(folder.stat().st_mode & 0o777) == "0o755"  # not mkdtemp's 0o700
    assert {oct(p.stat().st_mode & 0o777) for p in [*parts, file]} == {"0o644"}


def test_without_ray_the_cli_says_how_to_install_it(catalog: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    out = tmp_path / "noray.parquet"
    code = (
        "import sys\n"
        "sys.modules['ray'] = None  # what an install without the extra looks like to `import ray`\n"
        "import tagger.engines.ray\n"  # importable without Ray: Ray is imported only when a run starts
        "from tagger.cli import main\n"
        f"main(['run', {str(catalog[0])!r}, '--out', {str(out)!r}, '--engine', 'ray'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == TaggerError.exit_code, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "error: --engine ray needs Ray, which is not installed: pip install 'tagger[ray]'"
    ]
    assert not out.exists()


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces


def _actor_pids() -> set[int]:
    """This test's inference actor processes: titled ray::MapWorker(MapBatches(TagActor)), children of the raylet
    that this process started (so another Ray on the same machine is never touched)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "cmdline").read_bytes().startswith(b"ray::MapWorker(MapBatches(TagActor))"):
                if _ppid(_ppid(int(entry.name))) == os.getpid():
                    pids.add(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue  # the process ended while being read
    return pids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the actor's process through /proc")
@pytest.mark.slow
def test_a_killed_inference_actor_is_restarted_and_loses_no_rows(
    ray_local: Any, contract_onnx: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from tagger.engines.ray import in_discovery_order, tag_dataset
    from tagger.pipeline.discover import discover
    from tagger.pipeline.session import open_session

    root = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(0)
    for i in range(240):
        colors = [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(4)]
        quadrant_image(32, 32, colors).save(root / f"{i:03d}.png")
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    refs = list(discover(root))
    local = tmp_path_factory.mktemp("local") / "local.parquet"
    run(RunConfig(root, local, model=contract_onnx, device="cpu", batch_size=8, workers=0))
    config = RunConfig(root, local.with_name("unused.parquet"), model=contract_onnx, device="cpu", batch_size=8)
    spec = open_session(contract_onnx, "cpu", threads=1).spec

    ds = tag_dataset(refs, config, spec, str(contract_onnx), actors=1, gpus=0.0)
    blocks = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    first = next(blocks)  # the actor is up and has tagged a batch: kill it now, mid-run
    killed = _actor_pids()
    assert killed
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    rest: list[pa.Table] = []
    seen: set[int] = set()
    done = threading.Event()

    def drain() -> None:
        for block in blocks:
            rest.append(block)
            seen.update(_actor_pids())
        done.set()

    threading.Thread(target=drain, daemon=True).start()
    assert done.wait(timeout=90), "the run did not finish after its actor was killed"
    assert seen - killed, "no restarted actor took over"
    table = pa.concat_tables(list(in_discovery_order([first, *rest])))
    assert table.column("path").to_pylist() == [r.path for r in refs]  # 241 rows, none lost, none twice
    _assert_same_rows(table.to_pylist(), pq.read_table(local).to_pylist())
