"""Session stage: one ONNX Runtime session on a tagger model (provider chosen here), uint8 NHWC in, probabilities out."""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from tagger.contract import (
    FORMAT_VERSION,
    INPUT_NAME,
    META_FORMAT,
    META_MODEL,
    META_PREPROCESS,
    META_TASKS,
    META_VERSION,
    PreprocessSpec,
    TaskSpec,
    tasks_from_json,
)
from tagger.errors import TaggerError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
DEFAULT_MODEL_NAME = "tagger-default.onnx"

# Every error type onnxruntime's binding raises (Fail, InvalidProtobuf, NoSuchFile, EPFail, ...); none derives
# from RuntimeError, so they are collected here to catch what we mean when loading a model.
ORT_ERRORS: tuple[type[BaseException], ...] = tuple(
    v for v in vars(_ort_state).values() if isinstance(v, type) and issubclass(v, Exception)
) + (RuntimeError,)

_WARNING = 3  # onnxruntime logger severities
_FATAL = 4


@dataclass(frozen=True)
class ModelInfo:
    """What a tagger ONNX model says about itself (its tagger.* metadata) plus the file's sha256."""

    tasks: tuple[TaskSpec, ...]
    preprocess: PreprocessSpec
    model: Mapping[str, Any]
    version: str
    format: int
    sha256: str
    metadata: Mapping[str, str]  # the raw tagger.* key-value pairs, copied into the output file


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def model_info_from_metadata(meta: Mapping[str, str], sha256: str, where: str) -> ModelInfo:
    """Parse the tagger.* custom metadata of an ONNX model; TaggerError when it is absent or of another format."""
    import json

    missing = [k for k in (META_FORMAT, META_TASKS, META_PREPROCESS) if k not in meta]
    if missing:
        raise TaggerError(f"{where} is not a tagger model: no {', '.join(missing)} metadata")
    try:
        fmt = int(meta[META_FORMAT])
    except ValueError:
        raise TaggerError(f"{where} has an unreadable {META_FORMAT} {meta[META_FORMAT]!r}") from None
    if fmt != FORMAT_VERSION:
        raise TaggerError(f"{where} has model format {fmt}; this tagger reads format {FORMAT_VERSION}")
    try:
        tasks = tasks_from_json(meta[META_TASKS])
        preprocess = PreprocessSpec.from_dict(json.loads(meta[META_PREPROCESS]))
        model = json.loads(meta[META_MODEL]) if META_MODEL in meta else {}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise TaggerError(f"{where} has malformed tagger metadata: {type(e).__name__}: {e}") from None
    if not tasks or any(not t.labels for t in tasks):
        raise TaggerError(f"{where} declares no tasks or a task without labels")
    tagger_meta = {k: v for k, v in meta.items() if k.startswith("tagger.")}
    return ModelInfo(tasks, preprocess, model, meta.get(META_VERSION, ""), fmt, sha256, tagger_meta)


def default_model_path() -> Path:
    """The shipped default model: package data tagger/_default_model/, else export/ of a source checkout."""
    try:
        packaged = importlib.resources.files("tagger._default_model") / DEFAULT_MODEL_NAME
        if packaged.is_file():
            return Path(str(packaged))
    except ModuleNotFoundError:
        pass
    checkout = Path(__file__).resolve().parents[2] / "export" / DEFAULT_MODEL_NAME
    if checkout.is_file():
        return checkout
    raise TaggerError(f"no default model is installed ({DEFAULT_MODEL_NAME} not found); pass --model MODEL.onnx")


def default_threads(workers: int) -> int:
    """Inference threads when decode workers share the cores: what the workers leave free, at least one."""
    return max(1, (os.cpu_count() or 1) - workers)


class Session:
    """A loaded tagger model. predict() takes uint8 [N, S, S, 3] and returns task -> float32 probabilities [N, C]."""

    def __init__(self, sess: ort.InferenceSession, info: ModelInfo, path: Path) -> None:
        self._sess = sess
        self.info = info
        self.path = path
        self.provider: str = sess.get_providers()[0]
        self._outputs = [t.output for t in info.tasks]
        self._check_contract()

    @property
    def tasks(self) -> tuple[TaskSpec, ...]:
        return self.info.tasks

    @property
    def spec(self) -> PreprocessSpec:
        return self.info.preprocess

    def _check_contract(self) -> None:
        where = str(self.path)
        inputs = self._sess.get_inputs()
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME or inputs[0].type != "tensor(uint8)":
            found = ", ".join(f"{i.name}: {i.type}" for i in inputs)
            raise TaggerError(f"{where} must take one uint8 input named {INPUT_NAME!r}; it takes {found}")
        shape = inputs[0].shape
        s = self.spec.size
        if len(shape) != 4 or any(isinstance(d, int) and d != want for d, want in zip(shape[1:], (s, s, 3))):
            raise TaggerError(f"{where} input shape {shape} does not match [N, {s}, {s}, 3] from its metadata")
        names = {o.name for o in self._sess.get_outputs()}
        missing = [o for o in self._outputs if o not in names]
        if missing:
            raise TaggerError(f"{where} lacks the outputs {', '.join(missing)} that its tasks metadata promises")

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 [N, S, S, 3] -> {task: float32 [N, C_task]}, rows in input order."""
        s = self.spec.size
        if images.dtype != np.uint8 or images.shape[1:] != (s, s, 3):
            raise ValueError(f"expected uint8 [N, {s}, {s}, 3], got {images.dtype} {list(images.shape)}")
        if len(images) == 0:
            return {t.name: np.zeros((0, len(t.labels)), np.float32) for t in self.tasks}
        outs = self._sess.run(self._outputs, {INPUT_NAME: np.ascontiguousarray(images)})
        # An fp16 model may still hand back float16 probabilities; the output schema is float32.
        return {t.name: np.asarray(o, dtype=np.float32) for t, o in zip(self.tasks, outs)}


def _session_options(threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # Spinning threads would burn the cores the decode workers need between batches.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def _create(path: Path, threads: int, providers: list[Any]) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), _session_options(threads), providers=providers)
    except ORT_ERRORS as e:
        msg = " ".join(str(e).split())[:300]
        raise TaggerError(f"cannot load model {path}: {type(e).__name__}: {msg}") from None


def open_session(model: str | os.PathLike[str] | None = None, device: str = "auto", threads: int | None = None) -> Session:
    """Load a tagger model on the requested device: the one place that picks ONNX Runtime providers.

    device: 'cpu'; 'cuda' (strict: TaggerError unless the CUDA provider really runs the session); 'auto' (CUDA when
    it really works, else CPU). The truth comes from the created session's get_providers(): the GPU build of
    onnxruntime lists CUDA as available even without a GPU and then silently runs on CPU.
    """
    if device not in DEVICES:
        raise TaggerError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    path = Path(model) if model is not None else default_model_path()
    if not path.is_file():
        raise TaggerError(f"model {path} is not a file")
    threads = threads if threads is not None else default_threads(0)
    ort.set_default_logger_severity(_WARNING)
    sess = None
    if device != "cpu":
        sess = _try_cuda(path, threads, strict=device == "cuda")
    if sess is None:
        sess = _create(path, threads, [CPU])
    info = model_info_from_metadata(sess.get_modelmeta().custom_metadata_map, file_sha256(path), str(path))
    session = Session(sess, info, path)
    log.info("model %s on %s (%d intra-op threads)", path.name, session.provider, threads)
    return session


def _try_cuda(path: Path, threads: int, strict: bool) -> ort.InferenceSession | None:
    """A session whose first provider is CUDA, or None (auto) / TaggerError (strict) when CUDA does not work."""
    if CUDA not in ort.get_available_providers():
        if strict:
            raise TaggerError("--device cuda: this onnxruntime build has no CUDA provider (install onnxruntime-gpu)")
        log.info("onnxruntime has no CUDA provider; using CPU")
        return None
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels, when installed
    # No CPU-fallback ban (session.disable_cpu_ep_fallback): CUDA legitimately leaves shape nodes on CPU, and the
    # ban would reject such models on a working GPU. A CUDA provider that failed to start is absent from
    # get_providers(), which is the check. In auto mode its error log is noise, so it is muted for the attempt.
    if not strict:
        ort.set_default_logger_severity(_FATAL)
    try:
        sess = ort.InferenceSession(str(path), _session_options(threads), providers=[(CUDA, {"device_id": 0}), CPU])
    except ORT_ERRORS as e:
        # A bad model fails again, and is reported, when the CPU session is created.
        reason = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        sess = None
    else:
        reason = "no usable GPU, driver, or CUDA/cuDNN libraries; onnxruntime's log above says which"
    finally:
        ort.set_default_logger_severity(_WARNING)
    if sess is not None and sess.get_providers()[0] == CUDA:
        return sess
    if strict:
        raise TaggerError(f"--device cuda: the CUDA provider failed to start ({reason}); use --device auto or cpu")
    log.info("CUDA is not usable here (%s); using CPU", reason.split(";")[0])
    return None
