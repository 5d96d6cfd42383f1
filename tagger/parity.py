"""ONNX Runtime against PyTorch fp32 on the same pixels: the check an exported model passes before it is written."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from tagger.contract import EMBEDDING_OUTPUT, INPUT_NAME
from tagger.errors import TaggerError, one_line
from tagger.model.info import ort_errors
from tagger.train.checkpoint import LoadedCheckpoint

log = logging.getLogger(__name__)

FP32_ATOL = 1e-4  # max |p_onnx - p_torch| for the fp32 model
FP16_MIN_TOP1 = 0.99  # fraction of check images whose top-1 class the fp16 model must keep, per task
# Least cosine between ONNX's and PyTorch fp32's embedding of any check image.
EMBEDDING_MIN_COSINE = {"fp32": 0.9999, "fp16": 0.99}
# A top-1 flip between two classes whose reference probabilities are closer than this is a coin toss at that
# precision, not an export error; it is logged and reported but does not fail the check. fp16 rounding of the
# backbone weights alone moves probabilities by ~1e-2 on EfficientNet-Lite0.
TIE_MARGIN = {"fp32": 1e-6, "fp16": 1e-2}
CHUNK = 32  # images per PyTorch / ONNX Runtime call, to bound memory


def checkpoint_temperatures(ckpt: LoadedCheckpoint) -> dict[str, float]:
    """Task -> the temperature the trainer fitted on validation (none in checkpoints from before it did)."""
    return {str(k): float(v) for k, v in (ckpt.raw.get("temperature") or {}).items()}


def torch_reference(ckpt: LoadedCheckpoint, images: np.ndarray) -> dict[str, np.ndarray]:
    """Reference: the contract's preprocessing written out independently, then the fp32 model and its temperatures;
    under EMBEDDING_OUTPUT (no task's name), the features L2-normalised in float64."""
    spec = ckpt.preprocess
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
    chunks: dict[str, list[np.ndarray]] = {t.name: [] for t in ckpt.tasks}
    chunks[EMBEDDING_OUTPUT] = []
    temperature = checkpoint_temperatures(ckpt)
    with torch.inference_mode():
        for i in range(0, len(images), CHUNK):
            x = torch.from_numpy(images[i : i + CHUNK]).permute(0, 3, 1, 2).float() / 255  # [n, 3, S, S]
            x = (x - mean) / std
            logits = ckpt.model(x)
            for t in ckpt.tasks:
                chunks[t.name].append(torch.softmax(logits[t.name] / temperature.get(t.name, 1.0), dim=1).numpy())
            features = ckpt.model.features(x).double().numpy()  # [n, F]
            chunks[EMBEDDING_OUTPUT].append(features / np.linalg.norm(features, axis=1, keepdims=True))
    return {name: np.concatenate(parts) for name, parts in chunks.items()}


def check_parity(
    path: Path, ckpt: LoadedCheckpoint, images: np.ndarray, precision: str
) -> tuple[dict[str, float], dict[str, float], tuple[int, ...], float]:
    """Run the written file in ONNX Runtime (CPU) at several batch sizes and compare with PyTorch fp32; returns
    per task max |diff| and top-1 agreement, the batch sizes, and the embedding's least cosine."""
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except ort_errors() as e:
        raise TaggerError(f"onnxruntime cannot load the exported model: {one_line(e)}") from None
    reference = torch_reference(ckpt, images)
    k = len(images)
    # (start, size): batch 1 and 7, then every image in chunks (the last one usually of yet another size)
    runs = [(0, 1), (0, 7)] + [(i, min(CHUNK, k - i)) for i in range(0, k, CHUNK)]
    diffs = {t.name: 0.0 for t in ckpt.tasks}
    full: dict[str, list[np.ndarray]] = {t.name: [] for t in ckpt.tasks}
    cosine = 1.0
    for run_index, (start, n) in enumerate(runs):
        try:
            *outputs, embedding = session.run(
                [t.output for t in ckpt.tasks] + [EMBEDDING_OUTPUT], {INPUT_NAME: images[start : start + n]}
            )
        except ort_errors() as e:
            raise TaggerError(f"onnxruntime fails on a batch of {n}: {one_line(e)}") from None
        cosine = min(cosine, _embedding_cosine(embedding, reference[EMBEDDING_OUTPUT][start : start + n], n))
        for task, got in zip(ckpt.tasks, outputs):
            want = reference[task.name][start : start + n]
            if got.shape != want.shape or got.dtype != np.float32:
                raise TaggerError(
                    f"{task.output} at batch {n} is {got.dtype} {list(got.shape)}, expected float32 {list(want.shape)}"
                )
            if not np.isfinite(got).all():
                raise TaggerError(f"{task.output} at batch {n} contains NaN or inf")
            diffs[task.name] = max(diffs[task.name], float(np.abs(got.astype(np.float64) - want).max()))
            if run_index >= 2:
                full[task.name].append(got)
    batch_sizes = tuple(sorted({n for _, n in runs}))
    log.info("%s %s parity: least cosine %.6f over %d images", EMBEDDING_OUTPUT, precision, cosine, k)
    if cosine < EMBEDDING_MIN_COSINE[precision]:
        raise TaggerError(
            f"ONNX and PyTorch disagree on {EMBEDDING_OUTPUT}: cosine {cosine:.6f} < {EMBEDDING_MIN_COSINE[precision]}"
        )

    agreement: dict[str, float] = {}
    for task in ckpt.tasks:
        got, want = np.concatenate(full[task.name]), reference[task.name]  # [K, C]
        top2 = np.sort(want, axis=1)[:, -2:]  # [K, 2] (or [K, 1] for a one-label task, which cannot flip)
        tie = (top2[:, -1] - top2[:, 0]) < TIE_MARGIN[precision] if want.shape[1] > 1 else np.zeros(k, bool)
        same = got.argmax(axis=1) == want.argmax(axis=1)  # [K]
        agreement[task.name] = float(same.mean())
        if (~same & tie).any():
            log.info("%s: %d top-1 flips between near-tied classes", task.output, int((~same & tie).sum()))
        real_flips = int((~same & ~tie).sum())
        log.info(
            "%s %s parity: max|diff| %.3g, top-1 agreement %.2f%% over %d images",
            task.output, precision, diffs[task.name], 100 * agreement[task.name], k,
        )
        if precision == "fp32":
            if diffs[task.name] >= FP32_ATOL:
                raise TaggerError(
                    f"ONNX and PyTorch disagree on {task.output}: max |diff| {diffs[task.name]:.3g} >= {FP32_ATOL}"
                )
            if real_flips:
                raise TaggerError(f"ONNX changes the top-1 {task.name} of {real_flips} of {k} check images")
        elif k - real_flips < FP16_MIN_TOP1 * k - 1e-9:
            raise TaggerError(
                f"fp16 model changes the top-1 {task.name} of {real_flips} of {k} check images (at most "
                f"{1 - FP16_MIN_TOP1:.0%} allowed); max |diff| {diffs[task.name]:.3g}; export fp32 instead"
            )
    return diffs, agreement, batch_sizes, cosine


def _embedding_cosine(got: np.ndarray, want: np.ndarray, n: int) -> float:
    """Least cosine between ONNX's embeddings `got` and the unit-norm reference `want`, after checking that `got`
    is float32 [n, F] and L2-normalised."""
    if got.shape != want.shape or got.dtype != np.float32:
        raise TaggerError(
            f"{EMBEDDING_OUTPUT} at batch {n} is {got.dtype} {list(got.shape)}, expected float32 {list(want.shape)}"
        )
    norms = np.linalg.norm(got.astype(np.float64), axis=1)  # [n]
    if not np.isfinite(got).all() or np.abs(norms - 1).max() > 1e-3:
        raise TaggerError(f"{EMBEDDING_OUTPUT} at batch {n} is not L2-normalised (norms {norms.min():.4g}..{norms.max():.4g})")
    return float((got.astype(np.float64) * want).sum(axis=1).min())
