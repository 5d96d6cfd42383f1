"""Post-training int8 quantization of an exported model, calibrated on real photos and checked against the original."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from tagger.guards import check_destination
from tagger.storage import publishing
from tagger.contract import INPUT_NAME
from tagger.errors import TaggerError
from tagger.model.edit import set_model_metadata
from tagger.model.info import ModelInfo, ort_errors, read_model_metadata
from tagger.compose import decoded_batches
from tagger.pipeline.discover import ImageRef, discover
from tagger.model.registry import derived_model_path, resolve_model
from tagger.pipeline.session import open_session, ort_log_severity

log = logging.getLogger(__name__)

DEFAULT_IMAGES = 512
DEFAULT_MIN_AGREEMENT = 0.95
CHECK_EVERY = 4  # every 4th sampled photo is held out of calibration to check the result on
CALIBRATION_BATCH = 32
MIN_IMAGES = 48  # 36 to calibrate, 12 to check: fewer says little about either
# Convolutions, the heads, and the Add/Clip between them, so activations stay int8 from block to block; the
# normalisation in front and the softmax behind stay float.
QUANTIZED_OPS = ("Conv", "Gemm", "Add", "Clip")
METHOD = "static int8 QDQ: per-channel symmetric int8 weights, uint8 activations, MinMax calibration"


@dataclass(frozen=True)
class QuantizeReport:
    """What was written, and how often the int8 model's top-1 matched the original on held-out photos."""

    path: Path
    size_bytes: int
    source_size_bytes: int
    calibration_images: int
    check_images: int
    skipped_images: int  # sampled files that did not decode
    top1_agreement: Mapping[str, float]  # task -> fraction of check photos with the same top-1 label
    seconds: float

    def summary(self) -> str:
        agreement = ", ".join(f"{t} {a:.1%}" for t, a in self.top1_agreement.items())
        return (
            f"wrote {self.path} ({self.size_bytes / 1e6:.1f} MB, int8, from {self.source_size_bytes / 1e6:.1f} MB); "
            f"calibrated on {self.calibration_images} photos, top-1 agreement with the original on "
            f"{self.check_images} others: {agreement}; {self.seconds:.0f} s"
        )


def quantize_model(
    model: str | os.PathLike[str],
    images: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    n_images: int = DEFAULT_IMAGES,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    seed: int = 0,
) -> QuantizeReport:
    """Quantize an exported fp32 model to int8 for CPUs; on any failure nothing is left at `out`.

    images: a folder of photos like the ones the model will tag (a few hundred suffice). A seeded random sample of
    `n_images` is decoded exactly as `tagger run` decodes; every 4th photo checks the result, the others calibrate
    the activation ranges. Raises TaggerError when any task's top-1 agreement there is below `min_agreement`.
    """
    t0 = time.perf_counter()
    quantization = _quantization_module()
    info = read_model_metadata(resolve_model(model))
    if info.precision != "fp32":
        raise TaggerError(f"{info.path} is {info.precision}; quantize the fp32 model")
    out_path = Path(out) if out is not None else derived_model_path(model, info.path, ".int8.onnx")
    check_destination(out_path, info.path)

    refs = _sample(images, n_images, seed)
    with contextlib.closing(decoded_batches(refs, info.preprocess)) as batches:  # refs is never empty: >= 1 batch
        pixels = np.concatenate([b.images for b in batches])  # uint8 [k, S, S, 3], the runtime's own pixels, in order
    skipped = len(refs) - len(pixels)
    if skipped:
        log.warning("%d of %d sampled files did not decode and were left out", skipped, len(refs))
    if len(pixels) < MIN_IMAGES:
        raise TaggerError(f"{len(pixels)} photos decoded from {images}; quantization needs at least {MIN_IMAGES}")
    check = pixels[::CHECK_EVERY]
    calibration = np.delete(pixels, np.s_[::CHECK_EVERY], axis=0)

    with publishing(out_path) as tmp:
        _quantize(quantization, info.path, tmp, calibration)
        _set_quantization_metadata(tmp, info, len(calibration))
        read_model_metadata(tmp)  # the contract survived
        agreement = _agreement(info.path, tmp, check)
        low = {t: a for t, a in agreement.items() if a < min_agreement}
        if low:
            shown = ", ".join(f"{t} {a:.1%}" for t, a in low.items())
            raise TaggerError(
                f"int8 model agrees with the original on too few photos ({shown}, minimum {min_agreement:.0%}); "
                "nothing written. Calibrate on photos more like the catalog, or keep the fp32 model"
            )

    report = QuantizeReport(
        path=out_path,
        size_bytes=out_path.stat().st_size,
        source_size_bytes=info.path.stat().st_size,
        calibration_images=len(calibration),
        check_images=len(check),
        skipped_images=skipped,
        top1_agreement=agreement,
        seconds=time.perf_counter() - t0,
    )
    log.debug("%s", report.summary())
    return report


def _quantization_module() -> Any:
    """onnxruntime.quantization, which needs the onnx package, or a TaggerError saying how to install it."""
    try:
        from onnxruntime import quantization
    except ImportError as e:
        raise TaggerError(f"quantization needs the onnx package ({e}): pip install 'tagger[onnx]'") from None
    return quantization


def _sample(images: str | os.PathLike[str], n: int, seed: int) -> list[ImageRef]:
    """A seeded uniform sample of n image files under `images`, in discover order (one pass, n refs in memory)."""
    rng = random.Random(seed)
    picked: list[tuple[int, ImageRef]] = []
    for i, ref in enumerate(discover(images)):  # reservoir sampling
        if len(picked) < n:
            picked.append((i, ref))
        else:
            j = rng.randint(0, i)
            if j < n:
                picked[j] = (i, ref)
    if not picked:
        raise TaggerError(f"no image files in {images}")
    return [ref for _, ref in sorted(picked, key=lambda p: p[0])]


def _quantize(quantization: Any, source: Path, target: Path, calibration: np.ndarray) -> None:
    """Shape inference and graph fusion first (ONNX Runtime's recommended pre-processing), then static int8 QDQ."""
    step = CALIBRATION_BATCH
    batches = iter([{INPUT_NAME: calibration[i : i + step]} for i in range(0, len(calibration), step)])

    class Reader(quantization.CalibrationDataReader):  # type: ignore[misc]
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(batches, None)

    try:
        # ort_log_severity: graph clean-up notices are noise; failures still raise.
        with tempfile.TemporaryDirectory(prefix="tagger-quantize-") as work, _quiet_root_info(), ort_log_severity(3):
            prepared = Path(work) / "prepared.onnx"
            # The batch dimension is symbolic; ONNX's own shape inference covers this graph without sympy.
            quantization.shape_inference.quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            quantization.quantize_static(
                str(prepared),
                str(target),
                Reader(),
                quant_format=quantization.QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OPS),
                per_channel=True,
                activation_type=quantization.QuantType.QUInt8,
                weight_type=quantization.QuantType.QInt8,
                calibrate_method=quantization.CalibrationMethod.MinMax,
            )
    except _quantize_errors() as e:
        raise TaggerError(f"cannot quantize {source}: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from None


def _quantize_errors() -> tuple[type[BaseException], ...]:
    """What the quantizer raises for a graph it cannot handle: ONNX Runtime's and onnx's own errors."""
    import onnx

    return (*ort_errors(), onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError)


@contextlib.contextmanager
def _quiet_root_info() -> Iterator[None]:
    """Drop the quantizer's per-tensor INFO lines, which it logs on the root logger; its warnings still show."""

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _set_quantization_metadata(path: Path, source: ModelInfo, n_calibration: int) -> None:
    """Mark the model int8 and record where it came from; the tasks and preprocessing stay as they were."""
    import onnx

    proto = onnx.load(str(path))
    if not any(node.op_type == "DequantizeLinear" for node in proto.graph.node):
        raise TaggerError(f"{source.path} has no {'/'.join(QUANTIZED_OPS)} layer to quantize; keep it as it is")
    model: dict[str, Any] = dict(source.model)
    model["precision"] = "int8"
    model["quantization"] = {
        "method": METHOD,
        "calibration_images": n_calibration,
        "source_sha256": source.sha256,
    }
    set_model_metadata(proto, model)
    onnx.save(proto, str(path))


def _agreement(source: Path, quantized: Path, images: np.ndarray) -> dict[str, float]:
    """Per task, the fraction of `images` where both models pick the same top-1 label (on CPU)."""
    reference = open_session(source, "cpu").predict(images)
    candidate = open_session(quantized, "cpu").predict(images)
    return {t: float(np.mean(reference[t].argmax(1) == candidate[t].argmax(1))) for t in reference}
