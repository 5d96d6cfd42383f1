"""Executors of one run plan (tagger.engines.plan): `local` on this machine, `ray` on a Ray cluster."""

from __future__ import annotations

# --engine's choices, each the module that executes the plan.
ENGINES: dict[str, str] = {"local": "tagger.engines.local", "ray": "tagger.engines.ray"}

__all__ = ["ENGINES"]
