"""Postprocess stage: per-task probabilities -> top-1 label index and score, plus the top-k when asked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from tagger.contract import TaskSpec


@dataclass(frozen=True, eq=False)
class TaskPrediction:
    """One task's predictions for N images; indices point into the task's labels."""

    index: np.ndarray  # int32 [N], top-1 label index
    score: np.ndarray  # float32 [N], its probability
    topk_index: np.ndarray | None = None  # int32 [N, K], best first; None when top_k == 0
    topk_score: np.ndarray | None = None  # float32 [N, K]


def postprocess(
    probs: Mapping[str, np.ndarray], tasks: Sequence[TaskSpec], top_k: int = 0
) -> dict[str, TaskPrediction]:
    """{task: float [N, C]} -> {task: TaskPrediction}. Ties go to the lower label index, so results are stable.

    K is min(top_k, C); top-k entry 0 always equals the top-1 columns.
    """
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    out: dict[str, TaskPrediction] = {}
    for task in tasks:
        p = np.asarray(probs[task.name], dtype=np.float32)  # [N, C]
        if p.ndim != 2 or p.shape[1] != len(task.labels):
            raise ValueError(f"task {task.name}: expected [N, {len(task.labels)}] probabilities, got {list(p.shape)}")
        rows = np.arange(len(p))
        if top_k:
            order = np.argsort(-p, axis=1, kind="stable")[:, : min(top_k, p.shape[1])].astype(np.int32)  # [N, K]
            best = order[:, 0]
            out[task.name] = TaskPrediction(best, p[rows, best], order, np.take_along_axis(p, order, axis=1))
        else:
            best = np.argmax(p, axis=1).astype(np.int32)
            out[task.name] = TaskPrediction(best, p[rows, best])
    return out
