"""Read and validate a tagger ONNX model's contract (labels, preprocessing, provenance); torch-free and onnx-free."""

from __future__ import annotations

import json
import logging
import os
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping

from tagger.contract import (
    DEFAULT_TASKS,
    EMBEDDING_OUTPUT,
    FORMAT_VERSION,
    INPUT_NAME,
    META_FORMAT,
    META_MODEL,
    META_PREPROCESS,
    META_TASKS,
    META_VERSION,
    PreprocessSpec,
    TaskSpec,
    check_task_names,
    tasks_from_json,
)
from tagger.errors import TaggerError
from tagger.model.external import model_sha256

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger(__name__)

_REQUIRED_KEYS = (META_FORMAT, META_VERSION, META_TASKS, META_PREPROCESS, META_MODEL)


@dataclass(frozen=True)
class ModelInfo:
    """Everything a tagger ONNX file says about itself, validated against its actual inputs and outputs."""

    path: Path
    sha256: str  # model_sha256: of the .onnx file, and of its external data files if it has any
    format: int
    version: str  # tagger version that exported the file
    tasks: tuple[TaskSpec, ...]  # in output order
    preprocess: PreprocessSpec
    model: Mapping[str, Any]  # backbone, checkpoint_sha256, metrics, data, epoch, precision, opset, exporter
    embedding_dim: int | None = None  # D of the optional `embedding` output [N, D]; None: the model has none

    @property
    def precision(self) -> str:
        return str(self.model.get("precision", "fp32"))

    @property
    def backbone(self) -> str:
        return str(self.model.get("backbone", "?"))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form (what `tagger info --json` prints)."""
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "format": self.format,
            "version": self.version,
            "tasks": {t.name: list(t.labels) for t in self.tasks},
            "preprocess": self.preprocess.to_dict(),
            "model": dict(self.model),
            "embedding_dim": self.embedding_dim,
        }


def task_columns(info: ModelInfo) -> dict[str, str]:
    """Task -> the styles.csv column it was trained from: as the model records it (`columns`), else, for models from
    before that record, the default tasks' columns."""
    out = {t.name: DEFAULT_TASKS[t.name] for t in info.tasks if t.name in DEFAULT_TASKS}
    recorded = info.model.get("columns")
    if isinstance(recorded, dict):
        out.update({str(k): str(v) for k, v in recorded.items() if k in {t.name for t in info.tasks}})
    return out


def ort_errors() -> tuple[type[BaseException], ...]:
    """onnxruntime's own exception types, to catch exactly them."""
    # onnxruntime's errors (InvalidProtobuf, InvalidGraph, Fail, ...) derive straight from Exception.
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = (
        "Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NoModel", "NotImplemented",
        "RuntimeException",
    )
    return tuple(getattr(state, n) for n in names if hasattr(state, n)) + (RuntimeError,)


def read_model_metadata(path: str | os.PathLike[str]) -> ModelInfo:
    """Open `path` with ONNX Runtime on CPU (no graph optimisation, just parsing) and validate its tagger contract.

    Raises TaggerError for a missing or non-ONNX file, a missing tagger.* key, a format other than FORMAT_VERSION,
    or inputs/outputs that disagree with the metadata.
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise TaggerError(f"model {path} is not a file")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3  # parse failures are reported by our TaggerError, not ORT's stderr log
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except ort_errors() as e:
        # "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from X failed:Protobuf parsing failed." -> the tail
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reason = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : (Load model from .* failed: ?)?", "", text)
        if re.match(r"^\S+\.cc:\d+ ", reason) and ") " in reason:  # "<file.cc:256> <C++ signature>) <message>"
            reason = reason.rsplit(") ", 1)[1]
        raise TaggerError(f"{path} is not a loadable ONNX model: {reason}") from None
    return model_info_from_session(session, path)


def model_info_from_session(session: "ort.InferenceSession", path: str | os.PathLike[str]) -> ModelInfo:
    """Validate the tagger contract of an already open session (lets the runtime avoid loading the model twice)."""
    path = Path(path)
    meta = session.get_modelmeta().custom_metadata_map
    missing = [k for k in _REQUIRED_KEYS if k not in meta]
    if missing:
        raise TaggerError(
            f"{path} is not a tagger model: metadata {', '.join(missing)} missing (export it with `tagger export`)"
        )
    fmt = _json(path, meta, META_FORMAT)
    if type(fmt) is not int or fmt != FORMAT_VERSION:
        raise TaggerError(
            f"{path} has tagger model format {fmt!r}; this tagger reads format {FORMAT_VERSION} "
            "(re-export the checkpoint with this version's `tagger export`)"
        )
    raw_tasks, raw_preprocess, model = (_json(path, meta, k) for k in (META_TASKS, META_PREPROCESS, META_MODEL))
    if not isinstance(model, dict):
        raise TaggerError(f"{path} has malformed tagger metadata: {META_MODEL} is not a JSON object")
    if (
        not isinstance(raw_tasks, dict)
        or not raw_tasks
        or not all(isinstance(labels, list) and labels for labels in raw_tasks.values())
    ):
        raise TaggerError(f"{path} has malformed tagger metadata: {META_TASKS} must map each task to its labels")
    tasks = tasks_from_json(meta[META_TASKS])
    try:
        check_task_names(t.name for t in tasks)
    except ValueError as e:
        raise TaggerError(f"{path} has unusable tagger metadata: {e}") from None
    try:
        preprocess = PreprocessSpec.from_dict(raw_preprocess)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise TaggerError(f"{path} has malformed tagger metadata: {META_PREPROCESS}: {type(e).__name__}: {e}") from None
    _check_signature(session, path, tasks, preprocess)
    return ModelInfo(
        path=path,
        sha256=model_sha256(path),
        format=fmt,
        version=str(_json(path, meta, META_VERSION)),
        tasks=tasks,
        preprocess=preprocess,
        model=MappingProxyType(model),
        embedding_dim=_embedding_dim(session, path),
    )


def _json(path: Path, meta: Mapping[str, str], key: str) -> Any:
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise TaggerError(f"{path} has malformed tagger metadata: {key} is not JSON ({e.msg})") from None


def _check_signature(
    session: "ort.InferenceSession", path: Path, tasks: tuple[TaskSpec, ...], preprocess: PreprocessSpec
) -> None:
    """The graph must take uint8 [N, size, size, 3] `images` and give float [N, C_task] `<task>_probs`."""
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        raise TaggerError(f"{path} must have one input named {INPUT_NAME!r}, has {[i.name for i in inputs]}")
    shape = list(inputs[0].shape)
    size = preprocess.size
    if inputs[0].type != "tensor(uint8)" or len(shape) != 4 or shape[1:] != [size, size, 3]:
        raise TaggerError(
            f"{path} input {INPUT_NAME!r} is {inputs[0].type} {shape}; the contract wants tensor(uint8) "
            f"[N, {size}, {size}, 3]"
        )
    if isinstance(shape[0], int):  # a symbolic axis is a name (or None); a number fixes every call's batch size
        raise TaggerError(
            f"{path} has a fixed batch size of {shape[0]} (input {INPUT_NAME!r} is {shape}); the contract wants a "
            "symbolic batch axis N: export the model again with a dynamic batch (tagger export does)"
        )
    outputs = {o.name: o for o in session.get_outputs()}
    for task in tasks:
        out = outputs.get(task.output)
        if out is None:
            raise TaggerError(f"{path} has no output {task.output!r} for task {task.name!r}")
        dims = list(out.shape)
        if out.type != "tensor(float)" or len(dims) != 2 or dims[1] != len(task.labels):
            raise TaggerError(
                f"{path} output {task.output!r} is {out.type} {dims}; the contract wants tensor(float) "
                f"[N, {len(task.labels)}] for its {len(task.labels)} labels"
            )


def _embedding_dim(session: "ort.InferenceSession", path: Path) -> int | None:
    """D of the optional `embedding` output, which must be float [N, D] with a fixed D; None without one."""
    out = next((o for o in session.get_outputs() if o.name == EMBEDDING_OUTPUT), None)
    if out is None:
        return None
    dims = list(out.shape)
    if out.type != "tensor(float)" or len(dims) != 2 or not isinstance(dims[1], int) or dims[1] < 1:
        raise TaggerError(
            f"{path} output {EMBEDDING_OUTPUT!r} is {out.type} {dims}; the contract wants tensor(float) [N, D]"
        )
    return int(dims[1])


def describe(info: ModelInfo, max_labels: int = 12) -> str:
    """Human-readable summary for `tagger info`; lists at most `max_labels` labels per task (0: all)."""
    m = info.model
    p = info.preprocess
    size_mb = info.path.stat().st_size / 1e6
    lines = [
        f"model       {info.path} ({size_mb:.1f} MB)",
        f"sha256      {info.sha256}",
        f"format      {info.format} (exported by tagger {info.version})",
        f"backbone    {info.backbone}, {info.precision}, opset {m.get('opset', '?')}",
        f"input       {INPUT_NAME}: uint8 [N, {p.size}, {p.size}, 3] RGB",
        f"embedding   {EMBEDDING_OUTPUT}: float [N, {info.embedding_dim}], L2-normalised (tagger run --embeddings)"
        if info.embedding_dim
        else "embedding   none (`tagger run --embeddings` needs a model with it, e.g. from `tagger export`)",
        f"preprocess  fit inside {p.size}x{p.size} ({p.interpolation}), pad with {list(p.pad_color)}, "
        f"mean {list(p.mean)}, std {list(p.std)}",
        f"checkpoint  {m.get('checkpoint', '?')} sha256 {m.get('checkpoint_sha256', '?')}, epoch {m.get('epoch', '?')}",
    ]
    if m.get("data") is not None:
        lines.append(f"trained on  {json.dumps(m['data'])}")
    metrics = m.get("metrics") or {}
    if metrics:
        lines.append("metrics     " + ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))
    temperature = m.get("temperature")
    if isinstance(temperature, dict):
        fitted = (m.get("calibration") or {}).get("data", "?")
        per_task = ", ".join(f"{k} {_fmt(v)}" for k, v in temperature.items())
        lines.append(f"calibrated  temperature {per_task} (softmax input divided by it; last fitted on {fitted})")
    quantization = m.get("quantization")
    if isinstance(quantization, dict):
        lines.append(
            f"quantized   {quantization.get('method', '?')}; calibrated on {quantization.get('calibration_images', '?')} "
            f"photos; from the model with sha256 {quantization.get('source_sha256', '?')} (metrics above are its own)"
        )
    lines.append("tasks")
    for t in info.tasks:
        shown = t.labels if max_labels <= 0 else t.labels[:max_labels]
        more = len(t.labels) - len(shown)
        text = ", ".join(shown) + (f", ... (+{more} more)" if more else "")
        head = f"  {t.output} [{len(t.labels)}]: "
        lines.append(textwrap.fill(text, width=100, initial_indent=head, subsequent_indent=" " * 6))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)
