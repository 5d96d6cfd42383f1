"""`tagger run s3://… --engine ray` on a real two-node Ray cluster (two raylets on 127.0.0.1), no shared files."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from procs import alive, descendants
from s3server import S3Server, free_port
from test_ray import _assert_same_rows, nightly_runs_equal_the_local_engines

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NODE_START_S = 60.0
STOP_GRACE_S = 3.0  # the head drains for up to 30 s on SIGTERM; what is left after this is killed


def _nodes(address: str, env: dict[str, str]) -> int:
    status = subprocess.run(
        ["ray", "status", "--address", address], env=env, capture_output=True, text=True, timeout=30
    )
    active = status.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return active.count("node_") if status.returncode == 0 else 0


@contextlib.contextmanager
def _ray_cluster(node_env: dict[str, str] | None = None) -> Iterator[str]:
    """A head and a second raylet, 1 CPU each, on 127.0.0.1 with their own temp dirs; yields the head's address.

    node_env: what each node's environment adds (an object store's endpoint and credentials, as a real node has
    them). Each `ray start --block` is this test's child: at the end it and every process below it are stopped by
    pid (`ray stop` would stop every Ray on the machine), and the test fails if one is left.
    """
    # Both: a ray command on the PATH may belong to another Python than the one running tagger here.
    pytest.importorskip("ray.data", reason="needs the ray extra: pip install 'tagger[ray]'")
    if shutil.which("ray") is None:
        pytest.skip("needs the ray command line: pip install 'tagger[ray]'")
    tmp = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **(node_env or {})}
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats", "--block"]
    head_cmd = ["ray", "start", "--head", "--port", str(port), "--include-dashboard", "false", *common]
    worker_cmd = ["ray", "start", "--address", address, *common]
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        for name, cmd in (("head", head_cmd), ("worker", worker_cmd)):
            with open(tmp / f"{name}.log", "wb") as log:
                nodes.append(subprocess.Popen(
                    [*cmd, "--temp-dir", str(tmp / name)], env=env, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                ))  # fmt: skip
            deadline = time.monotonic() + NODE_START_S
            while _nodes(address, env) < len(nodes):
                assert nodes[-1].poll() is None, (tmp / f"{name}.log").read_text()[-2000:]
                assert time.monotonic() < deadline, f"the Ray {name} did not join within {NODE_START_S:.0f} s"
                time.sleep(0.5)
        yield address
    finally:
        pids = [pid for node in nodes for pid in descendants(node.pid)]
        for node in reversed(nodes):  # the worker first: it leaves the cluster at once
            node.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        for node in nodes:
            node.wait(10)
        deadline = time.monotonic() + 5  # SIGKILLed ones end as soon as the kernel has torn them down
        while (left := [pid for pid in pids if alive(pid)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        subprocess.run(["rm", "-rf", str(tmp)])
        assert not left, f"Ray processes left running: {left}"


@pytest.fixture
def ray_cluster() -> Iterator[str]:
    with _ray_cluster() as address:
        yield address


@pytest.fixture
def s3_catalog(catalog: tuple[Path, dict[str, str]], bucket: str) -> str:
    """The catalog's regular files as objects below BUCKET/cat on the test S3 server; its URI.

    Put one request each with boto3 (moto 5.2 answers a multipart upload's completion in a way pyarrow rejects);
    the endpoint and credentials come from the environment the s3_server fixture set.
    """
    boto3 = pytest.importorskip("boto3")
    s3, name = boto3.client("s3"), bucket.removeprefix("s3://")
    root = catalog[0]
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            s3.put_object(Bucket=name, Key=f"cat/{path.relative_to(root).as_posix()}", Body=path.read_bytes())
    return f"{bucket}/cat"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, "-m", "tagger.cli", "-q", "run", *args], env=env, capture_output=True, text=True,
        timeout=180,
    )  # fmt: skip


def test_ray_across_two_nodes_writes_the_local_engines_rows(
    ray_cluster: str, catalog: tuple[Path, dict[str, str]], contract_onnx: Path, tmp_path: Path
) -> None:
    """Each node has 1 CPU and the inference actor holds one for the whole run, so decode runs on the other node."""
    root, expected = catalog
    local, remote = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    common = ["--model", str(contract_onnx), "--device", "cpu", "--batch-size", "4"]
    done = _cli(str(root), "--out", str(local), "--workers", "0", *common)
    assert done.returncode == 0, done.stderr
    done = _cli(str(root), "--out", str(remote), "--engine", "ray", "--ray-address", ray_cluster, *common)
    assert done.returncode == 0, done.stderr[-3000:]
    want, got = pq.read_table(local), pq.read_table(remote)
    assert got.schema.equals(want.schema)
    assert got.column("path").to_pylist() == sorted(expected)  # discovery order
    _assert_same_rows(got.to_pylist(), want.to_pylist())


def test_ray_across_two_nodes_resumes_and_runs_incrementally_as_the_local_engine(
    ray_cluster: str, catalog: tuple[Path, dict[str, str]], contract_onnx: Path, tmp_path: Path
) -> None:
    """--resume and --incremental through the CLI: the Ray driver's sink reuses rows, the two nodes tag the rest."""
    common = ["--model", str(contract_onnx), "--device", "cpu", "--batch-size", "4", "--workers", "0"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}

    def tag(engine: str, args: list[str]) -> tuple[int, str]:
        where = ["--ray-address", ray_cluster] if engine == "ray" else []
        cmd = [sys.executable, "-m", "tagger.cli", "run", *args, *common, "--engine", engine, *where]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        return done.returncode, done.stdout + done.stderr

    nightly_runs_equal_the_local_engines(catalog[0], tmp_path, tag)


def test_ray_across_two_nodes_reads_and_writes_the_bucket(
    s3_catalog: str, s3_server: S3Server, contract_onnx: Path, tmp_path: Path
) -> None:
    """No shared files: both engines tag the same objects, Ray's decode tasks read them from the store on either
    node (each node configured with the store's endpoint and credentials, as real nodes are), and the Ray driver
    writes its output into the bucket; the rows are the local engine's."""
    local, remote = tmp_path / "local.parquet", s3_catalog.replace("/cat", "/out/ray.parquet")
    common = ["--model", str(contract_onnx), "--device", "cpu", "--batch-size", "4"]
    done = _cli(s3_catalog, "--out", str(local), "--workers", "0", *common)
    assert done.returncode == 0, done.stderr[-3000:]
    with _ray_cluster(s3_server.env()) as address:
        done = _cli(s3_catalog, "--out", remote, "--engine", "ray", "--ray-address", address, *common)
    assert done.returncode == 0, done.stderr[-3000:]
    fs, key = pafs.FileSystem.from_uri(remote)
    with fs.open_input_file(key) as f:
        got = pq.read_table(f)
    want = pq.read_table(local)
    assert want.num_rows > 0 and got.schema.equals(want.schema)
    assert got.column("path").to_pylist() == want.column("path").to_pylist()  # discovery order
    _assert_same_rows(got.to_pylist(), want.to_pylist())
