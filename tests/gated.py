"""A photo whose decode waits at a gate the test opens: "a run is decoding now", known instead of hoped for.

Run the CLI as `python SCRIPT run ...` with SCRIPT from `Gate.script()` and `Gate.env` set: like the crashing
decoder of test_decode_pool, the script wraps Pillow's open in the run and in its spawned decode workers (which
import the main module again). Opening a photo marked by `gate_photo` (a JPEG or PNG comment) writes the opening
process's pid to `reached` in the gate folder, then waits until `open` exists there. The photo itself is an
ordinary one: runs without the script, and runs past the gate, tag it as usual.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from PIL import Image, PngImagePlugin

ENV = "TAGGER_TEST_GATE"
MARK = "gate"

SCRIPT = f"""
import os, time
from PIL import Image

_open = Image.open


def gated_open(*args, **kwargs):
    img = _open(*args, **kwargs)
    gate = os.environ.get({ENV!r})
    if gate and img.info.get("comment") in ({MARK!r}, {MARK.encode()!r}):
        with open(os.path.join(gate, f".reached.{{os.getpid()}}"), "w") as f:
            f.write(str(os.getpid()))
        os.replace(f.name, os.path.join(gate, "reached"))  # whole or absent for the test's poll
        deadline = time.monotonic() + 300  # a test that never opens it has failed long before
        while not os.path.exists(os.path.join(gate, "open")) and time.monotonic() < deadline:
            time.sleep(0.01)
    return img


Image.open = gated_open

if __name__ == "__main__":
    from tagger.cli import main
    main()
"""


def gate_photo(path: Path) -> Path:
    """Mark the photo at path (JPEG or PNG, rewritten in place) as one whose decode waits at the gate."""
    with Image.open(path) as img:
        img.load()
    if img.format == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("comment", MARK)
        img.save(path, pnginfo=info)
    else:
        img.save(path, quality=90, comment=MARK.encode())
    return path


class Gate:
    """A gate folder, the environment that points the script at it, and the script."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.env = {**os.environ, ENV: str(folder)}

    def script(self) -> Path:
        """The CLI's entry point with Pillow's open wrapped: run it as `python SCRIPT run ...` with `env`."""
        script = self.folder / "gated_tagger.py"
        script.write_text(SCRIPT)
        return script

    def wait_reached(self, proc: subprocess.Popen[str], timeout: float = 60) -> int:
        """The pid of the process opening the gated photo, once it waits at the gate."""
        reached = self.folder / "reached"
        deadline = time.monotonic() + timeout
        while not reached.exists():
            assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before opening the gated photo"
            assert time.monotonic() < deadline, f"no decode reached the gate within {timeout:.0f} s"
            time.sleep(0.005)
        return int(reached.read_text())

    def open(self) -> None:
        (self.folder / "open").touch()
