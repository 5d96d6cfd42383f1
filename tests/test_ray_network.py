"""`tagger run --engine ray` with its own local Ray instance: every socket of the run's process tree listens on
127.0.0.1 only, and the run works from a folder that holds a checkout named tagger/. One real CLI process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from procs import descendants

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
PHOTO = (REPO / "sample_images/images/10003.jpg").read_bytes()
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
TCP_LISTEN = "0A"  # the state column of /proc/net/tcp{,6}


def _listening_sockets() -> dict[int, str]:
    """Socket inode -> local address, for every TCP socket in the LISTEN state on this machine."""
    sockets = {}
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with open(f"/proc/net/{name}") as f:
            rows = f.read().splitlines()[1:]
        for row in rows:
            fields = row.split()
            if fields[3] != TCP_LISTEN:
                continue
            hex_address = fields[1].split(":")[0]
            # The kernel prints each 32-bit word of the address in host (little-endian) byte order.
            raw = b"".join(bytes.fromhex(hex_address[i : i + 8])[::-1] for i in range(0, len(hex_address), 8))
            sockets[int(fields[9])] = socket.inet_ntop(family, raw)
    return sockets


def _listeners(root: int) -> set[tuple[str, str]]:
    """(process name, address) of each listening socket that root or a process below it holds open."""
    sockets, found = _listening_sockets(), set()
    for pid in descendants(root):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # exited meanwhile
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and int(target[8:-1]) in sockets:
                found.add((comm, sockets[int(target[8:-1])]))
    return found


def test_local_ray_listens_on_loopback_only_from_a_folder_with_a_tagger_checkout(
    contract_onnx: Path, tmp_path: Path
) -> None:
    pytest.importorskip("ray.data", reason="needs the ray extra: pip install 'tagger[ray]'")
    if not Path("/proc/net/tcp").exists():
        pytest.skip("lists sockets through /proc")
    cli = Path(sys.executable).with_name("tagger")  # the installed command, as a user runs it
    if not cli.exists():
        pytest.skip(f"no tagger command beside {sys.executable}")
    root, out = tmp_path / "cat", tmp_path / "tags.parquet"
    root.mkdir()
    for i in range(4):
        (root / f"{i}.jpg").write_bytes(PHOTO)
    # A checkout of tagger in the working folder: its tagger/ has no __init__.py of its own at the top.
    work = tmp_path / "work"
    (work / "tagger" / "tagger").mkdir(parents=True)
    (work / "tagger" / "README.md").write_text("# tagger\n")
    (work / "tagger" / "tagger" / "__init__.py").write_text("")
    args = [str(cli), "run", str(root), "--out", str(out), "--model", str(contract_onnx), "--device", "cpu",
            "--engine", "ray", "--batch-size", "2"]  # fmt: skip
    seen: set[tuple[str, str]] = set()
    with open(tmp_path / "stderr", "w+") as err:
        proc = subprocess.Popen(args, cwd=work, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 180
        while proc.poll() is None:
            assert time.monotonic() < deadline, "the run did not end within 180 s"
            seen |= _listeners(proc.pid)
            time.sleep(0.2)
        err.seek(0)
        assert proc.returncode == 0, err.read()[-3000:]
    assert pq.read_table(out).num_rows == 4
    assert "gcs_server" in {name for name, _ in seen}, seen  # the listing saw Ray's own processes
    assert {(name, address) for name, address in seen if address not in LOOPBACK} == set()
