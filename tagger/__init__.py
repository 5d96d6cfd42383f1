"""tagger: batch tagging of product photos (article class and colour) with one multi-task CNN."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tagger._version import __version__

if TYPE_CHECKING:
    from tagger.engines.local import run
    from tagger.engines.plan import ErrorLimit, RunConfig, RunSummary
    from tagger.train.checkpoint import LoadedCheckpoint

# Serving entry points are imported on first use, so `import tagger` stays cheap and torch-free.
_LAZY = {
    "run": "tagger.engines.local",
    "ErrorLimit": "tagger.engines.plan",
    "RunConfig": "tagger.engines.plan",
    "RunSummary": "tagger.engines.plan",
}


def load_checkpoint(path: str, map_location: str = "cpu") -> "LoadedCheckpoint":
    """Rebuild the model and its metadata from a trainer checkpoint alone (imports torch)."""
    from tagger.train.checkpoint import load_checkpoint as _load

    return _load(path, map_location=map_location)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tagger' has no attribute {name!r}")


__all__ = ["ErrorLimit", "RunConfig", "RunSummary", "__version__", "load_checkpoint", "run"]
