"""tagger run on catalogs and outputs in a bucket, against a real S3 server (moto_server on 127.0.0.1)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from gated import Gate, gate_photo
from s3server import SECRET_KEY, S3Server

from conftest import quadrant_image
from tagger import RunConfig, run
from tagger.nightly.shard import merge_shards
from tagger.output.reader import file_metadata
from tagger.storage import read_file, redact

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_images" / "images"
COMPARED = ("path", "status", "width", "height", "bytes", "sha256")


def _fs() -> pafs.FileSystem:
    return pafs.FileSystem.from_uri("s3://x/?allow_delayed_open=true")[0]


def _key(uri: str) -> str:
    return uri.removeprefix("s3://")


def _photos(root: Path, n: int, seed: int, size: tuple[int, int] = (64, 48), ext: str = "jpg") -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        colors = [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(4)]
        path = root / f"d{i % 3}" / f"p{i:03d}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        quadrant_image(*size, colors).save(path)  # type: ignore[arg-type]


def _catalog(root: Path) -> Path:
    """Generated photos in folders, the sample photos, a broken file, a hidden file and a non-image."""
    _photos(root, 12, seed=1)
    shutil.copytree(SAMPLES, root / "samples")
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    (root / ".hidden.jpg").write_bytes(b"hidden")
    (root / "notes.txt").write_text("not an image")
    return root


def _upload(local: Path, uri: str) -> None:
    pafs.copy_files(str(local), _key(uri), source_filesystem=pafs.LocalFileSystem(), destination_filesystem=_fs())


def _read(loc: str | Path) -> pa.Table:
    return pq.read_table(pa.BufferReader(read_file(loc)))


def assert_same_rows(a: str | Path, b: str | Path) -> None:
    """Same rows in the same order: labels, scores (1e-6), status, width, height, bytes, sha256 (mtime differs: an
    object's LastModified is not the file's)."""
    ta, tb = _read(a), _read(b)
    for name in COMPARED:
        assert ta.column(name).to_pylist() == tb.column(name).to_pylist(), name
    for name in ta.column_names:
        if pa.types.is_dictionary(ta.schema.field(name).type):
            assert ta.column(name).to_pylist() == tb.column(name).to_pylist(), name
        elif pa.types.is_floating(ta.schema.field(name).type) and name != "mtime":
            np.testing.assert_allclose(ta.column(name).to_numpy(), tb.column(name).to_numpy(), atol=1e-6)


def _cfg(catalog: str | Path, out: str | Path, model: Path, **kw: object) -> RunConfig:
    options: dict[str, object] = {"device": "cpu", "workers": 0, "batch_size": 4, **kw}
    return RunConfig(catalog, out, model=model, **options)  # type: ignore[arg-type]


def _cli(*args: object, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tagger.cli", "run", *map(str, args)], cwd=REPO, capture_output=True, text=True,
        timeout=timeout, env=env,
    )  # fmt: skip


def test_bucket_catalog_and_output_equal_a_local_run(
    bucket: str, contract_onnx: Path, tmp_path: Path
) -> None:
    root = _catalog(tmp_path / "cat")
    _upload(root, f"{bucket}/cat")
    local = tmp_path / "local.parquet"
    run(_cfg(root, local, contract_onnx))
    out = f"{bucket}/out/tags.parquet"
    summary = run(_cfg(f"{bucket}/cat", out, contract_onnx, workers=2, io_threads=4))
    assert (summary.files, summary.errors) == (33, 1)
    assert_same_rows(out, local)
    assert file_metadata(out)["tagger.output.catalog"] == f"{bucket}/cat"
    assert [n for n in _fs().get_file_info(pafs.FileSelector(_key(bucket), recursive=True)) if ".work" in n.path] == []
    # A bucket catalog into a local output, through the CLI.
    proc = _cli(f"{bucket}/cat", "--out", tmp_path / "b.parquet", "--model", contract_onnx, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith(f"-> {tmp_path / 'b.parquet'}")
    assert_same_rows(tmp_path / "b.parquet", local)


def test_incremental_in_the_bucket_equals_a_fresh_run(bucket: str, contract_onnx: Path, tmp_path: Path) -> None:
    root = tmp_path / "cat"
    _photos(root, 9, seed=2)
    _upload(root, f"{bucket}/cat")
    out = f"{bucket}/tags.parquet"
    run(_cfg(f"{bucket}/cat", out, contract_onnx))
    fs = _fs()
    fs.delete_file(_key(f"{bucket}/cat/d0/p000.jpg"))
    quadrant_image(50, 40).save(tmp_path / "new.jpg")
    fs.copy_file(_key(f"{bucket}/cat/d1/p001.jpg"), _key(f"{bucket}/cat/d1/copy.jpg"))  # new
    with fs.open_output_stream(_key(f"{bucket}/cat/d2/p002.jpg")) as f:  # overwritten: other bytes and size
        f.write((tmp_path / "new.jpg").read_bytes())
    summary = run(_cfg(f"{bucket}/cat", out, contract_onnx, incremental=True))
    assert summary.changes is not None
    c = summary.changes
    assert (c.new, c.changed, c.removed, c.unchanged) == (1, 1, 1, 7)
    assert (summary.tagged, summary.reused) == (2, 7)
    fresh = tmp_path / "fresh.parquet"
    run(_cfg(f"{bucket}/cat", fresh, contract_onnx))
    assert_same_rows(out, fresh)
    assert _read(out).column("mtime").to_pylist() == _read(fresh).column("mtime").to_pylist()


def test_killed_run_resumes_and_never_shows_a_partial_output(
    bucket: str, contract_onnx: Path, tmp_path: Path
) -> None:
    root = tmp_path / "cat"
    _photos(root, 40, seed=3, size=(640, 480), ext="png")
    gate_photo(root / "d1" / "p019.png")  # the 21st listed: the run waits there, never done before the kill
    gate = Gate(tmp_path / "gate")
    _upload(root, f"{bucket}/cat")
    reference = tmp_path / "reference.parquet"
    run(_cfg(f"{bucket}/cat", reference, contract_onnx))
    out = f"{bucket}/out/tags.parquet"
    fs = _fs()
    with fs.open_output_stream(_key(out)) as f:
        f.write(b"the previous night's output")
    args = [sys.executable, str(gate.script()), "-vv", "run", f"{bucket}/cat", "--out", out, "--model",
            str(contract_onnx), "--device", "cpu", "--workers", "0", "--batch-size", "1", "--threads", "1",
            "--commit-every", "5"]  # fmt: skip
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=gate.env)
    work = _key(out) + ".work"
    deadline = time.monotonic() + 90
    parts: list[str] = []
    try:
        while len(parts) < 2 and proc.poll() is None and time.monotonic() < deadline:
            assert read_file(out) == b"the previous night's output"  # never a partial output
            infos = fs.get_file_info(pafs.FileSelector(work, allow_not_found=True))
            parts = [i.path for i in infos if i.base_name.startswith("part-")]
        proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, stderr[-2000:]
    assert SECRET_KEY not in stderr
    assert read_file(out) == b"the previous night's output"
    done = _cli(f"{bucket}/cat", "--out", out, "--model", contract_onnx, "--device", "cpu", "--workers", "0",
                "--resume")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed 0" not in done.stdout and "reused 0" in done.stdout
    assert_same_rows(out, reference)
    assert fs.get_file_info(pafs.FileSelector(work, allow_not_found=True)) == []


def test_shards_and_merge_on_uris(bucket: str, contract_onnx: Path, tmp_path: Path) -> None:
    from tagger.nightly.shard import Shard

    root = _catalog(tmp_path / "cat")
    _upload(root, f"{bucket}/cat")
    whole = tmp_path / "whole.parquet"
    run(_cfg(f"{bucket}/cat", whole, contract_onnx))
    shards = [f"{bucket}/shards/{i}.parquet" for i in range(2)]
    for i, out in enumerate(shards):
        run(_cfg(f"{bucket}/cat", out, contract_onnx, shard=Shard(i, 2)))
    merged = f"{bucket}/merged.parquet"
    summary = merge_shards(merged, shards)
    assert summary.files == 33
    assert_same_rows(merged, whole)


def test_credentials_never_shown_and_uris_recorded_redacted(
    bucket: str, contract_onnx: Path, tmp_path: Path, s3_server: S3Server
) -> None:
    root = tmp_path / "cat"
    _photos(root, 3, seed=4)
    _upload(root, f"{bucket}/cat")
    name = bucket.removeprefix("s3://")
    catalog = f"s3://AKIAINURI:uri-secret-9Kp@{name}/cat?region=us-east-1"
    out = f"s3://AKIAINURI:uri-secret-9Kp@{name}/out.parquet?region=us-east-1"
    proc = _cli("-vv", catalog, "--out", out, "--model", contract_onnx, "--device", "cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "tagger.cli", "-vv", "run", catalog, "--out", out, "--model", str(contract_onnx),
         "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    for secret in (SECRET_KEY, "uri-secret-9Kp", "AKIAINURI", os.environ["AWS_ACCESS_KEY_ID"]):
        assert secret not in proc.stdout + proc.stderr
    meta = file_metadata(f"{bucket}/out.parquet")
    assert meta["tagger.output.catalog"] == f"{bucket}/cat"
    assert not any("secret" in v or "AKIA" in v for v in meta.values())
    assert redact(catalog) == f"{bucket}/cat"


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_missing_bucket_is_one_line_and_the_previous_output_survives(
    bucket: str, contract_onnx: Path, tmp_path: Path
) -> None:
    out = f"{bucket}/tags.parquet"
    with _fs().open_output_stream(_key(out)) as f:
        f.write(b"previous")
    line = _one_line_error(_cli("s3://no-such-bucket-tagger/cat", "--out", out, "--model", contract_onnx))
    assert "s3://no-such-bucket-tagger/cat" in line
    assert read_file(out) == b"previous"


def test_wrong_credentials_and_a_server_that_stops(contract_onnx: Path, tmp_path: Path) -> None:
    """A server of its own, enforcing credentials after the first requests (INITIAL_NO_AUTH_ACTION_COUNT)."""
    server = S3Server(tmp_path / "aws", {"INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    try:
        env = {**os.environ, **server.env()}
        fs = pafs.S3FileSystem(
            access_key="k", secret_key="s", endpoint_override=server.endpoint, region="us-east-1",
            allow_bucket_creation=True, allow_delayed_open=True,
        )  # fmt: skip
        fs.create_dir("auth")
        with fs.open_output_stream("auth/tags.parquet") as f:
            f.write(b"previous")
        with fs.open_output_stream("auth/cat/a.jpg") as f:
            f.write(b"x")
        proc = _cli("s3://auth/cat", "--out", "s3://auth/tags.parquet", "--model", contract_onnx, env=env)
        line = _one_line_error(proc)
        assert "s3://auth/cat" in line and SECRET_KEY not in proc.stderr
    finally:
        server.stop()


@pytest.mark.slow
def test_server_stopping_mid_run_stops_the_run_and_blames_no_file(contract_onnx: Path, tmp_path: Path) -> None:
    """The catalog's server stops mid-run, the output is local: exit 1 naming the store once TAGGER_STORE_TIMEOUT
    has passed, no output written (never a table of NETWORK_CONNECTION rows), the committed parts kept."""
    server = S3Server(tmp_path / "aws")
    try:
        env = {**os.environ, **server.env(), "TAGGER_STORE_TIMEOUT": "2"}
        fs = pafs.S3FileSystem(
            endpoint_override=server.endpoint, region="us-east-1", access_key="k", secret_key="s",
            allow_bucket_creation=True, allow_delayed_open=True,
        )  # fmt: skip
        fs.create_dir("dying")
        root = tmp_path / "cat"
        _photos(root, 48, seed=6, size=(640, 480), ext="png")
        pafs.copy_files(str(root), "dying/cat", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        out = tmp_path / "tags.parquet"
        args = [sys.executable, "-m", "tagger.cli", "run", "s3://dying/cat", "--out", str(out), "--model",
                str(contract_onnx), "--device", "cpu", "--workers", "0", "--batch-size", "8", "--threads", "1",
                "--commit-every", "8", "--io-threads", "8"]  # fmt: skip
        proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        work = Path(str(out) + ".work")
        deadline = time.monotonic() + 60
        while not list(work.glob("part-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        server.stop()
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        server.stop()
    line = _one_line_error(subprocess.CompletedProcess(args, proc.returncode, stdout, stderr))
    assert "object store unreachable for 2 s (TAGGER_STORE_TIMEOUT)" in line and "s3://dying/cat/" in line, line
    assert SECRET_KEY not in stderr
    assert not out.exists() and list(work.glob("part-*"))


def test_two_runs_on_one_output_in_a_bucket_are_kept_apart(bucket: str, contract_onnx: Path) -> None:
    """The lock object: a live run's lock refuses a second run; a lock naming a dead pid on this host is taken over."""
    import json
    import socket

    from tagger.errors import TaggerError
    from tagger.nightly.workdir import MARKER_FILE, WorkDir
    from tagger.storage import publish_bytes

    out = f"{bucket}/tags.parquet"
    first = WorkDir(out, {"k": "v"}, [], 0, resume=False)
    with pytest.raises(TaggerError, match=f"another tagger run is writing {bucket}/tags.parquet"):
        WorkDir(out, {"k": "v"}, [], 0, resume=False)
    first.finish()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = {"token": "x", "host": socket.gethostname(), "pid": int(dead.stdout), "expires": time.time() + 600}
    publish_bytes(f"{out}.work/{MARKER_FILE}", b"{}")  # what the dead run left: its marker and its lock
    publish_bytes(f"{out}.work/lock", json.dumps(lock).encode())
    WorkDir(out, {"k": "v"}, [], 0, resume=False).finish()
    assert _fs().get_file_info(pafs.FileSelector(_key(out) + ".work", allow_not_found=True)) == []


def test_a_work_prefix_of_other_objects_is_refused_and_kept(bucket: str) -> None:
    from tagger.errors import TaggerError
    from tagger.nightly.workdir import MARKER_FILE, WorkDir
    from tagger.storage import publish_bytes, read_file

    out = f"{bucket}/tags.parquet"
    publish_bytes(f"{out}.work/part-000001-0123456789abcdef.parquet", b"someone's data")
    with pytest.raises(TaggerError, match=f"holds files tagger did not put there \\(no {MARKER_FILE}\\)"):
        WorkDir(out, {"k": "v"}, [], 0, resume=True)
    assert read_file(f"{out}.work/part-000001-0123456789abcdef.parquet") == b"someone's data"
    names = [i.base_name for i in _fs().get_file_info(pafs.FileSelector(_key(out) + ".work"))]
    assert names == ["part-000001-0123456789abcdef.parquet"]  # no marker, no lock, no identity written


def test_resume_log_names_the_work_folder_without_credentials(
    bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    from tagger.nightly.workdir import WorkDir
    from tagger.output.schema import output_schema

    out = f"s3://AKIAINLOG:log-secret-7Qw@{bucket.removeprefix('s3://')}/tags.parquet?region=us-east-1"
    first = WorkDir(out, {"k": "v"}, (), 0, resume=True)
    first.add(pa.Table.from_pylist([{"path": "a.jpg", "status": "error", "error": "x"}], schema=output_schema(())))
    first.commit()
    first.abandon()
    with caplog.at_level("DEBUG", logger="tagger"):  # whatever level an earlier in-process CLI left it at
        WorkDir(out, {"k": "v"}, (), 0, resume=True).finish()
    assert f"1 rows already tagged in {bucket}/tags.parquet.work" in caplog.text
    assert "log-secret-7Qw" not in caplog.text and "AKIAINLOG" not in caplog.text


def test_a_refused_listing_is_a_tagger_error(tmp_path: Path) -> None:
    """A server enforcing credentials from its first request: the 403 of a listing is one redacted line."""
    from tagger.errors import TaggerError
    from tagger.storage import list_names

    server = S3Server(tmp_path / "aws", {"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        host = server.endpoint.removeprefix("http://")
        uri = f"s3://AKIAWRONG:wrong-secret-5Tz@b/x.work?endpoint_override={host}&scheme=http&region=us-east-1"
        with pytest.raises(TaggerError, match="^cannot list s3://b/x.work: ") as info:
            list_names(uri)
        assert "wrong-secret-5Tz" not in str(info.value) and "AKIAWRONG" not in str(info.value)
    finally:
        server.stop()


def test_an_object_too_large_to_read_ahead_is_read_within_the_budget(
    bucket: str, contract_onnx: Path, tmp_path: Path
) -> None:
    """--decode-memory 100 KB: objects over half of it are not read ahead but read under their size held; one larger
    than the whole budget is an error row (its bytes alone would exceed it), the others decode in order."""
    root = tmp_path / "cat"
    _photos(root, 6, seed=7, ext="png")
    for name, junk in (("d0/p000.png", 60_000), ("d1/p001.png", 200_000)):  # bytes after IEND: Pillow ignores them
        with open(root / name, "ab") as f:
            f.write(bytes(junk))
    _upload(root, f"{bucket}/cat")
    out = tmp_path / "tags.parquet"
    run(_cfg(f"{bucket}/cat", out, contract_onnx, io_threads=4, decode_memory=100_000, batch_size=2))
    t = pq.read_table(out)
    rows = dict(zip(t.column("path").to_pylist(), zip(t.column("status").to_pylist(), t.column("error").to_pylist())))
    assert rows.pop("d1/p001.png")[0] == "error"
    assert all(status == "ok" for status, _ in rows.values()), rows
