"""Export a trainer checkpoint to the self-describing ONNX model the runtime serves, and prove it matches PyTorch.

Exporter: torch.onnx.export(dynamo=True). On torch 2.14 it gives tf_efficientnet_lite0 a clean 111-node graph with a
symbolic batch (dim_param) and the TF-"same" padding folded into static Conv pads. The TorchScript exporter
(dynamo=False, deprecated) yields ~640 nodes for the same model, because it computes that padding from the runtime
shape (Shape/Gather/Ceil/Pad chains).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from tagger._version import __version__
from tagger.contract import (
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
    tasks_to_json,
)
from tagger.errors import TaggerError
from tagger.guards import check_destination
from tagger.model.edit import set_description, set_metadata, set_temperatures, strip_trace_metadata
from tagger.model.info import ModelInfo, read_model_metadata
from tagger.parity import check_parity, checkpoint_temperatures
from tagger.pipeline.decode import Failure, decode_one, fit_and_pad
from tagger.storage import publishing, sha256_file
from tagger.synthetic import generated_photos
from tagger.train.checkpoint import LoadedCheckpoint, load_checkpoint
from tagger.train.model import MultiTaskNet

log = logging.getLogger(__name__)

EXPORTER = "torch.onnx.export(dynamo=True)"
# The dynamo exporter has no translations below opset 18 (it would silently emit 18); 18 loads in every
# onnxruntime this project supports.
MIN_OPSET = 18
DEFAULT_OPSET = 18
BATCH_DIM = "N"
N_GENERATED = 100  # generated check photos: enough that the fp16 99% bar tolerates one close call


@dataclass(frozen=True)
class ExportReport:
    """What was written and how closely ONNX Runtime (CPU) reproduced PyTorch fp32 on the check images."""

    path: Path
    size_bytes: int
    sha256: str
    precision: str  # fp32 | fp16
    opset: int
    exporter: str
    n_check_images: int
    batch_sizes: tuple[int, ...]  # batch sizes run through ONNX Runtime
    max_abs_diff: Mapping[str, float] = field(default_factory=dict)  # task -> max |p_onnx - p_torch|
    top1_agreement: Mapping[str, float] = field(default_factory=dict)  # task -> fraction of images with equal top-1
    info: ModelInfo | None = None  # the metadata as the runtime reads it back
    embedding_min_cosine: float = 0.0  # least cosine between ONNX's and PyTorch fp32's embedding of a check image

    def summary(self) -> str:
        per_task = ", ".join(
            f"{t}: max|diff| {self.max_abs_diff[t]:.2e}, top-1 {self.top1_agreement[t]:.1%}" for t in self.max_abs_diff
        )
        return (
            f"wrote {self.path} ({self.size_bytes / 1e6:.1f} MB, {self.precision}, opset {self.opset}); "
            f"checked {self.n_check_images} images at batch sizes {list(self.batch_sizes)} against PyTorch fp32: "
            f"{per_task}, {EMBEDDING_OUTPUT}: min cosine {self.embedding_min_cosine:.6f}"
        )


def default_output_path(ckpt_path: str | os.PathLike[str], fp16: bool = False) -> Path:
    """CKPT with suffix .onnx, or .fp16.onnx for the half-precision variant."""
    return Path(ckpt_path).with_suffix(".fp16.onnx" if fp16 else ".onnx")


def export_checkpoint(
    ckpt_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str] | None = None,
    fp16: bool = False,
    opset: int | None = None,
    check_images: Sequence[str | os.PathLike[str]] | None = None,
) -> ExportReport:
    """Export, verify and atomically write the ONNX model; on any failure nothing is left at `out_path`.

    check_images: real photos for the parity check, on top of the generated product-like ones (tagger.synthetic).
    """
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise TaggerError(f"checkpoint {ckpt_path} is not a file")
    out = Path(out_path) if out_path is not None else default_output_path(ckpt_path, fp16)
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if opset < MIN_OPSET:
        raise TaggerError(f"opset {opset} is too old: the exporter needs opset {MIN_OPSET} or newer")
    check_destination(out, ckpt_path, "checkpoint")
    image_paths = _check_image_paths(check_images)
    precision = "fp16" if fp16 else "fp32"

    with publishing(out) as tmp:  # reserved now: an unwritable destination fails before any expensive work
        ckpt = _load(ckpt_path)
        images = _check_batch(ckpt.preprocess, image_paths)  # uint8 [K, S, S, 3]
        proto = _to_onnx(ckpt, images[:2], fp16, opset)
        set_temperatures(proto.graph, checkpoint_temperatures(ckpt), str(ckpt_path))  # none for older checkpoints
        _set_metadata(proto, ckpt, sha256_file(ckpt_path), ckpt_path.name, precision, opset)
        _check_graph(proto, ckpt.tasks, ckpt.preprocess.size, opset, _n_features(ckpt))
        tmp.write_bytes(proto.SerializeToString())
        info = read_model_metadata(tmp)
        diffs, agreement, batch_sizes, cosine = check_parity(tmp, ckpt, images, precision)

    report = ExportReport(
        path=out,
        size_bytes=out.stat().st_size,
        sha256=info.sha256,
        precision=precision,
        opset=opset,
        exporter=EXPORTER,
        n_check_images=len(images),
        batch_sizes=batch_sizes,
        max_abs_diff=diffs,
        top1_agreement=agreement,
        info=replace(info, path=out),
        embedding_min_cosine=cosine,
    )
    log.debug("%s", report.summary())
    return report


def _check_image_paths(check_images: Sequence[str | os.PathLike[str]] | None) -> list[Path]:
    paths = [Path(p) for p in check_images or ()]
    for p in paths:
        if not p.is_file():
            raise TaggerError(f"check image {p} is not a file")
    return paths


def _load(ckpt_path: Path) -> LoadedCheckpoint:
    try:
        ckpt = load_checkpoint(ckpt_path)
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as e:
        # load_state_dict and the spec constructors report a malformed checkpoint this way
        lines = [line.strip() for line in str(e).strip().splitlines()] or [type(e).__name__]
        # load_state_dict: "Error(s) in loading state_dict for X:" then one indented line per problem
        reason = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0]
        raise TaggerError(f"{ckpt_path} is not a usable tagger checkpoint: {reason}") from None
    if not ckpt.tasks or any(not t.labels for t in ckpt.tasks):
        raise TaggerError(f"{ckpt_path} has a task without labels")
    try:
        check_task_names(t.name for t in ckpt.tasks)
    except ValueError as e:
        raise TaggerError(f"{ckpt_path} has unusable tasks: {e}") from None
    return ckpt


class _ServingGraph(nn.Module):
    """The whole contract as one module: uint8 [N, H, W, 3] RGB -> one softmax [N, C_task] float32 per task, then
    the embedding: the heads' input features, L2-normalised, float32 [N, F]."""

    shift: torch.Tensor  # [1, 3, 1, 1] buffers
    scale: torch.Tensor

    def __init__(self, model: MultiTaskNet, preprocess: PreprocessSpec, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.backbone = model.backbone
        # A list, not the model's ModuleDict: torch.export turns submodule paths into Python attribute access, and a
        # task named "class" would make the traced code invalid. Dropout is the identity in eval mode.
        self.heads = nn.ModuleList(model.heads[name] for name in model.task_names)
        self.compute_dtype = compute_dtype
        # Normalisation stays float32 even for fp16 models; (x - 255 mean) / (255 std) == (x / 255 - mean) / std.
        self.register_buffer("shift", torch.tensor(preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("scale", torch.tensor(preprocess.std, dtype=torch.float32).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = images.permute(0, 3, 1, 2).to(torch.float32)  # [N, 3, H, W], transposed while still 1 byte per value
        x = ((x - self.shift) / self.scale).to(self.compute_dtype)
        features = self.backbone(x)  # [N, F]
        probs = tuple(torch.softmax(head(features).to(torch.float32), dim=1) for head in self.heads)
        features = features.to(torch.float32)
        # Broadcast, unlike F.normalize's expand_as, which reads the batch size from the input's Shape.
        return (*probs, features / torch.linalg.vector_norm(features, dim=1, keepdim=True).clamp_min(1e-12))


def _to_onnx(ckpt: LoadedCheckpoint, example: np.ndarray, fp16: bool, opset: int) -> onnx.ModelProto:
    """Trace the serving graph; `example` needs batch >= 2 or torch.export specialises the batch to 1."""
    model = copy.deepcopy(ckpt.model).half() if fp16 else ckpt.model
    graph = _ServingGraph(model, ckpt.preprocess, torch.float16 if fp16 else torch.float32).eval()
    log.info("exporting %s (%s, opset %d) with %s", ckpt.raw["backbone"], "fp16" if fp16 else "fp32", opset, EXPORTER)
    try:
        with _quiet_exporter_logs():
            program = torch.onnx.export(
                graph,
                (torch.from_numpy(example),),
                None,
                dynamo=True,
                verbose=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[t.output for t in ckpt.tasks] + [EMBEDDING_OUTPUT],
                dynamic_shapes={INPUT_NAME: {0: torch.export.Dim(BATCH_DIM, min=1)}},
                external_data=False,
                optimize=True,
            )
    except torch.onnx.OnnxExporterError as e:
        cause = e.__cause__ if e.__cause__ is not None else e
        raise TaggerError(
            f"ONNX export of {ckpt.raw['backbone']} failed: {type(cause).__name__}: {_first_line(cause)}"
        ) from None
    if program is None:
        raise TaggerError("ONNX export returned no program")
    proto = program.model_proto
    strip_trace_metadata(proto)
    return proto


@contextlib.contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    """onnxscript's optimiser logs every pass at INFO; keep it for -v (DEBUG) runs only."""
    noisy = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    saved = [lg.level for lg in noisy]
    if not log.isEnabledFor(logging.DEBUG):
        for lg in noisy:
            lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(noisy, saved):
            lg.setLevel(level)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _jsonable(obj: Any) -> Any:
    """Checkpoint values (tensors, numpy scalars, paths, NaN) as plain JSON; NaN/inf become null."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.ndarray, np.generic)):
        return _jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def _set_metadata(
    proto: onnx.ModelProto, ckpt: LoadedCheckpoint, ckpt_sha256: str, ckpt_name: str, precision: str, opset: int
) -> None:
    raw = ckpt.raw
    model = {
        "backbone": raw["backbone"],
        "checkpoint": ckpt_name,
        "checkpoint_sha256": ckpt_sha256,
        "metrics": raw.get("metrics") or {},
        "data": raw.get("data"),
        "epoch": raw.get("epoch"),
        "precision": precision,
        "opset": opset,
        "exporter": EXPORTER,
        "trained_with": raw.get("tagger_version"),
    }
    columns = dict((raw.get("args") or {}).get("tasks") or ())  # the trainer's (task, styles.csv column) pairs
    if columns:
        model["columns"] = {t.name: columns[t.name] for t in ckpt.tasks if t.name in columns}
    if checkpoint_temperatures(ckpt):
        model["temperature"] = checkpoint_temperatures(ckpt)
        model["calibration"] = {"data": "the checkpoint's validation split"}
    values = {
        META_TASKS: tasks_to_json(ckpt.tasks),
        META_PREPROCESS: json.dumps(ckpt.preprocess.to_dict()),
        META_MODEL: json.dumps(_jsonable(model)),
        META_VERSION: json.dumps(__version__),
        META_FORMAT: json.dumps(FORMAT_VERSION),
    }
    set_metadata(proto, values)
    set_description(proto, raw["backbone"], ckpt.tasks)


def _n_features(ckpt: LoadedCheckpoint) -> int:
    return int(ckpt.model.backbone.num_features)  # type: ignore[arg-type]


def _check_graph(proto: onnx.ModelProto, tasks: tuple[TaskSpec, ...], size: int, opset: int, n_features: int) -> None:
    """Structural checks: valid ONNX, self-contained, and the contract's names, dtypes and symbolic batch."""
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise TaggerError(f"exported graph fails onnx.checker: {_first_line(e)}") from None
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise TaggerError("exported graph refers to external data; the model must be a single file")
    got_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got_opset != opset:
        raise TaggerError(f"exporter produced opset {got_opset}, not the requested {opset}")

    def dims(v: onnx.ValueInfoProto) -> list[int | str]:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    inputs = list(proto.graph.input)
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        raise TaggerError(f"exported graph inputs are {[i.name for i in inputs]}, expected [{INPUT_NAME!r}]")
    in_dims = dims(inputs[0])
    if inputs[0].type.tensor_type.elem_type != onnx.TensorProto.UINT8 or in_dims[1:] != [size, size, 3]:
        raise TaggerError(f"exported input is {in_dims}, expected uint8 [N, {size}, {size}, 3]")
    if not isinstance(in_dims[0], str):
        raise TaggerError(f"exported batch axis is fixed at {in_dims[0]}; it must be symbolic")
    names = [o.name for o in proto.graph.output]
    expected = [t.output for t in tasks] + [EMBEDDING_OUTPUT]
    if names != expected:
        raise TaggerError(f"exported outputs are {names}, expected {expected}")
    for out, width in zip(proto.graph.output, [len(t.labels) for t in tasks] + [n_features]):
        d = dims(out)
        if out.type.tensor_type.elem_type != onnx.TensorProto.FLOAT or d[1:] != [width]:
            raise TaggerError(f"exported output {out.name} is {d}, expected float32 [N, {width}]")
        if d[0] != in_dims[0]:
            raise TaggerError(f"exported output {out.name} batch axis {d[0]!r} is not the input's {in_dims[0]!r}")


def _check_batch(preprocess: PreprocessSpec, paths: Sequence[Path]) -> np.ndarray:
    """Generated product photos plus `paths` decoded exactly as the runtime decodes: uint8 [K, S, S, 3]."""
    images = [fit_and_pad(img, preprocess) for img in generated_photos(N_GENERATED)]
    for p in paths:
        result = decode_one(p, preprocess)
        if isinstance(result, Failure):
            raise TaggerError(f"check image {p} could not be decoded: {result.error}")
        images.append(result.array)
    return np.stack(images)
