"""Session stage: one ONNX Runtime session on a tagger model (provider chosen here), uint8 NHWC in, probabilities
(and, when asked, the embedding) out."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import numpy as np
import onnxruntime as ort

from tagger.contract import EMBEDDING_OUTPUT, INPUT_NAME, PreprocessSpec, TaskSpec
from tagger.errors import TaggerError, UsageError, one_line
from tagger.model.info import ModelInfo, model_info_from_session, ort_errors
from tagger.model.registry import resolve_model

log = logging.getLogger(__name__)

T = TypeVar("T")

DEVICES = ("auto", "cpu", "cuda")
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# cuDNN tunes each convolution per input shape. Measured on an H200 (Lite0 @160, batch 256): the exhaustive
# search cost 1.9 s at the first run of each shape, the heuristic choice 0.5 s, at the same throughput.
CUDA_OPTIONS: Mapping[str, str] = {"cudnn_conv_algo_search": "HEURISTIC"}

_ERROR = 3  # onnxruntime logger severities
_FATAL = 4
_ORT_DEFAULT_SEVERITY = 2  # warning: onnxruntime's own default; it has no getter to read the current one


@contextlib.contextmanager
def ort_log_severity(level: int) -> Iterator[None]:
    """Set onnxruntime's process-wide logger severity for a block, then put back its default."""
    ort.set_default_logger_severity(level)
    try:
        yield
    finally:
        ort.set_default_logger_severity(_ORT_DEFAULT_SEVERITY)


def default_threads() -> int:
    """Inference threads: one per core, shared with the decode workers.

    Measured on 2 cores (tf_efficientnet_lite0 at 128 px): inference alone runs 310 img/s on 1 thread and 600 on 2,
    and tagging 60x80 JPEGs (inference-bound) ran ~270 img/s with 1 thread vs ~500 with 2, while 1800x2400 JPEGs
    (decode-bound) ran the same either way. Spinning is off, so threads waiting for work leave the cores to decoding.
    """
    return os.cpu_count() or 1


CPU_BATCH_SIZE = 64
CUDA_BATCH_SIZE = 256


def default_batch_size(provider: str) -> int:
    """Images per inference call: a GPU needs big batches to amortise each call (launches, copies, sync); on CPU
    64 is already past the point where bigger stops helping, and smaller keeps memory lower."""
    return CUDA_BATCH_SIZE if provider == CUDA else CPU_BATCH_SIZE


def default_inflight(provider: str) -> int:
    """Batches in the session at once. On CUDA a second one keeps the GPU busy while the first one's input is
    copied in and its outputs copied out; on CPU one call already uses every intra-op thread."""
    return 2 if provider == CUDA else 1


class Session:
    """A loaded tagger model. predict() takes uint8 [N, S, S, 3] and returns task -> float32 probabilities [N, C],
    plus EMBEDDING_OUTPUT -> float32 [N, D] when opened with embeddings=True (no task has that name)."""

    def __init__(self, sess: ort.InferenceSession, path: Path, embeddings: bool = False) -> None:
        self._sess = sess
        self.path = path
        self.info: ModelInfo = model_info_from_session(sess, path)  # validates the contract
        meta = sess.get_modelmeta().custom_metadata_map
        self.metadata: Mapping[str, str] = {k: v for k, v in meta.items() if k.startswith("tagger.")}
        self.provider: str = sess.get_providers()[0]
        if embeddings and self.info.embedding_dim is None:
            raise TaggerError(
                f"model {path} has no {EMBEDDING_OUTPUT!r} output, which --embeddings needs (models exported by "
                "this version's `tagger export` have it)"
            )
        # Only the outputs asked for are fetched: ORT then skips copying the embedding out of the graph.
        self.embedding_dim: int = (self.info.embedding_dim or 0) if embeddings else 0  # 0: not fetched
        self._keys = [t.name for t in self.info.tasks] + ([EMBEDDING_OUTPUT] if embeddings else [])
        self._outputs = [t.output for t in self.info.tasks] + ([EMBEDDING_OUTPUT] if embeddings else [])
        self._cuda_rows = 0  # largest batch run on CUDA: smaller ones are padded to it, so cuDNN tunes one shape

    @property
    def tasks(self) -> tuple[TaskSpec, ...]:
        return self.info.tasks

    @property
    def spec(self) -> PreprocessSpec:
        return self.info.preprocess

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 [N, S, S, 3] -> {task: float32 [N, C_task]} (and EMBEDDING_OUTPUT: float32 [N, D]), rows in
        input order."""
        s = self.spec.size
        if images.dtype != np.uint8 or images.shape[1:] != (s, s, 3):
            raise ValueError(f"expected uint8 [N, {s}, {s}, 3], got {images.dtype} {list(images.shape)}")
        if len(images) == 0:
            empty = {t.name: np.zeros((0, len(t.labels)), np.float32) for t in self.tasks}
            if self.embedding_dim:
                empty[EMBEDDING_OUTPUT] = np.zeros((0, self.embedding_dim), np.float32)
            return empty
        images = np.ascontiguousarray(images)
        if self.provider == CUDA:
            n = len(images)
            if n < self._cuda_rows:  # e.g. the last batch of a run
                images = np.concatenate([images, np.zeros((self._cuda_rows - n, s, s, 3), np.uint8)])
            self._cuda_rows = max(self._cuda_rows, n)
            return self._probs([o[:n] for o in self._run_bound(images)])
        return self._probs(self._sess.run(self._outputs, {INPUT_NAME: images}))

    def outputs(self, images: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
        """The named graph outputs for uint8 [N, S, S, 3] on the session's provider, as ORT returns them (e.g. the
        pooled features heads-only training fits on)."""
        return list(self._sess.run(list(names), {INPUT_NAME: np.ascontiguousarray(images)}))

    def predict_each(
        self, items: Iterable[T], images: Callable[[T], np.ndarray], inflight: int = 1
    ) -> Iterator[tuple[T, dict[str, np.ndarray]]]:
        """predict(images(item)) for each item, yielded in order with the item; with inflight > 1, up to that many
        calls run at once in threads (ONNX Runtime releases the GIL and sessions are safe to share)."""
        if inflight <= 1:
            for item in items:
                yield item, self.predict(images(item))
            return
        with ThreadPoolExecutor(inflight, thread_name_prefix="tagger-infer") as pool:
            pending: deque[tuple[T, Future[dict[str, np.ndarray]]]] = deque()
            for item in items:
                pending.append((item, pool.submit(self.predict, images(item))))
                if len(pending) >= inflight:
                    done, future = pending.popleft()
                    yield done, future.result()
            while pending:
                done, future = pending.popleft()
                yield done, future.result()

    def _run_bound(self, images: np.ndarray) -> list[np.ndarray]:
        binding = self._sess.io_binding()
        binding.bind_cpu_input(INPUT_NAME, images)  # copied to the GPU once
        return self._run_binding(binding)

    def _run_binding(self, binding: ort.IOBinding) -> list[np.ndarray]:
        # IO binding (input already bound): outputs land in host memory that ORT allocates itself.
        for name in self._outputs:
            binding.bind_output(name, "cpu")
        self._sess.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def _probs(self, outs: list[np.ndarray]) -> dict[str, np.ndarray]:
        # An fp16 model may still hand back float16 probabilities; the output schema is float32.
        return {key: np.asarray(o, dtype=np.float32) for key, o in zip(self._keys, outs)}


def _session_options(threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = _ERROR  # this session's notices are noise to a batch job; failures still raise
    # Spinning threads would burn the cores the decode workers need between batches.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def _ep_errors() -> tuple[type[BaseException], ...]:
    # Provider start-up failures come as EPFail, which the model loader's list leaves out.
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return ort_errors() + tuple(getattr(state, n) for n in ("EPFail", "EngineError") if hasattr(state, n))


def _create(path: Path, threads: int, providers: list[Any]) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), _session_options(threads), providers=providers)
    except ort_errors() as e:
        raise TaggerError(f"cannot load model {path}: {one_line(e, named=True)}") from None


def open_session(
    model: str | os.PathLike[str] | None = None,
    device: str = "auto",
    threads: int | None = None,
    embeddings: bool = False,
) -> Session:
    """Load a tagger model on the requested device: the one place that picks ONNX Runtime providers.

    embeddings: predict() also returns the `embedding` output; TaggerError when the model has none.

    device: 'cpu'; 'cuda' (strict: TaggerError unless the CUDA provider really runs the session); 'auto' (CUDA when
    it really works, else CPU). The truth comes from the created session's get_providers(): the GPU build of
    onnxruntime lists CUDA as available even without a GPU and then silently runs on CPU.
    """
    if device not in DEVICES:
        raise UsageError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    path = resolve_model(model)
    if not path.is_file():
        raise TaggerError(f"model {path} is not a file")
    threads = threads if threads is not None else default_threads()
    sess = None
    # Provider start-up writes to onnxruntime's process-wide log; our own message says what went wrong.
    with ort_log_severity(_ERROR if log.isEnabledFor(logging.DEBUG) else _FATAL):
        if device != "cpu":
            sess = _try_cuda(path, threads, strict=device == "cuda")
        if sess is None:
            sess = _create(path, threads, [CPU])
    session = Session(sess, path, embeddings)
    log.info("model %s on %s (%d intra-op threads)", path.name, session.provider, threads)
    if session.provider == CUDA and session.info.precision == "int8":
        log.warning("%s is an int8 model, made for CPUs; on a GPU, serve the fp32 model", path.name)
    return session


def _try_cuda(path: Path, threads: int, strict: bool) -> ort.InferenceSession | None:
    """A session whose first provider is CUDA, or None (auto) / TaggerError (strict) when CUDA does not work."""
    if CUDA not in ort.get_available_providers():
        if strict:
            raise TaggerError("--device cuda: this onnxruntime build has no CUDA provider (install onnxruntime-gpu)")
        log.info("onnxruntime has no CUDA provider; using CPU")
        return None
    if hasattr(ort, "preload_dlls"):
        # Loads CUDA/cuDNN from the nvidia-* wheels when installed. It print()s every library it cannot find, which
        # on a CPU-only machine would land in stdout, where scripts read the summary line; keep that in the debug log.
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            ort.preload_dlls()
        if printed.getvalue().strip():
            log.debug("onnxruntime.preload_dlls: %s", " | ".join(printed.getvalue().split("\n")).strip(" |"))
    # No CPU-fallback ban (session.disable_cpu_ep_fallback): CUDA legitimately leaves shape nodes on CPU, and the
    # ban would reject such models on a working GPU. A CUDA provider that failed to start is absent from
    # get_providers(), which is the check.
    try:
        sess = ort.InferenceSession(str(path), _session_options(threads), providers=[(CUDA, {"device_id": 0, **CUDA_OPTIONS}), CPU])
    except _ep_errors() as e:
        reason = one_line(e, named=True)
        if strict:
            raise TaggerError(f"cannot load model {path} on CUDA: {reason}") from None
        sess = None  # a bad model fails again, and is reported, when the CPU session is created
    else:
        reason = "no usable GPU, driver, or CUDA/cuDNN libraries; tagger -vv shows onnxruntime's log of which"
    if sess is not None and sess.get_providers()[0] == CUDA:
        return sess
    if strict:
        raise TaggerError(f"--device cuda: the CUDA provider failed to start ({reason}); use --device auto or cpu")
    log.info("CUDA is not usable here (%s); using CPU", reason.split(";")[0])
    return None
