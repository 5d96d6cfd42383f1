"""Output rows: one tagged batch (refs, decode results, predictions) -> an Arrow table of the output's columns."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa

from tagger.contract import TaskSpec
from tagger.output import schema as s
from tagger.pipeline.batch import Batch
from tagger.pipeline.decode import Sample
from tagger.pipeline.discover import MISSING_SIZE
from tagger.pipeline.postprocess import TaskPrediction


def rows_to_table(
    batch: Batch,
    preds: Mapping[str, TaskPrediction],
    tasks: Sequence[TaskSpec],
    top_k: int = 0,
    embedding: np.ndarray | None = None,
) -> pa.Table:
    """One row per ref of the batch, in order; predictions (for the batch's Samples, in order) fill the ok rows.

    embedding: float [k, D] for the batch's Samples, or None for no `embedding` column.
    """
    n = len(batch.refs)
    ok = np.array([isinstance(r, Sample) for r in batch.results], dtype=bool)  # [n]
    err = ~ok
    rows = np.flatnonzero(ok)  # [k] row of each prediction
    cols: dict[str, pa.Array] = {"path": pa.array([r.path for r in batch.refs], pa.string())}
    for t in tasks:
        p = preds[t.name]
        labels = pa.array(t.labels, pa.string())
        idx = np.zeros(n, np.int32)
        idx[rows] = p.index
        score = np.zeros(n, np.float32)
        score[rows] = p.score
        cols[t.name] = pa.DictionaryArray.from_arrays(pa.array(idx, mask=err), labels)
        cols[f"{t.name}_score"] = pa.array(score, mask=err)
        if top_k:
            cols[f"{t.name}_topk"] = _topk_column(p, labels, ok)
    sizes = [r.size for r in batch.refs]
    mtimes = [r.mtime for r in batch.refs]
    cols["status"] = pa.array([s.STATUS_OK if o else s.STATUS_ERROR for o in ok], pa.string())
    cols["error"] = pa.array([None if isinstance(r, Sample) else r.error for r in batch.results], pa.string())
    cols["width"] = pa.array([r.width if isinstance(r, Sample) else None for r in batch.results], pa.int32())
    cols["height"] = pa.array([r.height if isinstance(r, Sample) else None for r in batch.results], pa.int32())
    cols["bytes"] = pa.array([None if s == MISSING_SIZE else s for s in sizes], pa.int64())
    cols["mtime"] = pa.array([None if math.isnan(m) else m for m in mtimes], pa.float64())
    cols["sha256"] = pa.array([r.sha256 for r in batch.results], pa.string())
    dim = 0
    if embedding is not None:
        dim = embedding.shape[1]
        values = np.zeros((n, dim), np.float16)
        values[rows] = embedding
        cols[s.EMBEDDING_COLUMN] = pa.FixedSizeListArray.from_arrays(
            pa.array(values.ravel()), type=s.embedding_type(dim), mask=pa.array(err)
        )
    return pa.Table.from_pydict(cols, schema=s.output_schema(tasks, top_k, dim))


def _topk_column(p: TaskPrediction, labels: pa.Array, ok: np.ndarray) -> pa.Array:
    assert p.topk_index is not None and p.topk_score is not None
    k = p.topk_index.shape[1]
    values = pa.StructArray.from_arrays(
        [labels.take(pa.array(p.topk_index.ravel())), pa.array(p.topk_score.ravel(), pa.float32())],
        names=["label", "score"],
    )
    # Error rows are null lists: zero-length offsets steps plus a null mask.
    offsets = np.concatenate([[0], np.cumsum(np.where(ok, k, 0))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values, type=s.TOPK_TYPE, mask=pa.array(~ok))


__all__ = ["rows_to_table"]
