"""tagger: batch tagging of product photos (article class and colour) with one multi-task CNN."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from tagger.train.checkpoint import LoadedCheckpoint


def load_checkpoint(path: str, map_location: str = "cpu") -> "LoadedCheckpoint":
    """Rebuild the model and its metadata from a trainer checkpoint alone (imports torch)."""
    from tagger.train.checkpoint import load_checkpoint as _load

    return _load(path, map_location=map_location)


def __getattr__(name: str) -> Any:
    # Serving entry points are imported lazily so `import tagger` stays cheap and torch-free.
    if name == "run":
        from tagger.pipeline.run import run

        return run
    raise AttributeError(name)


__all__ = ["__version__", "load_checkpoint", "run"]
