"""A real S3 server for tests: moto_server on 127.0.0.1 at a free port, and the environment that points at it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Mapping

ACCESS_KEY = "AKIATAGGERTESTKEY01"
SECRET_KEY = "tagger-test-secret-Zq8vXw3"  # a test asserts this never appears in output or metadata


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class S3Server:
    """One moto_server process; env() is what a client needs to reach it (and nothing else)."""

    def __init__(self, home: Path, settings: Mapping[str, str] | None = None) -> None:
        """settings: environment of the server process only (moto's own options, e.g. INITIAL_NO_AUTH_ACTION_COUNT)."""
        exe = shutil.which("moto_server")
        if exe is None:
            raise RuntimeError("moto_server is not installed (pip install 'moto[server]')")
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.home = home
        self.proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(self.port)],
            env={**os.environ, **(settings or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.05)

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

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


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
