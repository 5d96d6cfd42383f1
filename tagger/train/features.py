"""Pooled features of labelled images through the serving path, cached on disk by file and model sha256. No torch."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from tagger.errors import TaggerError
from tagger.model.edit import FEATURES_OUTPUT, onnx_module, with_features_output
from tagger.model.info import model_sha256, read_model_metadata
from tagger.compose import decoded_batches
from tagger.pipeline.decode import Sample
from tagger.pipeline.discover import ImageRef
from tagger.pipeline.session import open_session
from tagger.storage import publishing, sha256_file

log = logging.getLogger(__name__)

PART_IMAGES = 2048  # features written to a new cache part every this many images, so an interrupted run keeps them


def default_cache_dir() -> Path:
    """$TAGGER_CACHE/heads, else $XDG_CACHE_HOME/tagger/heads, else ~/.cache/tagger/heads."""
    if os.environ.get("TAGGER_CACHE"):
        return Path(os.environ["TAGGER_CACHE"]) / "heads"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tagger" / "heads"


class FeatureCache:
    """root/<model sha256>/part-*.npz: each holds `sha256` (file digests, str [n]) and `features` (float32 [n, D])."""

    def __init__(self, root: Path, model_sha: str) -> None:
        self.dir = Path(root) / model_sha
        self._rows: dict[str, np.ndarray] = {}
        self._parts = 0
        if self.dir.is_dir():
            for part in sorted(self.dir.glob("part-*.npz")):
                try:
                    with np.load(part) as z:
                        self._rows.update(zip(z["sha256"].tolist(), z["features"]))
                except (OSError, ValueError, KeyError) as e:
                    log.warning("ignoring unreadable cache part %s: %s", part.name, e)
                self._parts += 1

    def __contains__(self, digest: str) -> bool:
        return digest in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, digest: str) -> np.ndarray:
        return self._rows[digest]

    def add(self, digests: Sequence[str], features: np.ndarray) -> None:
        """Store one part durably (temp file + rename), then serve its rows."""
        if not digests:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        out = self.dir / f"part-{self._parts:05d}-{os.getpid()}-{time.time_ns()}.npz"
        with publishing(out) as tmp, open(tmp, "wb") as f:
            np.savez(f, sha256=np.array(digests), features=features.astype(np.float32))
        self._parts += 1
        self._rows.update(zip(digests, features.astype(np.float32)))


def file_digests(refs: Sequence[ImageRef]) -> list[str]:
    """sha256 of each file's bytes (TaggerError naming the first unreadable file)."""
    out = []
    for ref in refs:
        try:
            out.append(sha256_file(ref.abspath))
        except OSError as e:
            raise TaggerError(f"cannot read {ref.abspath}: {e.strerror or e}") from None
    return out


def embed(
    refs: Sequence[ImageRef],
    digests: Sequence[str],
    model: Path,
    cache_root: Path,
    batch_size: int = 64,
    workers: int | None = None,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Raw pooled features float32 [len(refs), D] of each ref, and a bool [len(refs)] mask of those that decoded.

    Only files whose digest is not yet cached for this model go through the serving path (decode workers,
    batching, the ORT session), each distinct content once. Returns counts: cached, embedded, failed.
    """
    model_sha = model_sha256(model)
    cache = FeatureCache(cache_root, model_sha)
    todo: dict[str, ImageRef] = {}
    for ref, digest in zip(refs, digests):
        if digest not in cache and digest not in todo:
            todo[digest] = ref
    failed: set[str] = set()
    if todo:
        failed = _embed_missing(list(todo.values()), model, cache, batch_size, workers, threads)
    ok = np.array([d in cache for d in digests], dtype=bool)
    if not ok.any():
        raise TaggerError("no image could be embedded")
    dim = len(cache.get(digests[int(np.flatnonzero(ok)[0])]))
    features = np.zeros((len(refs), dim), np.float32)
    for i in np.flatnonzero(ok).tolist():
        features[i] = cache.get(digests[i])
    counts = {"cached": len(set(digests)) - len(todo), "embedded": len(todo) - len(failed), "failed": len(failed)}
    return features, ok, counts


def _embed_missing(
    refs: list[ImageRef], model: Path, cache: FeatureCache, batch_size: int, workers: int | None, threads: int | None
) -> set[str]:
    """Embed `refs` into the cache; returns the digests of those that failed to decode."""
    onnx = onnx_module()
    info = read_model_metadata(model)
    cache.dir.mkdir(parents=True, exist_ok=True)
    graph = cache.dir / "features.onnx"  # the base model plus its features as an output
    if not graph.is_file():
        with publishing(graph) as tmp:
            onnx.save(with_features_output(onnx.load(str(model))), str(tmp))
    session = open_session(graph, "cpu", threads)
    log.info("embedding %d images with %s (cache %s)", len(refs), model.name, cache.dir)
    pending_d: list[str] = []
    pending_f: list[np.ndarray] = []
    failed: set[str] = set()
    done, t0 = 0, time.perf_counter()
    for batch in decoded_batches(refs, info.preprocess, batch_size, workers):
        samples = [r for r in batch.results if isinstance(r, Sample)]
        for r in batch.results:
            if not isinstance(r, Sample):
                failed.add(str(r.sha256))
                log.warning("%s did not decode: %s", refs[r.index].path, r.error)
        if samples:
            (features,) = session.outputs(batch.images, [FEATURES_OUTPUT])  # [k, D]
            pending_d.extend(str(s.sha256) for s in samples)
            pending_f.append(np.asarray(features, np.float32))
        done += len(batch.refs)
        if len(pending_d) >= PART_IMAGES:
            cache.add(pending_d, np.concatenate(pending_f))
            pending_d, pending_f = [], []
            log.info("embedded %d/%d images (%.0f img/s)", done, len(refs), done / (time.perf_counter() - t0))
    cache.add(pending_d, np.concatenate(pending_f) if pending_f else np.zeros((0, 0), np.float32))
    return failed


__all__ = ["FeatureCache", "default_cache_dir", "embed", "file_digests"]
