"""Nightly runs: incremental reuse, crash-safe resume (real SIGKILLed processes), shards and merge, and the guarantee
that a failed run never damages the previous output. Real files, real ONNX Runtime sessions, Parquet read back."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import make_contract_onnx, quadrant_image
from gated import Gate, gate_photo

from tagger.cli import main
from tagger.errors import TaggerError
from tagger.output.reader import file_metadata
from tagger.nightly.workdir import WorkDir, work_dir_of
from tagger import RunConfig, RunSummary, run
from tagger.nightly.shard import Shard, merge_shards, shard_of

REPO = Path(__file__).resolve().parents[1]
Catalog = tuple[Path, dict[str, str]]  # the `catalog` fixture: (folder, {relative path: expected status})


def _photos(root: Path, names: list[str], seed: int, size: tuple[int, int] = (64, 48)) -> None:
    """Write one quadrant photo per name (JPEG or PNG by extension), each with its own random colours."""
    rng = np.random.default_rng(seed)
    for name in names:
        colors = [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(4)]
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        img = quadrant_image(*size, colors)  # type: ignore[arg-type]
        if name.endswith(".png"):
            img.save(path, compress_level=1)
        else:
            img.save(path, quality=90)


def _decoded(path: Path) -> pa.Table:
    """An output's rows with label columns as plain strings, in one chunk: compares values, not encodings."""
    t = pq.read_table(path)
    cols = [c.cast(c.type.value_type) if pa.types.is_dictionary(c.type) else c for c in t.columns]
    return pa.table([c.combine_chunks() for c in cols], names=t.column_names)


def assert_same_output(a: Path, b: Path) -> None:
    """Same columns, rows, order and values, and the same metadata except what describes one run (tagger.run.*)."""
    assert pq.read_schema(a).equals(pq.read_schema(b), check_metadata=False)
    ta, tb = pq.read_table(a), pq.read_table(b)
    assert ta.column("path").to_pylist() == tb.column("path").to_pylist()
    assert ta.equals(tb)  # values, and the label columns' dictionaries too
    ma = {k: v for k, v in file_metadata(a).items() if not k.startswith("tagger.run.")}
    mb = {k: v for k, v in file_metadata(b).items() if not k.startswith("tagger.run.")}
    assert ma == mb


def _cfg(root: Path, out: Path, model: Path, **kw: object) -> RunConfig:
    return RunConfig(root, out, model=model, device="cpu", workers=0, batch_size=4, **kw)  # type: ignore[arg-type]


def _status(path: Path) -> dict[str, str]:
    t = pq.read_table(path, columns=["path", "status"])
    return dict(zip(t.column("path").to_pylist(), t.column("status").to_pylist()))


# --- incremental -------------------------------------------------------------------------------------------------


def test_incremental_reuses_unchanged_rows_and_equals_a_fresh_run(contract_onnx: Path, tmp_path: Path) -> None:
    root, out = tmp_path / "catalog", tmp_path / "tags.parquet"
    names = [f"{d}/{i:02d}.{'png' if i % 3 == 0 else 'jpg'}" for d in ("a", "b") for i in range(12)]
    _photos(root, names, seed=1)
    (root / "broken.jpg").write_text("never an image")
    # A file that fails now and is fixed later without its size or mtime changing: only --retry-errors sees it.
    flaky = root / "flaky.jpg"
    _photos(root, ["flaky.jpg"], seed=2)
    good = flaky.read_bytes()
    flaky.write_bytes(b"\0" * len(good))
    first = run(_cfg(root, out, contract_onnx))
    assert (first.files, first.errors) == (26, 2)

    stat = flaky.stat()
    flaky.write_bytes(good)
    os.utime(flaky, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    _photos(root, ["a/new1.jpg", "c/new2.png"], seed=3)  # new
    _photos(root, ["a/01.jpg"], seed=4, size=(80, 60))  # changed content
    os.utime(root / "b/04.jpg", (time.time() + 5, time.time() + 5))  # changed mtime only
    (root / "b/05.jpg").write_bytes(b"corrupted")  # changed, and now an error
    (root / "a/02.jpg").unlink()
    (root / "b/09.png").unlink()  # removed

    result = CliRunner().invoke(
        main, ["run", str(root), "--out", str(out), "--model", str(contract_onnx), "--device", "cpu", "--workers", "0",
               "--batch-size", "4", "--incremental"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    counts = "new 2, changed 3, unchanged 21, retagged 0, removed 2, retried 0, failed 1); tagged 5, reused 21, resumed 0"
    assert counts in result.output
    assert _status(out)["flaky.jpg"] == "error"  # unchanged by size and mtime, so its row is kept

    summary = run(_cfg(root, out, contract_onnx, incremental=True, retry_errors=True))
    assert summary.changes is not None
    assert summary.changes.line() == "new 0, changed 0, unchanged 23, retagged 0, removed 0, retried 3, failed 2"
    assert (summary.tagged, summary.reused, summary.files) == (3, 23, 26)
    assert _status(out)["flaky.jpg"] == "ok" and _status(out)["broken.jpg"] == "error"
    meta = file_metadata(out)
    assert (meta["tagger.run.tagged"], meta["tagger.run.reused"]) == ("3", "23")

    fresh = tmp_path / "fresh.parquet"
    run(_cfg(root, fresh, contract_onnx))
    assert_same_output(out, fresh)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalog", "fresh.parquet", "tags.parquet"]  # no leftovers


def test_incremental_with_another_model_tags_everything_unless_told_to_keep_its_rows(
    catalog: Catalog, contract_onnx: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, expected = catalog
    other = make_contract_onnx(tmp_path / "other.onnx", seed=7)  # same labels, other weights
    kept, retagged, fresh = tmp_path / "kept.parquet", tmp_path / "retagged.parquet", tmp_path / "fresh.parquet"
    run(_cfg(root, kept, contract_onnx, top_k=2))
    shutil.copy(kept, retagged)
    old_rows = _decoded(kept)

    with caplog.at_level(logging.WARNING):
        summary = run(_cfg(root, retagged, other, top_k=2, incremental=True))
    assert "tagged by another model" in caplog.text and "tagging everything again" in caplog.text
    # Unchanged files tagged again count as retagged, so the counts add up to what the run did.
    assert summary.changes is not None and (summary.changes.unchanged, summary.changes.retagged) == (0, len(expected))
    assert (summary.reused, summary.tagged) == (0, len(expected))
    run(_cfg(root, fresh, other, top_k=2))
    assert_same_output(retagged, fresh)
    assert not _decoded(fresh).equals(old_rows)  # the models really disagree somewhere

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        summary = run(_cfg(root, kept, other, top_k=2, incremental=True, keep_stale_model=True))
    assert "--keep-stale-model: keeping its rows" in caplog.text
    assert (summary.reused, summary.tagged) == (len(expected), 0)
    assert _decoded(kept).equals(old_rows)  # the first model's predictions, kept


@pytest.mark.parametrize("case", ["not-parquet", "no-tagger-metadata", "other-format"])
def test_incremental_refuses_a_foreign_output_and_leaves_it_untouched(
    case: str, catalog: Catalog, contract_onnx: Path, tmp_path: Path
) -> None:
    root, _ = catalog
    out = tmp_path / "tags.parquet"
    if case == "not-parquet":
        out.write_text("path,class\nx.jpg,Shirts\n")
    elif case == "no-tagger-metadata":
        pq.write_table(pa.table({"path": ["x.jpg"], "class": ["Shirts"]}), out)
    else:
        run(_cfg(root, out, contract_onnx))
        table = pq.read_table(out)
        meta = {**table.schema.metadata, b"tagger.format": b"2"}
        pq.write_table(table.replace_schema_metadata(meta), out)
    before = out.read_bytes()
    result = CliRunner().invoke(
        main, ["run", str(root), "--out", str(out), "--model", str(contract_onnx), "--workers", "0", "--incremental"]
    )
    assert result.exit_code == TaggerError.exit_code
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "left untouched" in errors[0], result.output
    reason = {"not-parquet": "not a readable Parquet", "no-tagger-metadata": "lacks", "other-format": "format 2"}[case]
    assert reason in errors[0]
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tags.parquet"]


# --- crash-safe resume -------------------------------------------------------------------------------------------

CRASH_FILES = 300
GATED = "p150.png"  # a run through gated.py waits there until its gate opens: it is still running when signalled


@pytest.fixture(scope="module")
def crash_catalog(contract_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(catalog of CRASH_FILES photos, the output of one uninterrupted run over it)."""
    root = tmp_path_factory.mktemp("crash_catalog")
    _photos(root, [f"p{i:03d}.png" for i in range(CRASH_FILES)], seed=5, size=(640, 480))
    gate_photo(root / GATED)
    reference = tmp_path_factory.mktemp("reference") / "tags.parquet"
    run(_cfg(root, reference, contract_onnx))
    return root, reference


def _cli(*args: str | Path, script: Path | None = None) -> list[str]:
    entry = [str(script)] if script else ["-m", "tagger.cli"]
    return [sys.executable, *entry, "run", *map(str, args)]


@pytest.fixture(scope="module")
def crashed(crash_catalog: tuple[Path, Path], contract_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output path of a `tagger run` SIGKILLed after its first commits; copy the folder before changing it."""
    root, _ = crash_catalog
    out = tmp_path_factory.mktemp("crashed") / "tags.parquet"
    out.write_bytes(b"the previous night's output")
    work = work_dir_of(out)
    gate = Gate(tmp_path_factory.mktemp("gate"))  # never opened
    args = _cli(root, "--out", out, "--model", contract_onnx, "--device", "cpu", "--workers", "0", "--batch-size", "1",
                "--threads", "1", "--commit-every", "5", script=gate.script())  # fmt: skip
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=gate.env)
    deadline = time.monotonic() + 60
    try:
        while len(list(work.glob("part-*.parquet"))) < 2:
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, f"the run ended by itself (rc {proc.returncode}): {stderr[-2000:]}"
    assert out.read_bytes() == b"the previous night's output"  # a killed run never touches the output
    return out


def _copy_crashed(crashed: Path, dest: Path) -> Path:
    shutil.copytree(crashed.parent, dest)
    return dest / crashed.name


def _part_rows(out: Path) -> dict[Path, int]:
    return {p: pq.read_metadata(p).num_rows for p in sorted(work_dir_of(out).glob("part-*.parquet"))}


def test_killed_run_resumes_where_it_stopped(
    crashed: Path, crash_catalog: tuple[Path, Path], contract_onnx: Path, tmp_path: Path
) -> None:
    root, reference = crash_catalog
    out = _copy_crashed(crashed, tmp_path / "c")
    committed = sum(_part_rows(out).values())
    assert 10 <= committed < CRASH_FILES
    proc = subprocess.run(
        _cli(root, "--out", out, "--model", contract_onnx, "--device", "cpu", "--workers", "0", "--resume"),
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"tagged {CRASH_FILES - committed}, reused 0, resumed {committed}" in proc.stdout
    assert file_metadata(out)["tagger.run.tagged"] == str(CRASH_FILES - committed)
    assert_same_output(out, reference)
    assert not work_dir_of(out).exists()


def test_sigterm_commits_what_was_tagged_and_resume_finishes(
    crash_catalog: tuple[Path, Path], contract_onnx: Path, tmp_path: Path
) -> None:
    root, reference = crash_catalog
    out = tmp_path / "tags.parquet"
    gate = Gate(tmp_path / "gate")
    args = _cli(root, "--out", out, "--model", contract_onnx, "--device", "cpu", "--workers", "0", "--batch-size", "1",
                "--threads", "1", "--commit-every", "7", script=gate.script())  # fmt: skip
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=gate.env)
    deadline = time.monotonic() + 60
    while not list(work_dir_of(out).glob("part-*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)  # what a scheduler sends before it kills
    gate.open()  # a decode waiting there ends, so the unwinding need not wait for it
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "rerun with --resume" in stderr and not out.exists()
    # Unwinding commits the rows tagged since the last commit too, so the parts need not hold a multiple of 7.
    committed = sum(_part_rows(out).values())
    summary = run(_cfg(root, out, contract_onnx, resume=True))
    assert (summary.resumed, summary.tagged) == (committed, CRASH_FILES - committed)
    assert_same_output(out, reference)


def test_torn_part_is_detected_and_its_rows_tagged_again(
    crashed: Path,
    crash_catalog: tuple[Path, Path],
    contract_onnx: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    root, reference = crash_catalog
    out = _copy_crashed(crashed, tmp_path / "c")
    parts = _part_rows(out)
    torn = list(parts)[0]
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])  # a part cut short, as by a power loss
    (work_dir_of(out) / ".part-999999-0000000000000000.parquet.tmp").write_bytes(b"PAR1 half-written")
    with caplog.at_level(logging.WARNING):
        summary = run(_cfg(root, out, contract_onnx, resume=True))
    assert re.search(rf"work part .*{torn.name} is unusable \(checksum mismatch", caplog.text)
    assert summary.resumed == sum(parts.values()) - parts[torn]
    assert summary.tagged == CRASH_FILES - summary.resumed
    assert_same_output(out, reference)
    assert not work_dir_of(out).exists()


def test_parts_of_another_run_are_discarded(
    crashed: Path,
    crash_catalog: tuple[Path, Path],
    contract_onnx: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    root, _ = crash_catalog
    out = _copy_crashed(crashed, tmp_path / "c")
    with caplog.at_level(logging.WARNING):
        summary = run(_cfg(root, out, contract_onnx, resume=True, top_k=3))  # top_k changes every row
    assert "belong to another run (tagger.output.options differ)" in caplog.text
    assert (summary.resumed, summary.tagged) == (0, CRASH_FILES)


def test_a_second_run_on_the_same_output_is_refused_while_one_runs(
    catalog: Catalog, contract_onnx: Path, tmp_path: Path
) -> None:
    root, _ = catalog
    out = tmp_path / "tags.parquet"
    with WorkDir(out, {"held": "by another run"}, (), 0, resume=False):
        with pytest.raises(TaggerError, match="another tagger run is writing"):
            run(_cfg(root, out, contract_onnx))
    assert not out.exists()


# --- shards --------------------------------------------------------------------------------------------------------


def test_shard_of_is_a_stable_path_hash() -> None:
    # Fixed values: the split must not change between runs, machines or Python versions (hash() would).
    assert [shard_of(p, 3) for p in ("a.jpg", "images/1163.jpg", "résumé/café.jpg")] == [2, 2, 1]
    counts = np.bincount([shard_of(f"images/{i}.jpg", 4) for i in range(4000)], minlength=4)
    assert counts.min() > 900
    assert Shard.parse(" 2/3 ") == Shard(2, 3) and str(Shard(0, 1)) == "0/1"
    for bad in ("3/3", "1", "-1/2", "a/b"):
        with pytest.raises(TaggerError, match="shard"):
            Shard.parse(bad)


@pytest.fixture(scope="module")
def sharded(
    catalog: Catalog, contract_onnx: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[Path]]:
    """(unsharded output, [shard 0/3, 1/3, 2/3 outputs]) of the shared catalog, with top-k."""
    root, _ = catalog
    d = tmp_path_factory.mktemp("shards")
    whole = d / "whole.parquet"
    run(_cfg(root, whole, contract_onnx, top_k=2))
    shards = [d / f"shard{i}.parquet" for i in range(3)]
    for i, s in enumerate(shards):
        run(_cfg(root, s, contract_onnx, top_k=2, shard=Shard(i, 3)))
    return whole, shards


def test_merged_shards_equal_the_unsharded_run(sharded: tuple[Path, list[Path]], tmp_path: Path) -> None:
    whole, shards = sharded
    paths = [pq.read_table(s, columns=["path"]).column("path").to_pylist() for s in shards]
    assert all(paths) and sorted(sum(paths, [])) == pq.read_table(whole).column("path").to_pylist()
    for i, (s, ps) in enumerate(zip(shards, paths)):
        assert file_metadata(s)["tagger.output.shard"] == f"{i}/3"
        assert all(shard_of(p, 3) == i for p in ps)
    merged = tmp_path / "merged.parquet"
    result = CliRunner().invoke(main, ["merge", str(merged), *map(str, reversed(shards))])
    assert result.exit_code == 0, result.output
    assert f"merged 3 shards: {sum(map(len, paths))} files" in result.output
    assert_same_output(merged, whole)
    assert file_metadata(merged)["tagger.run.files"] == file_metadata(whole)["tagger.run.files"]


def test_merge_refuses_overlapping_missing_or_mismatched_shards(
    sharded: tuple[Path, list[Path]], catalog: Catalog, contract_onnx: Path, tmp_path: Path
) -> None:
    whole, (s0, s1, s2) = sharded
    root, _ = catalog
    other_model = tmp_path / "other-model.parquet"
    run(_cfg(root, other_model, make_contract_onnx(tmp_path / "other.onnx", seed=7), top_k=2, shard=Shard(2, 3)))
    other_options = tmp_path / "other-options.parquet"
    run(_cfg(root, other_options, contract_onnx, top_k=1, shard=Shard(2, 3)))
    relabelled = tmp_path / "relabelled.parquet"  # shard 0's rows claiming to be shard 1: the shards overlap
    t = pq.read_table(s0)
    pq.write_table(t.replace_schema_metadata({**t.schema.metadata, b"tagger.output.shard": b"1/3"}), relabelled)
    two = tmp_path / "two.parquet"
    run(_cfg(root, two, contract_onnx, top_k=2, shard=Shard(1, 2)))
    cases = [
        ([s0, s1], "shard 2/3 missing"),
        ([s0, s1, s2, s1], "shard 1/3 is given twice"),
        ([s0, relabelled, s2], "is in more than one shard"),
        ([s0, s1, other_model], "different models"),
        ([s0, s1, other_options], "different catalogs or options"),
        ([s0, s1, two], "different splits"),
        ([s0, s1, s2, whole], "is not a shard"),
    ]
    out = tmp_path / "merged.parquet"
    for files, message in cases:
        with pytest.raises(TaggerError, match=message):
            merge_shards(out, files)
        assert not out.exists()
    result = CliRunner().invoke(main, ["merge", str(out), str(s0), str(s1)])
    assert result.exit_code == TaggerError.exit_code and "error: shard 2/3 missing" in result.output


# --- guard: a failed run never damages the previous output -------------------------------------------------------


def test_bad_model_leaves_the_previous_output(catalog: Catalog, contract_onnx: Path, tmp_path: Path) -> None:
    root, _ = catalog
    out = tmp_path / "tags.parquet"
    run(_cfg(root, out, contract_onnx))
    before = out.read_bytes()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00not a model" * 10)
    for model in (bad, tmp_path / "missing.onnx"):
        for incremental in (False, True):
            with pytest.raises(TaggerError, match="model"):
                run(_cfg(root, out, model, incremental=incremental))
            assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "tags.parquet"]


@pytest.fixture()
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 200 KiB tmpfs, unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mnt)]
    proc = subprocess.run(mount, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up (needs root): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("commit_every", [10_000, 1])
def test_full_disk_leaves_the_previous_output(
    commit_every: int, tiny_disk: Path, crash_catalog: tuple[Path, Path], contract_onnx: Path
) -> None:
    root, reference = crash_catalog
    out = tiny_disk / "tags.parquet"
    small = tiny_disk.parent / "small"
    small.mkdir()
    for p in sorted(root.iterdir())[:5]:
        shutil.copy2(p, small / p.name)
    run(_cfg(small, out, contract_onnx))
    before = out.read_bytes()
    with open(tiny_disk / "filler", "wb") as f:  # leave 3 pages: marker, identity, one part
        f.write(b"\0" * (os.statvfs(tiny_disk).f_bavail * os.statvfs(tiny_disk).f_frsize - 12288))
    with pytest.raises(TaggerError, match="No space left on device"):
        run(_cfg(root, out, contract_onnx, commit_every=commit_every))
    assert out.read_bytes() == before
    left = sorted(p.name for p in tiny_disk.iterdir())
    if commit_every > 1:
        assert left == ["filler", "tags.parquet"]
        return
    # Parts committed before the disk filled up stay (and no temp file): once there is room, --resume finishes.
    assert left == ["filler", "tags.parquet", "tags.parquet.work"]
    assert not list(work_dir_of(out).glob(".*"))
    (tiny_disk / "filler").unlink()
    summary = run(_cfg(root, out, contract_onnx, resume=True))
    assert summary.resumed > 0 and summary.tagged == CRASH_FILES - summary.resumed
    assert_same_output(out, reference)


def test_options_needing_incremental_or_in_conflict_are_refused(
    catalog: Catalog, contract_onnx: Path, tmp_path: Path
) -> None:
    root, _ = catalog
    for kw, message in (
        ({"retry_errors": True}, "--retry-errors only applies with --incremental"),
        ({"keep_stale_model": True}, "--keep-stale-model only applies"),
        ({"shard": Shard(0, 2), "files_from": tmp_path / "list.txt"}, "split the list"),
    ):
        with pytest.raises(TaggerError, match=message):
            _cfg(root, tmp_path / "x.parquet", contract_onnx, **kw)


def test_plain_run_reports_every_file_as_tagged(catalog: Catalog, contract_onnx: Path, tmp_path: Path) -> None:
    root, expected = catalog
    out = tmp_path / "t.parquet"
    summary: RunSummary = run(_cfg(root, out, contract_onnx))
    assert summary.line().startswith(f"{len(expected)} files, ")
    assert f"tagged {len(expected)}, reused 0, resumed 0" in summary.line()
    assert summary.changes is None and file_metadata(out)["tagger.run.tagged"] == str(len(expected))
