"""`tagger run --engine ray` from Python: run_ray(RunConfig(...), RayOptions(...)); Ray is imported only by a run."""

from __future__ import annotations

from tagger.engines.ray import RayOptions, run_ray, writes_folder
from tagger.pipeline.run import RunConfig, RunSummary

__all__ = ["RayOptions", "RunConfig", "RunSummary", "run_ray", "writes_folder"]
