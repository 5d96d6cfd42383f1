"""Temperature scaling: refit how confident a model's scores are, on labelled photos; its top-1 labels never change."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tagger.errors import TaggerError
from tagger.evaluate import resolve_tasks, truth_indices
from tagger.guards import check_destination
from tagger.labelled import LabelledFolder, load_labelled_folder
from tagger.metrics import IGNORE, calibration_error
from tagger.model.edit import model_metadata, set_model_metadata, set_temperatures
from tagger.model.info import read_model_metadata, task_columns as recorded_columns
from tagger.model.registry import derived_model_path
from tagger.compose import decoded_batches
from tagger.pipeline.decode import Failure
from tagger.pipeline.session import Session, default_batch_size, open_session
from tagger.storage import publishing
from tagger.temperature import UNDERFLOW, fit_temperature, mean_nll, rescale

log = logging.getLogger(__name__)

MIN_IMAGES = 50  # labelled photos per task; one parameter needs few, but fewer says little
CHECK_IMAGES = 64


@dataclass(frozen=True)
class TaskCalibration:
    """One task's fit: the temperature applied and the calibration before and after, on the fitting photos."""

    task: str
    temperature: float  # this fit's factor; the model records the product with any earlier one
    images: int
    error_before: float  # calibration error of the top-1 score (tagger.metrics.calibration_error)
    error_after: float
    nll_before: float  # mean negative log-likelihood of the true label
    nll_after: float


@dataclass(frozen=True)
class CalibrationReport:
    path: Path
    tasks: tuple[TaskCalibration, ...]
    seconds: float

    def summary(self) -> str:
        per_task = "; ".join(
            f"{t.task}: temperature {t.temperature:.3f} on {t.images} photos, calibration error {t.error_before:.3f} -> "
            f"{t.error_after:.3f}, NLL {t.nll_before:.3f} -> {t.nll_after:.3f}"
            for t in self.tasks
        )
        return f"wrote {self.path}; {per_task}; {self.seconds:.0f} s"


def calibrate_model(
    model: str | os.PathLike[str] | None,
    data: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    task_columns: Sequence[tuple[str, str]] = (),
    device: str = "auto",
    workers: int | None = None,
    threads: int | None = None,
) -> CalibrationReport:
    """Fit one temperature per task on a labelled folder (styles.csv + images/<id>.jpg) and write the rescaled model.

    Each task's softmax input is divided by its temperature inside the graph, which makes the scores match how often
    the top-1 label is right on these photos without changing any top-1 label. Fit on photos the model did not
    train on, like the catalog's. On any failure nothing is left at `out`.
    """
    t0 = time.perf_counter()
    folder = load_labelled_folder(Path(data))
    session = open_session(model, device, threads)
    source = session.path
    out_path = Path(out) if out is not None else derived_model_path(model, source, ".calibrated.onnx")
    check_destination(out_path, source)
    tasks = resolve_tasks(session.tasks, task_columns, folder, recorded_columns(session.info))
    probs, ok, sample = _predict(session, folder, workers)

    fits, temperatures = [], {}
    for task, column in tasks:
        y = truth_indices(task, folder.truth(column))[ok]  # [n_ok], IGNORE where unknown or empty
        known = y != IGNORE
        if known.sum() < MIN_IMAGES:
            raise TaggerError(
                f"task {task.name}: {int(known.sum())} decoded photos carry a label the model knows in column "
                f"{column!r}; calibration needs at least {MIN_IMAGES}"
            )
        p, y = probs[task.name][known], y[known]
        temperature = fit_temperature(p, y)
        scaled = rescale(p, temperature)
        fits.append(
            TaskCalibration(
                task=task.name,
                temperature=temperature,
                images=len(y),
                error_before=calibration_error(p.max(1), p.argmax(1) == y),
                error_after=calibration_error(scaled.max(1), scaled.argmax(1) == y),
                nll_before=mean_nll(p, y),
                nll_after=mean_nll(scaled, y),
            )
        )
        temperatures[task.name] = temperature

    with publishing(out_path) as tmp:
        _write_rescaled(source, tmp, temperatures, folder.root.name, fits)
        read_model_metadata(tmp)  # the contract survived
        _check(source, tmp, sample, temperatures)
    report = CalibrationReport(out_path, tuple(fits), time.perf_counter() - t0)
    log.debug("%s", report.summary())
    return report


def _predict(
    session: Session, folder: LabelledFolder, workers: int | None
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Every task's probabilities for the decoded photos (float [n_ok, C]), which refs decoded (bool [M]), and a
    copy of the first decoded photos (uint8 [<= CHECK_IMAGES, S, S, 3]) to check the written model on."""
    parts: dict[str, list[np.ndarray]] = {t.name: [] for t in session.tasks}
    ok: list[bool] = []
    sample: list[np.ndarray] = []
    batch_size = default_batch_size(session.provider)
    with contextlib.closing(decoded_batches(folder.refs, session.spec, batch_size, workers)) as batches:
        for batch in batches:
            ok += [not isinstance(r, Failure) for r in batch.results]
            if sum(len(s) for s in sample) < CHECK_IMAGES:
                sample.append(batch.images[:CHECK_IMAGES].copy())  # batch buffers are reused
            for name, p in session.predict(batch.images).items():
                parts[name].append(p)
    if not any(ok):
        raise TaggerError(f"no image of {folder.root / 'images'} could be decoded")
    if not all(ok):
        log.warning("%d of %d images did not decode and were left out", ok.count(False), len(ok))
    probs = {name: np.concatenate(p) for name, p in parts.items()}
    return probs, np.array(ok), np.concatenate(sample)[:CHECK_IMAGES]


def _write_rescaled(
    source: Path, target: Path, temperatures: dict[str, float], data_name: str, fits: list[TaskCalibration]
) -> None:
    """The source model with each task's temperature multiplied by this fit's, and the fit recorded."""
    try:
        import onnx
    except ImportError as e:
        raise TaggerError(f"calibration needs the onnx package ({e}): pip install 'tagger[onnx]'") from None

    proto = onnx.load(str(source))
    model: dict[str, Any] = model_metadata(proto)
    totals = {str(k): float(v) for k, v in (model.get("temperature") or {}).items()}
    totals.update({task: totals.get(task, 1.0) * temperature for task, temperature in temperatures.items()})
    set_temperatures(proto.graph, {task: totals[task] for task in temperatures}, str(source))
    model["temperature"] = totals
    model["calibration"] = {
        "data": data_name,
        "tasks": {f.task: {"images": f.images, "error_before": f.error_before, "error_after": f.error_after} for f in fits},
    }
    set_model_metadata(proto, model)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(target))


def _check(source: Path, rescaled: Path, images: np.ndarray, temperatures: dict[str, float]) -> None:
    """The written model must output the original's rescaled probabilities, both on CPU, on a few real photos."""
    new = open_session(rescaled, "cpu").predict(images)
    old = open_session(source, "cpu").predict(images)
    for task, temperature in temperatures.items():
        # Rows where a float32 probability underflowed carry no log-probability to rescale from; skip those.
        exact = (old[task] >= UNDERFLOW).all(axis=1)
        gap = float(np.abs(new[task][exact] - rescale(old[task][exact], temperature)).max(initial=0.0))
        if gap > 1e-4 or not np.array_equal(new[task].argmax(1), old[task].argmax(1)):
            raise TaggerError(f"rescaled model differs from the expected scores on task {task} (max |diff| {gap:.2e})")
