"""Atomic file output: reserve a temp file beside the destination early, move it into place only when complete."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tagger.errors import TaggerError


def check_destination(out: Path, source: Path, source_kind: str = "model") -> None:
    """TaggerError unless a file derived from `source` may be written at `out`: not a folder, not `source` itself."""
    if out.is_dir():
        raise TaggerError(f"output {out} is a directory; give a file name such as {out / 'model.onnx'}")
    if out.exists() and out.resolve() == source.resolve():
        raise TaggerError(f"output {out} is the {source_kind} itself; choose another name")


def reserve_temp(out: Path) -> Path:
    """Create the temp file next to `out` now, so os.replace stays on one filesystem and permissions fail early."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as e:
        raise TaggerError(f"cannot write {out}: {e.strerror or e}") from None
    os.close(fd)
    return Path(name)


def publish(tmp: Path, out: Path) -> None:
    """Give `tmp` the mode a new file would get (mkstemp made it owner-only) and move it onto `out`."""
    mask = os.umask(0)
    os.umask(mask)
    tmp.chmod(0o666 & ~mask)  # the runtime may run as another user
    os.replace(tmp, out)
