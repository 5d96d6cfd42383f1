"""Execution engines for `tagger run`: the local one lives in tagger.pipeline.run; others wire the same stages elsewhere."""

from __future__ import annotations

ENGINES: tuple[str, ...] = ("local", "ray")

__all__ = ["ENGINES"]
