"""A photo whose decode waits at a gate the test opens: "a run is decoding now", known instead of hoped for.

Run the CLI through `script(folder)`: it registers a Pillow plugin (in spawned decode workers too, which import the
main module again, like the crashing decoder of test_decode_pool) for files that start with b"GATED". Such a file
names its gate folder; decoding it writes the decoding process's pid to `reached` there, then waits until `open`
exists and decodes to a 16x16 RGB photo, so its row is "ok" like any other.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

SIZE = 16

PLUGIN = f"""
import os, time
from PIL import Image, ImageFile

class Gated(ImageFile.ImageFile):
    format = "GATED"

    def _open(self):
        head = self.fp.read(4096)
        gate = head.split(b"\\n")[1].decode()
        with open(os.path.join(gate, f".reached.{{os.getpid()}}"), "w") as f:
            f.write(str(os.getpid()))
        os.replace(f.name, os.path.join(gate, "reached"))  # whole or absent for the test's poll
        deadline = time.monotonic() + 300  # a test that never opens it has failed long before
        while not os.path.exists(os.path.join(gate, "open")) and time.monotonic() < deadline:
            time.sleep(0.01)
        self._mode, self._size = "RGB", ({SIZE}, {SIZE})
        offset = len(b"GATED\\n") + len(gate.encode()) + 1
        self.tile = [ImageFile._Tile("raw", (0, 0, {SIZE}, {SIZE}), offset, ("RGB", 0, 1))]

Image.register_open("GATED", Gated, lambda prefix: prefix[:6] == b"GATED\\n")

if __name__ == "__main__":
    from tagger.cli import main
    main()
"""


class Gate:
    """A gate folder; `photo` writes a file that waits at it."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder

    def photo(self, path: Path, value: int = 128) -> Path:
        path.write_bytes(b"GATED\n" + str(self.folder).encode() + b"\n" + bytes([value]) * (SIZE * SIZE * 3))
        return path

    def script(self) -> Path:
        """The CLI's entry point with the plugin registered: run it as `python SCRIPT run ...`."""
        script = self.folder / "gated_tagger.py"
        script.write_text(PLUGIN)
        return script

    def wait_reached(self, proc: subprocess.Popen[str], timeout: float = 60) -> int:
        """The pid of the process decoding the gated photo, once it waits at the gate."""
        reached = self.folder / "reached"
        deadline = time.monotonic() + timeout
        while not reached.exists():
            assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before decoding the gated photo"
            assert time.monotonic() < deadline, f"no decode reached the gate within {timeout:.0f} s"
            time.sleep(0.005)
        return int(reached.read_text())

    def open(self) -> None:
        (self.folder / "open").touch()
