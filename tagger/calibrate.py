"""Temperature scaling: refit how confident a model's scores are, on labelled photos; its top-1 labels never change."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from tagger.storage import check_destination, publish, reserve_temp
from tagger.contract import META_MODEL, output_name
from tagger.errors import TaggerError
from tagger.evaluate import LabelledFolder, load_labelled_folder, resolve_tasks, truth_indices
from tagger.metrics import IGNORE, calibration_error
from tagger.model.info import read_model_metadata
from tagger.pipeline.decode import Failure
from tagger.pipeline.compose import decoded_batches
from tagger.model.registry import derived_model_path
from tagger.pipeline.session import Session, default_batch_size, open_session

log = logging.getLogger(__name__)

MIN_IMAGES = 50  # labelled photos per task; one parameter needs few, but fewer says little
TEMPERATURE_PREFIX = "tagger_temperature_"  # initializer holding a task's temperature, so a refit updates it in place
CHECK_IMAGES = 64
UNDERFLOW = 1e-30  # float32 probabilities below this are taken as 1e-30: their logarithm is unreliable
_BETA_RANGE = (0.05, 20.0)  # 1 / temperature searched; the negative log-likelihood is convex in it


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
    tasks = resolve_tasks(session.tasks, task_columns, folder.columns, folder.csv_path)
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
                nll_before=_nll(p, y),
                nll_after=_nll(scaled, y),
            )
        )
        temperatures[task.name] = temperature

    tmp = reserve_temp(out_path)
    try:
        _write_rescaled(source, tmp, temperatures, folder.root.name, fits)
        read_model_metadata(tmp)  # the contract survived
        _check(source, tmp, sample, temperatures)
        publish(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    report = CalibrationReport(out_path, tuple(fits), time.perf_counter() - t0)
    log.debug("%s", report.summary())
    return report


def rescale(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(probs) / temperature): what the rescaled graph outputs, from the original's probabilities."""
    logits = np.log(np.clip(probs.astype(np.float64), UNDERFLOW, None)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the mean negative log-likelihood of `labels` (int [N]) under rescaled `probs`."""
    log_p = np.log(np.clip(probs.astype(np.float64), UNDERFLOW, None))  # [N, C]
    true = log_p[np.arange(len(labels)), labels]  # [N]

    def nll(beta: float) -> float:
        z = beta * log_p
        top = z.max(axis=1)
        return float(np.mean(top + np.log(np.exp(z - top[:, None]).sum(axis=1)) - beta * true))

    lo, hi = np.log(_BETA_RANGE[0]), np.log(_BETA_RANGE[1])  # golden-section search on log(beta)
    g = (np.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(np.exp(a)), nll(np.exp(b))
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(np.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(np.exp(b))
    return float(1.0 / np.exp((lo + hi) / 2))


def _nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], UNDERFLOW, None)).mean())


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


def set_temperatures(graph: Any, temperatures: Mapping[str, float], where: str) -> None:
    """Make each task's softmax divide its input by the given temperature, in an onnx GraphProto.

    The temperature lives in an initializer named TEMPERATURE_PREFIX + task: set in place when the graph has one
    (from the exporter or an earlier fit), else added with a Div in front of the softmax.
    """
    import onnx
    from onnx import numpy_helper

    producers = {out: node for node in graph.node for out in node.output}
    inits = {init.name: init for init in graph.initializer}
    for task, temperature in temperatures.items():
        softmax = producers.get(output_name(task))
        if softmax is None or softmax.op_type != "Softmax":
            raise TaggerError(f"{where}: output {output_name(task)} does not come from a Softmax; cannot rescale it")
        name = TEMPERATURE_PREFIX + task
        value = numpy_helper.from_array(np.array(temperature, np.float32), name)
        if name in inits:
            inits[name].CopyFrom(value)
            continue
        graph.initializer.append(value)
        scaled = f"{softmax.input[0]}_over_temperature"
        div = onnx.helper.make_node("Div", [softmax.input[0], name], [scaled], name=f"{name}_div")
        graph.node.insert(list(graph.node).index(softmax), div)  # keep the topological order
        softmax.input[0] = scaled


def _write_rescaled(
    source: Path, target: Path, temperatures: dict[str, float], data_name: str, fits: list[TaskCalibration]
) -> None:
    """The source model with each task's temperature multiplied by this fit's, and the fit recorded."""
    try:
        import onnx
    except ImportError as e:
        raise TaggerError(f"calibration needs the onnx package ({e}): pip install 'tagger[onnx]'") from None

    proto = onnx.load(str(source))
    model: dict[str, Any] = json.loads({p.key: p.value for p in proto.metadata_props}[META_MODEL])
    totals = {str(k): float(v) for k, v in (model.get("temperature") or {}).items()}
    totals.update({task: totals.get(task, 1.0) * temperature for task, temperature in temperatures.items()})
    set_temperatures(proto.graph, {task: totals[task] for task in temperatures}, str(source))
    model["temperature"] = totals
    model["calibration"] = {
        "data": data_name,
        "tasks": {f.task: {"images": f.images, "error_before": f.error_before, "error_after": f.error_after} for f in fits},
    }
    props = {p.key: p.value for p in proto.metadata_props}
    onnx.helper.set_model_props(proto, {**props, META_MODEL: json.dumps(model)})
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
