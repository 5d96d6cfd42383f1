"""Executors of one run plan (tagger.engines.plan): `local` on this machine, `ray` on a Ray cluster."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from tagger.engines.plan import RunConfig, RunSummary

# --engine's choices, each the module that executes the plan: its execute(config, options) runs it. Imported only
# when chosen, so that `tagger --help` and the local engine never import Ray.
ENGINES: dict[str, str] = {"local": "tagger.engines.local", "ray": "tagger.engines.ray"}


def execute(engine: str, config: RunConfig, options: Mapping[str, Any]) -> RunSummary:
    """Run `config` on the engine named `engine`; options: the engine's own (None: its default), e.g. Ray's
    address, actors and num_gpus_per_actor, which the local engine refuses when set."""
    summary: RunSummary = importlib.import_module(ENGINES[engine]).execute(config, options)
    return summary


__all__ = ["ENGINES", "execute"]
