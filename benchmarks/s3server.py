"""Servers that tests and benchmarks start on 127.0.0.1: moto's S3 at a free port, and the environment that reaches it."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from procs import cpu_seconds

ACCESS_KEY = "AKIATAGGERTESTKEY01"
SECRET_KEY = "tagger-test-secret-Zq8vXw3"  # a test asserts this never appears in output or metadata
START_S = 60.0  # a loaded two-core machine can take this long to import moto
STOP_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """One server process that listens on 127.0.0.1:port; started and awaited here, stopped by stop()."""

    def __init__(self, cmd: Sequence[str], port: int, what: str, env: Mapping[str, str] | None = None) -> None:
        self.port, self.what = port, what
        self.proc = subprocess.Popen(
            list(cmd), env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{what} exited {self.proc.returncode} before it listened on 127.0.0.1:{port}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {START_S:.0f} s")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class S3Server:
    """One moto server process; env() is what a client needs to reach it (and nothing else)."""

    def __init__(self, home: Path, settings: Mapping[str, str] | None = None) -> None:
        """settings: environment of the server process only (moto's own options, e.g. INITIAL_NO_AUTH_ACTION_COUNT)."""
        if importlib.util.find_spec("moto") is None:
            raise RuntimeError("moto's server is not installed (pip install 'moto[server]')")
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.home = home
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self.process = ServerProcess(cmd, self.port, "moto_server", settings)

    def env(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> dict[str, str]:
        """AWS_* variables for this server only: no profile, no instance role, no real AWS."""
        self.home.mkdir(parents=True, exist_ok=True)
        empty = self.home / "empty"
        empty.write_text("")
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(empty),
            "AWS_SHARED_CREDENTIALS_FILE": str(empty),
        }

    def cpu_seconds(self) -> float:
        """The server's own CPU time so far (a benchmark reports it apart from the client's)."""
        return cpu_seconds(self.process.pid)

    def stop(self) -> None:
        self.process.stop()


def apply_env(env: Mapping[str, str]) -> dict[str, str | None]:
    """Set env in os.environ; return what it replaced, for restore_env."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return saved


def restore_env(saved: Mapping[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextlib.contextmanager
def environment(env: Mapping[str, str]) -> Iterator[None]:
    """env in os.environ for the block (child processes inherit it), restored after."""
    saved = apply_env(env)
    try:
        yield
    finally:
        restore_env(saved)
