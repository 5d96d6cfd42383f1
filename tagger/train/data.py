"""Training data: task mapping, rare-label filter, content-hash split and the decoded-image cache."""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from tagger.contract import PreprocessSpec, TaskSpec
from tagger.errors import TaggerError, UsageError
from tagger.labelled import load_labelled_folder
from tagger.metrics import IGNORE
from tagger.pipeline.decode import DEFAULT_MAX_PIXELS, Failure, decode_stream
from tagger.pipeline.discover import ImageRef
from tagger.train.features import file_digests

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One labelled image: its id, file, one label index per task (IGNORE where not scored) and its folder."""

    id: str
    ref: ImageRef
    labels: tuple[int, ...]
    digest: str  # sha256 of the file's bytes: byte-identical copies share it
    source: int = 0  # index of its --data folder


@dataclass(frozen=True)
class LabelledSet:
    tasks: tuple[TaskSpec, ...]
    train: tuple[Example, ...]
    val: tuple[Example, ...]


def in_val(digest: str, seed: int, val_fraction: float) -> bool:
    """Seeded, order-free assignment by content: every copy of the same bytes lands on the same side."""
    h = hashlib.sha256(f"{seed}:{digest}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < val_fraction


def split_sides(ids: Sequence[str], digests: Sequence[str], seed: int, val_fraction: float) -> list[bool]:
    """Whether each image is validation. The first image of an id decides that id's side, so a product seen in an
    earlier folder (a thumbnail) keeps its other images (real-size photos) on the same side."""
    side: dict[str, str] = {}
    for i, d in zip(ids, digests):
        side.setdefault(i, d)
    return [in_val(side[i], seed, val_fraction) for i in ids]


def data_folder_weights(folders: Sequence[Path], weights: Sequence[tuple[Path, float]]) -> list[float]:
    """Each folder's sample weight (--data-weight DIR=W, default 1), in folder order."""
    index = {d.resolve(): i for i, d in enumerate(folders)}
    out = [1.0] * len(folders)
    for path, w in weights:
        if path.resolve() not in index:
            raise UsageError(f"--data-weight names {path}, which is not a --data folder")
        if not (math.isfinite(w) and w > 0):  # 0, NaN or inf would make NaN scores; < 0 ascends
            raise UsageError(f"--data-weight {path}={w}: a weight must be a positive number")
        out[index[path.resolve()]] = w
    return out


def load_labelled_set(
    data_dirs: Sequence[Path],
    task_columns: Mapping[str, str],
    min_count: int = 8,
    val_fraction: float = 0.15,
    seed: int = 0,
    limit: int | None = None,
) -> LabelledSet:
    """Rows of every folder's styles.csv with an image, filtered and split; the first task is the primary one.

    Rows whose primary label has fewer than `min_count` images (over all folders) are dropped. A rare or missing
    label in another task becomes IGNORE (left out of that task's loss) and the image is kept.
    """
    with_image = []
    for source, data_dir in enumerate(data_dirs):
        folder = load_labelled_folder(data_dir)
        for task, column in task_columns.items():
            folder.require_column(column, f"task {task!r}")
        with_image += [(folder.rows[i], ref, source) for i, ref in zip(folder.ref_rows, folder.refs)]
    if limit is not None and limit < len(with_image):
        pick = np.random.default_rng(seed).choice(len(with_image), size=limit, replace=False)
        with_image = [with_image[i] for i in sorted(pick)]

    names = list(task_columns)
    primary = names[0]
    counts = {t: Counter(r[task_columns[t]] for r, _, _ in with_image if r[task_columns[t]]) for t in names}
    kept_labels = {t: sorted(lab for lab, n in counts[t].items() if n >= min_count) for t in names}
    kept = [row for row in with_image if row[0][task_columns[primary]] in set(kept_labels[primary])]
    log.info(
        "kept %d rows: dropped %d whose %r label has fewer than %d images (%d of %d labels kept)",
        len(kept), len(with_image) - len(kept), primary, min_count, len(kept_labels[primary]), len(counts[primary]),
    )
    if not kept:
        raise TaggerError(f"every row was filtered out: no {primary!r} label has at least {min_count} images")

    tasks = tuple(TaskSpec(t, tuple(kept_labels[t])) for t in names)
    index = {t.name: {lab: i for i, lab in enumerate(t.labels)} for t in tasks}
    digests = file_digests([ref for _, ref, _ in kept])
    examples = [
        Example(
            id=r["id"],
            ref=ref,
            labels=tuple(index[t].get(r[task_columns[t]], IGNORE) for t in names),
            digest=digest,
            source=source,
        )
        for (r, ref, source), digest in zip(kept, digests)
    ]
    sides = split_sides([e.id for e in examples], digests, seed, val_fraction)
    train = tuple(e for e, v in zip(examples, sides) if not v)
    val = tuple(e for e, v in zip(examples, sides) if v)
    if not train or not val:
        raise TaggerError(f"too few images ({len(examples)}) for a train/validation split")
    log.info("split by content hash (seed %d): %d train, %d validation", seed, len(train), len(val))
    return LabelledSet(tasks, train, val)


def class_weights(examples: Sequence[Example], tasks: Sequence[TaskSpec], power: float = 0.3) -> dict[str, np.ndarray]:
    """Per-task class weights w_c ∝ n_c^-power, scaled so the average weight per training sample is 1.

    Plain inverse frequency (power=1) would weight a class of 8 images ~700x more than Tshirts and make the loss chase a
    handful of samples; power 0.3 to 0.5 tempers that. On the validation split, 0.3 beat 0.5 on top-1 for both tasks at
    the same macro-F1. Unseen classes get the largest weight.
    """
    return {
        task.name: class_weight_vector(np.array([e.labels[i] for e in examples], np.int64), len(task.labels), power)
        for i, task in enumerate(tasks)
    }


def class_weight_vector(labels: np.ndarray, n_classes: int, power: float = 0.3) -> np.ndarray:
    """float32 [n_classes]: w_c ∝ n_c^-power over the scored `labels` (int [N], IGNORE skipped), mean weight 1 per
    training sample (see class_weights)."""
    n = np.bincount(labels[labels != IGNORE], minlength=n_classes).astype(np.float64)
    w = np.power(np.maximum(n, 1.0), -power)
    w *= n.sum() / max((w * n).sum(), 1e-12)
    return w.astype(np.float32)


def decode_cache(
    examples: Sequence[Example], spec: PreprocessSpec, workers: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, tuple[Example, ...]]:
    """Decode every image once into a uint8 [N, S, S, 3] array with the serving decoder, so training sees the
    pixels `tagger run` feeds the model (EXIF rotation, mode policy, JPEG draft scale, fit-and-pad).

    Images that fail to decode are skipped and counted. 35k images at 160 px is ~2.7 GB, fine in RAM, and it keeps a
    GPU fed.
    """
    images = np.empty((len(examples), spec.size, spec.size, 3), dtype=np.uint8)
    good: list[int] = []
    errors: list[str] = []
    for _, batch in decode_stream([e.ref for e in examples], spec, max_pixels, workers):
        for r in batch.results:
            if isinstance(r, Failure):
                errors.append(f"{examples[r.index].ref.path}: {r.error}")
            else:
                images[len(good)] = r.array  # a copy: the batch's buffer is reused
                good.append(r.index)
    if errors:
        log.warning("skipped %d images that did not decode (first: %s)", len(errors), errors[0])
    if not good:
        raise TaggerError("no training image could be decoded")
    return images[: len(good)], tuple(examples[i] for i in good)


def default_train_workers() -> int:
    """Worker processes of a training run (its decode cache, then its DataLoader): one per core, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))
