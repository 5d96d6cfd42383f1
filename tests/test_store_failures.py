"""A failed job says so on an object store: refused uploads, outages and a store that never answers end the run
with exit 1 and one line, keep the previous output and the work parts; a real S3 server behind a proxy that fails."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs
import pytest
from faultproxy import FaultProxy
from gated import ENV, Gate, gate_photo
from s3server import SECRET_KEY, S3Server

from test_object_store import _photos, assert_same_rows

REPO = Path(__file__).resolve().parents[1]
BUCKET = "fails"


class Store:
    """A moto server, a fault proxy in front of it, and the environment that reaches the server through the proxy."""

    def __init__(self, home: Path) -> None:
        self.server = S3Server(home)
        self.proxy = FaultProxy(self.server.port)
        self.env = {**os.environ, **self.server.env(), "AWS_ENDPOINT_URL": self.proxy.endpoint,
                    "TAGGER_STORE_TIMEOUT": "3"}  # fmt: skip
        # Direct to the server: what the test sets up and checks does not go through the faults.
        self.fs = pafs.S3FileSystem(
            access_key="k", secret_key="s", endpoint_override=self.server.endpoint, region="us-east-1",
            allow_bucket_creation=True, allow_delayed_open=True,
        )  # fmt: skip

    def put(self, key: str, data: bytes) -> None:
        with self.fs.open_output_stream(key) as f:
            f.write(data)

    def get(self, key: str) -> bytes:
        with self.fs.open_input_stream(key) as f:
            return bytes(f.read())

    def keys(self, prefix: str) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
        return sorted(i.path.removeprefix(prefix + "/") for i in infos if i.type == pafs.FileType.File)

    def assert_same_rows(self, key: str, reference: Path) -> None:
        copy = reference.with_name("copy-" + key.replace("/", "-"))
        copy.write_bytes(self.get(key))
        assert_same_rows(copy, reference)

    def stop(self) -> None:
        self.proxy.stop()
        self.server.stop()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "aws")
    s.fs.create_dir(BUCKET)
    try:
        yield s
    finally:
        s.stop()


def _run(store: Store, *args: object, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tagger.cli", "run", *map(str, args)], cwd=REPO, capture_output=True, text=True,
        timeout=timeout, env=store.env,
    )  # fmt: skip


def _error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "Error ignored" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.slow
def test_a_refused_upload_exits_1_and_resume_finishes_the_job(
    store: Store, contract_onnx: Path, tmp_path: Path
) -> None:
    """The store refuses the PUT of the output (403, as an IAM deny does): exit 1 naming it, the old object as it
    was, the lock released, the parts kept; once the PUT is allowed, --resume tags nothing again."""
    cat = tmp_path / "cat"
    _photos(cat, 9, seed=11)
    out = f"s3://{BUCKET}/tags.parquet"
    store.put(f"{BUCKET}/tags.parquet", b"last night's output")
    common = ("--model", contract_onnx, "--device", "cpu", "--workers", "0", "--batch-size", "4")
    store.proxy.deny(f"PUT /{BUCKET}/tags.parquet HTTP".encode())
    line = _error_line(_run(store, cat, "--out", out, *common))
    assert line.startswith(f"error: cannot write {out}: ") and "ACCESS_DENIED" in line, line
    assert store.proxy.denials >= 1
    assert store.get(f"{BUCKET}/tags.parquet") == b"last night's output"
    work = store.keys(f"{BUCKET}/tags.parquet.work")
    assert "lock" not in work and any(k.startswith("part-") for k in work), work
    store.proxy.deny(None)
    done = _run(store, cat, "--out", out, *common, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tagged 0, reused 0, resumed 9" in done.stdout, done.stdout
    reference = tmp_path / "reference.parquet"
    assert _run(store, cat, "--out", reference, *common).returncode == 0
    store.assert_same_rows(f"{BUCKET}/tags.parquet", reference)
    assert store.keys(f"{BUCKET}/tags.parquet.work") == []


def _start(store: Store, *args: object, gate: Gate | None = None) -> subprocess.Popen[str]:
    """A run in the background; with gate, through its script (see gated.py)."""
    entry = [str(gate.script())] if gate else ["-m", "tagger.cli"]
    env = {**store.env, ENV: str(gate.folder)} if gate else store.env
    return subprocess.Popen(
        [sys.executable, *entry, "run", *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def _wait_for_parts(store: Store, work: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 90
    while not any(k.startswith("part-") for k in store.keys(work)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)


def _wait_for_stalls(store: Store, proc: subprocess.Popen[str], connections: int) -> None:
    deadline = time.monotonic() + 60
    while store.proxy.stalled < connections:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"requests stalled on {store.proxy.stalled} connections after 60 s"
        time.sleep(0.05)


@pytest.mark.parametrize("mode", ["refuse", "kill", "stall"])
@pytest.mark.slow
def test_a_store_outage_mid_run_exits_1_within_the_bound_and_resume_equals_a_full_run(
    store: Store, contract_onnx: Path, tmp_path: Path, mode: str
) -> None:
    """Catalog and output in the bucket; once parts are committed the store goes away (refuses connections, resets
    them, or accepts them and never answers). The run stops with exit 1 within the stated bound (2 x
    TAGGER_STORE_TIMEOUT = 6 s, plus clean-up), blames no file, leaves the previous output; --resume afterwards writes
    what an uninterrupted run writes."""
    cat = tmp_path / "cat"
    _photos(cat, 24, seed=12, size=(640, 480), ext="png")
    gate_photo(cat / "d1" / "p013.png")  # the 13th listed: the run waits there until the store is gone
    gate = Gate(tmp_path / "gate")
    pafs.copy_files(str(cat), f"{BUCKET}/cat", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=store.fs)
    out = f"s3://{BUCKET}/tags.parquet"
    store.put(f"{BUCKET}/tags.parquet", b"last night's output")
    common = ("--model", contract_onnx, "--device", "cpu", "--workers", "0", "--batch-size", "2", "--threads", "1",
              "--io-threads", "2")  # fmt: skip
    proc = _start(store, f"s3://{BUCKET}/cat", "--out", out, *common, "--commit-every", "4", gate=gate)
    try:
        _wait_for_parts(store, f"{BUCKET}/tags.parquet.work", proc)
        store.proxy.set_mode(mode)
        gate.open()
        t0 = time.monotonic()
        stdout, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    line = _error_line(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    assert "object store unreachable for 3 s (TAGGER_STORE_TIMEOUT)" in line, line
    # 2 x the bound to give up, 3 s of clean-up, slack for two shared cores: the README's bound at 3 s.
    assert took < 2 * 3 + 3 + 6, took
    assert stdout == ""
    store.proxy.set_mode("pass")
    assert store.get(f"{BUCKET}/tags.parquet") == b"last night's output"
    done = _run(store, f"s3://{BUCKET}/cat", "--out", out, *common, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed 0" not in done.stdout and ", 0 errors" in done.stdout, done.stdout
    reference = tmp_path / "reference.parquet"
    assert _run(store, f"s3://{BUCKET}/cat", "--out", reference, *common).returncode == 0
    store.assert_same_rows(f"{BUCKET}/tags.parquet", reference)


@pytest.mark.parametrize("workers", ["0", "2"])
@pytest.mark.slow
def test_sigterm_ends_a_run_within_seconds_while_the_store_never_answers(
    store: Store, contract_onnx: Path, tmp_path: Path, workers: str
) -> None:
    """A black-hole store with a long bound (60 s): SIGTERM still ends the run within a few seconds, with decoding
    in this process or in worker processes stuck in store reads (they are killed, not waited for)."""
    cat = tmp_path / "cat"
    _photos(cat, 24 if workers == "0" else 192, seed=13, size=(640, 480), ext="png")  # workers: chunks in flight
    pafs.copy_files(str(cat), f"{BUCKET}/cat", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=store.fs)
    store.env["TAGGER_STORE_TIMEOUT"] = "60"
    proc = _start(store, f"s3://{BUCKET}/cat", "--out", f"s3://{BUCKET}/tags.parquet", "--model", contract_onnx,
                  "--device", "cpu", "--workers", workers, "--batch-size", "2", "--threads", "1", "--commit-every", "4")
    try:
        _wait_for_parts(store, f"{BUCKET}/tags.parquet.work", proc)
        store.proxy.set_mode("stall")
        # Requests waiting for an answer on 2 connections, with workers: more than this process has open at once
        # (decoding is in the workers, a commit is one request), so a worker is stuck in a read.
        _wait_for_stalls(store, proc, 1 if workers == "0" else 2)
        assert proc.poll() is None
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert took < 3 + 5, took  # the clean-up's bound (3 s), slack for two shared cores


def test_incremental_never_reuses_a_row_whose_error_was_transient(contract_onnx: Path, tmp_path: Path) -> None:
    """A previous output with an outage's rows (as runs before the bound wrote them): --incremental tags the file
    of a NETWORK_CONNECTION or 503 row again, and keeps a permanent error (403) as it was."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tagger import RunConfig, run

    cat = tmp_path / "cat"
    _photos(cat, 6, seed=14)
    out = tmp_path / "tags.parquet"
    cfg = {"model": contract_onnx, "device": "cpu", "workers": 0, "batch_size": 4}
    run(RunConfig(cat, out, **cfg))  # type: ignore[arg-type]
    fresh = pq.read_table(out)
    errors = {
        0: "OSError: When reading information for key 'cat/d0/p000.jpg' in bucket 'b': AWS Error NETWORK_CONNECTION "
        "during HeadObject operation: curlCode: 7, Could not connect to server",
        1: "OSError: When reading 'cat/d1/p001.jpg': AWS Error SERVICE_UNAVAILABLE during GetObject operation",
        2: "OSError: When reading 'cat/d2/p002.jpg': AWS Error ACCESS_DENIED during GetObject operation: Access Denied",
    }
    status = fresh.column("status").to_pylist()
    error = fresh.column("error").to_pylist()
    for i, text in errors.items():
        status[i], error[i] = "error", text
    t = fresh
    for name, values in (("status", status), ("error", error)):
        field = t.schema.field(name)
        t = t.set_column(t.schema.get_field_index(name), field, pa.array(values, field.type))
    pq.write_table(t, out)
    summary = run(RunConfig(cat, out, incremental=True, **cfg))  # type: ignore[arg-type]
    assert summary.changes is not None and summary.changes.retried == 2 and summary.tagged == 2
    again = pq.read_table(out)
    assert again.column("status").to_pylist() == ["ok", "ok", "error", "ok", "ok", "ok"]
    assert again.column("error").to_pylist()[2] == errors[2]


@pytest.mark.slow
def test_outputs_with_dot_segments_are_refused_and_the_photo_stays(
    bucket: str, contract_onnx: Path, tmp_path: Path
) -> None:
    """'s3://b/cat/hires/../small/p000.jpg' would be written as cat/small/p000.jpg, a photo of the catalog: run and
    merge refuse it in one line (exit 2) and the photo keeps its bytes; a merge OUT that is a photo of the shards'
    bucket catalog is refused too; locally, '..' is resolved before the guard."""
    from test_object_store import _cli, _fs, _key, _upload

    from tagger.nightly.shard import Shard

    cat = tmp_path / "cat"
    _photos(cat, 6, seed=15)
    _upload(cat, f"{bucket}/cat")
    photo = f"{bucket}/cat/d0/p000.jpg"
    before = _fs().open_input_stream(_key(photo)).read()
    common = ("--model", contract_onnx, "--device", "cpu", "--workers", "0")
    for out in (f"{bucket}/cat/d1/../d0/p000.jpg", f"{bucket}/cat/./d0/p000.jpg"):
        proc = _cli(f"{bucket}/cat", "--out", out, *common)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "'.' or '..' component" in proc.stderr and "Traceback" not in proc.stderr
    shards = [str(tmp_path / f"{i}.parquet") for i in range(2)]
    for i, shard in enumerate(shards):
        assert _cli(f"{bucket}/cat", "--out", shard, *common, "--shard", f"{i}/2").returncode == 0
    for out, code in ((f"{bucket}/cat/d1/../d0/p000.jpg", 2), (photo, 1)):
        proc = subprocess.run(
            [sys.executable, "-m", "tagger.cli", "merge", out, *shards], cwd=REPO, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert proc.returncode == code, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "is a file of the catalog" in proc.stderr
    assert _fs().open_input_stream(_key(photo)).read() == before
    # A local catalog: '..' resolved before the guard.
    local = cat / "d1" / ".." / "d0" / "p000.jpg"
    local_before = (cat / "d0" / "p000.jpg").read_bytes()
    proc = _cli(cat, "--out", local, *common)
    assert proc.returncode == 1 and "is a file of the catalog" in proc.stderr, proc.stderr[-2000:]
    assert (cat / "d0" / "p000.jpg").read_bytes() == local_before
    assert Shard(0, 2)  # the shards above were real ones


def test_a_key_with_dot_segments_gets_an_error_row_and_is_never_read(
    bucket: str, s3_server: S3Server, contract_onnx: Path, tmp_path: Path
) -> None:
    """Keys 'd1/../d0/p000.jpg' and 'd0/./p000.jpg' exist in the bucket: each gets its own error row instead of
    being skipped, and neither is read as d0/p000.jpg, the photo its collapsed key names."""
    import pyarrow.parquet as pq
    from test_object_store import _fs, _key, _upload

    from tagger import RunConfig, run

    cat = tmp_path / "cat"
    _photos(cat, 3, seed=16)
    _upload(cat, f"{bucket}/cat")
    import boto3  # pyarrow (curl) would collapse the segments; botocore sends the key as it is

    client = boto3.client("s3", endpoint_url=s3_server.endpoint)
    for key in ("cat/d1/../d0/p000.jpg", "cat/d0/./p000.jpg"):  # both collapse to a photo that exists
        client.put_object(Bucket=_key(bucket), Key=key, Body=(cat / "d1" / "p001.jpg").read_bytes())
    names = [i.path for i in _fs().get_file_info(pafs.FileSelector(_key(bucket), recursive=True))]
    assert f"{_key(bucket)}/cat/d1/../d0/p000.jpg" in names
    out = tmp_path / "tags.parquet"
    summary = run(RunConfig(f"{bucket}/cat", out, model=contract_onnx, device="cpu", workers=0))
    assert (summary.files, summary.errors) == (5, 2)
    t = pq.read_table(out)
    rows = {p: (s, e) for p, s, e in zip(*(t.column(c).to_pylist() for c in ("path", "status", "error")))}
    assert rows["d0/p000.jpg"] == ("ok", None)
    for key in ("d1/../d0/p000.jpg", "d0/./p000.jpg"):
        status, error = rows[key]
        assert status == "error" and error.startswith("AmbiguousKey: "), rows


def test_malformed_uri_lines_in_files_from_become_error_rows(
    bucket: str, contract_onnx: Path, tmp_path: Path
) -> None:
    """A list with a malformed URI, a scheme pyarrow does not know and an empty bucket among good keys: each bad
    line is an error row (BadURI), the others are tagged, the run exits 0; no credential in a row."""
    import pyarrow.parquet as pq
    from test_object_store import _cli, _upload

    cat = tmp_path / "cat"
    _photos(cat, 3, seed=17)
    _upload(cat, f"{bucket}/cat")
    lines = ["d0/p000.jpg", "s3://AKIAX:line-secret-4Rt@[oops/x.jpg", "nosuchscheme://host/y.jpg", "s3:///z.jpg",
             "d1/p001.jpg"]  # fmt: skip
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(lines) + "\n")
    out = tmp_path / "tags.parquet"
    proc = _cli(f"{bucket}/cat", "--out", out, "--files-from", listing, "--model", contract_onnx, "--device", "cpu",
                "--max-errors", "100%")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    t = pq.read_table(out)
    status, error = t.column("status").to_pylist(), t.column("error").to_pylist()
    assert status == ["ok", "error", "error", "error", "ok"], list(zip(t.column("path").to_pylist(), error))
    assert all(e.startswith("BadURI: ") for e in error[1:4]), error
    assert not any("line-secret-4Rt" in str(v) for v in t.to_pylist())


def test_wrong_credentials_and_a_missing_bucket_for_out_name_the_real_cause(
    s3_server: S3Server, contract_onnx: Path, tmp_path: Path
) -> None:
    """Not "another tagger run took the lock": a bucket that does not exist says NO_SUCH_BUCKET, credentials the
    server does not know say so (INVALID_ACCESS_KEY_ID, or ACCESS_DENIED); exit 1, one line, no secret."""
    from test_object_store import _cli, _one_line_error

    cat = tmp_path / "cat"
    _photos(cat, 2, seed=18)
    common = ("--model", contract_onnx, "--device", "cpu", "--workers", "0")
    line = _one_line_error(_cli(cat, "--out", "s3://no-such-bucket-tagger/tags.parquet", *common))
    assert "no-such-bucket-tagger" in line and "NO_SUCH_BUCKET" in line and "another tagger run" not in line, line
    strict = S3Server(tmp_path / "aws", {"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        env = {**os.environ, **strict.env(), "TAGGER_STORE_TIMEOUT": "3"}
        proc = _cli(cat, "--out", "s3://some-bucket/tags.parquet", *common, env=env)
        line = _one_line_error(proc)
        assert "s3://some-bucket/tags.parquet" in line, line
        assert "INVALID_ACCESS_KEY_ID" in line or "ACCESS_DENIED" in line, line
        assert "another tagger run" not in line and SECRET_KEY not in proc.stderr
    finally:
        strict.stop()


def test_a_large_upload_goes_through_a_staging_object_and_a_refused_copy_keeps_the_old_one(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past UPLOAD_IN_ONE_WRITE (lowered here), an output is streamed to a hidden staging object and copied onto its
    key: the copy refused, publish raises and the old object stays; allowed, the object is the file. No staging
    object is left either way."""
    from tagger import storage
    from tagger.errors import TaggerError

    monkeypatch.setattr(storage.arrow, "UPLOAD_IN_ONE_WRITE", 10)
    for name, value in store.env.items():
        if name.startswith(("AWS_", "TAGGER_")):
            monkeypatch.setenv(name, value)
    # What is tested is the refusal; a connection reset on a loaded machine is retried, so give retries room.
    monkeypatch.setenv("TAGGER_STORE_TIMEOUT", "30")
    host = store.proxy.endpoint.removeprefix("http://")
    out = f"s3://{BUCKET}/big.parquet?endpoint_override={host}&scheme=http&region=us-east-1"
    store.put(f"{BUCKET}/big.parquet", b"old")
    tmp = tmp_path / "new"
    tmp.write_bytes(b"new output " * 100)
    store.proxy.deny(f"PUT /{BUCKET}/big.parquet HTTP".encode())  # the CopyObject onto the key
    with pytest.raises(TaggerError, match=f"^cannot write s3://{BUCKET}/big.parquet: .*ACCESS_DENIED"):
        storage.publish(tmp, out)
    assert store.proxy.denials == 1 and not tmp.exists()
    assert store.get(f"{BUCKET}/big.parquet") == b"old" and store.keys(BUCKET) == ["big.parquet"]
    store.proxy.deny(None)
    tmp.write_bytes(b"new output " * 100)
    storage.publish(tmp, out)
    assert store.get(f"{BUCKET}/big.parquet") == b"new output " * 100 and store.keys(BUCKET) == ["big.parquet"]


def test_a_refused_merge_upload_exits_1_and_keeps_the_old_object(
    store: Store, contract_onnx: Path, tmp_path: Path
) -> None:
    """tagger merge into a bucket: the store refuses the PUT, the merge exits 1 naming it, the old object stays."""
    cat = tmp_path / "cat"
    _photos(cat, 4, seed=19)
    shards = [tmp_path / f"{i}.parquet" for i in range(2)]
    for i, shard in enumerate(shards):
        done = _run(store, cat, "--out", shard, "--model", contract_onnx, "--device", "cpu", "--workers", "0",
                    "--shard", f"{i}/2")  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
    store.put(f"{BUCKET}/merged.parquet", b"old merge")
    store.proxy.deny(f"PUT /{BUCKET}/merged.parquet HTTP".encode())
    proc = subprocess.run(
        [sys.executable, "-m", "tagger.cli", "merge", f"s3://{BUCKET}/merged.parquet", *map(str, shards)], cwd=REPO,
        capture_output=True, text=True, timeout=120, env=store.env,
    )  # fmt: skip
    line = _error_line(proc)
    assert f"s3://{BUCKET}/merged.parquet" in line and "ACCESS_DENIED" in line, line
    assert store.get(f"{BUCKET}/merged.parquet") == b"old merge"
