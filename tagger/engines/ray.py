"""Ray Data engine for `tagger run`: the local engine's stages as streaming decode tasks and an inference actor pool."""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import logging
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa

from tagger.contract import PreprocessSpec
from tagger.engines.plan import ModelFacts, RunConfig, RunPlan, RunSummary, model_argument
from tagger.errors import TaggerError, UsageError, one_line
from tagger.output.schema import closing_metadata, count_ok, output_schema
from tagger.output.writer import ResultWriter
from tagger.pipeline.batch import Batch
from tagger.compose import tag_batches
from tagger.pipeline.decode import DecodeMemory, DecodeResult, Failure, Sample, decode_chunk, decode_many
from tagger.pipeline.discover import ImageRef
from tagger.pipeline.session import CPU, CUDA, default_batch_size, open_session
from tagger.storage import Location, discard, is_folder, is_uri, name_of, publish, redact, reserve_temp_dir

if TYPE_CHECKING:
    from types import ModuleType

log = logging.getLogger(__name__)

INSTALL_HINT = "--engine ray needs Ray, which is not installed: pip install 'tagger[ray]'"
INDEX = "index"  # discovery position, carried through Ray so rows can be written back in order; not written
MAX_BLOCKS = 10_000  # input blocks of the ref listing; more only adds scheduling overhead
ROWS_PER_PART = 1_000_000  # rows per part file when --out is a folder
# Memory a decode task may need: a 24 MP camera JPEG decoded (at a reduced DCT scale) plus its batch, with margin.
# Asking for it also keeps Ray from fusing decode into the inference actors (it fuses stages whose resource
# requests are equal), which would decode in the actors only, one batch at a time, behind inference.
DECODE_TASK_MEMORY = 256 * 1024**2


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide `tagger run --engine ray` runs. None means "pick the default" (documented per field)."""

    address: str | None = None  # None: start a local Ray instance; "auto", "ray://head:10001": join that cluster
    actors: int | None = None  # inference actors; None: GPUs of the cluster / num_gpus_per_actor, or 1 without GPUs
    num_gpus_per_actor: float | None = None  # None: 1 when --device is not cpu and the cluster has a GPU, else 0
    num_cpus: int | None = None  # CPUs of a local instance; None: one decode slot per core plus one per actor
    rows_per_part: int = ROWS_PER_PART  # when out is a folder

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise UsageError(f"--actors must be at least 1, got {self.actors}")
        if self.num_gpus_per_actor is not None and not 0 <= self.num_gpus_per_actor:
            raise UsageError(f"--num-gpus-per-actor must be >= 0, got {self.num_gpus_per_actor}")
        if self.num_cpus is not None and self.num_cpus < 2:
            raise UsageError(f"a local Ray instance needs at least 2 CPUs, got {self.num_cpus}")
        if self.rows_per_part < 1:
            raise UsageError(f"rows_per_part must be at least 1, got {self.rows_per_part}")


def import_ray() -> ModuleType:
    """The ray module (with Ray Data), or a one-line TaggerError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  # the extra is ray[data]; plain ray lacks its dependencies
    except ImportError as e:
        log.debug("cannot import ray: %s", e)
        raise TaggerError(INSTALL_HINT) from None
    return ray


# ---- the stages, as Ray calls them: thin adapters between Ray's column batches and the pipeline's types ----


def _refs_of(rows: Mapping[str, np.ndarray]) -> list[ImageRef]:
    """tag_dataset's columns -> ImageRefs; `unlistable` is '' for a listed file (Ray's columns hold no None)."""
    columns = (rows["path"], rows["abspath"], rows["size"], rows["mtime"], rows["unlistable"])
    return [ImageRef(str(p), str(a), int(s), float(m), str(u) or None) for p, a, s, m, u in zip(*columns, strict=True)]


def decode_rows(
    rows: dict[str, np.ndarray], spec: PreprocessSpec, max_pixels: int, decode_memory: int, io_threads: int
) -> dict[str, np.ndarray]:
    """Decode stage in a Ray task: decode_many on a batch of refs, its results added as columns.

    decode_memory bounds each task (its own process; Ray's scheduler, not tagger, shares a node's memory between
    tasks), so an image larger than the budget gets the local engine's error row.

    image: uint8 [n, S, S, 3], zeros on a failed row; error: '' on an ok row (a real error is never empty);
    width/height: -1 on a failed row; sha256: '' when the file could not be read. Every row has the same shape, as
    Ray's tensor columns need.
    """
    decoded = decode_many(_refs_of(rows), spec, max_pixels, memory=DecodeMemory(decode_memory), io_threads=io_threads)
    n, s = len(decoded.results), spec.size
    image = np.zeros((n, s, s, 3), np.uint8)
    width = np.full(n, -1, np.int32)
    height = np.full(n, -1, np.int32)
    error = [""] * n
    sha256 = [r.sha256 or "" for r in decoded.results]
    for i, r in enumerate(decoded.results):
        if isinstance(r, Sample):
            image[i], width[i], height[i] = r.array, r.width, r.height
        else:
            error[i] = r.error
    columns = {"width": width, "height": height, "error": np.array(error, dtype=object)}
    return {**rows, "image": image, **columns, "sha256": np.array(sha256, dtype=object)}


def batch_of_rows(rows: Mapping[str, np.ndarray]) -> Batch:
    """decode_rows' columns -> the local engine's Batch (refs, results, stacked ok images)."""
    ok = rows["error"] == ""  # [n]
    images = np.ascontiguousarray(rows["image"][ok])  # uint8 [k, S, S, 3]
    results: list[DecodeResult] = []
    k = 0
    for i, index in enumerate(rows[INDEX]):
        digest = str(rows["sha256"][i]) or None
        if ok[i]:
            results.append(Sample(int(index), images[k], int(rows["width"][i]), int(rows["height"][i]), digest))
            k += 1
        else:
            results.append(Failure(int(index), str(rows["error"][i]), digest))
    return Batch(tuple(_refs_of(rows)), tuple(results), images)


class TagActor:
    """Inference stage in a Ray actor: one ONNX Runtime session from open_session, tag_batches as locally."""

    def __init__(
        self, model: str | None, device: str, threads: int | None, top_k: int, embeddings: bool = False
    ) -> None:
        self.session = open_session(model, device, threads, embeddings)
        self.top_k = top_k

    def __call__(self, rows: dict[str, np.ndarray]) -> pa.Table:
        ((_, table),) = tag_batches([batch_of_rows(rows)], self.session, self.top_k)
        return table.append_column(INDEX, pa.array(rows[INDEX], pa.int64()))


def probe_model(model: str | None, device: str, threads: int | None, embeddings: bool = False) -> ModelFacts:
    """Open the model once where an actor would run: fails fast (bad model, no CUDA, no embedding output) with the
    local engine's message."""
    return ModelFacts.of(open_session(model, device, threads, embeddings))


# ---- the driver ----


def in_discovery_order(tables: Iterable[pa.Table]) -> Iterator[pa.Table]:
    """Ray hands back blocks as they finish; yield their rows in INDEX order 0, 1, 2, ..., without the INDEX column.

    Each block is sorted and cut into runs of consecutive indices; a run waits on a heap until every row before it
    is out, so memory holds only the rows that finished early. Raises if a row is missing or repeated.
    """
    heap: list[tuple[int, int, pa.Table]] = []
    next_index = 0
    for seq, table in enumerate(tables):
        if table.num_rows == 0:
            continue
        table = table.sort_by(INDEX)
        idx = table.column(INDEX).to_numpy()  # int64 [n]
        cuts = [0, *(np.flatnonzero(np.diff(idx) != 1) + 1).tolist(), len(idx)]
        for a, b in zip(cuts[:-1], cuts[1:]):
            heapq.heappush(heap, (int(idx[a]), seq, table.slice(a, b - a)))
        while heap and heap[0][0] <= next_index:
            start, _, run = heapq.heappop(heap)
            if start < next_index:
                raise TaggerError(f"the Ray run returned row {start} twice")
            next_index += run.num_rows
            yield run.drop_columns([INDEX])
    if heap:
        raise TaggerError(f"the Ray run lost rows {next_index} to {heap[0][0] - 1}")


class _FileSink:
    """One Parquet file, written exactly as the local engine writes it."""

    def __init__(self, out: Location, schema: pa.Schema, metadata: Mapping[str, str]) -> None:
        self._writer = ResultWriter(out, schema, metadata)

    def write(self, table: pa.Table) -> None:
        self._writer.write(table)

    def commit(self, files: int, ok: int) -> None:
        self._writer.commit(closing_metadata(files, ok, tagged=files))

    def abort(self) -> None:
        self._writer.abort()


class _PartsSink:
    """A folder of part-NNNNN.parquet files in discovery order, each a complete output file of its rows.

    Parts go into a hidden folder beside `out` that becomes `out` on success, so a failed run leaves nothing behind.
    """

    def __init__(self, out: Path, schema: pa.Schema, metadata: Mapping[str, str], rows_per_part: int) -> None:
        self.out, self.schema, self.metadata, self.rows_per_part = out, schema, metadata, rows_per_part
        self._stage = reserve_temp_dir(out)
        self._part: ResultWriter | None = None
        self._parts = 0
        self._rows = self._ok = 0

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self._part is None:
                path = self._stage / f"part-{self._parts:05d}.parquet"
                self._part = ResultWriter(path, self.schema, self.metadata)
                self._parts += 1
            head = table.slice(0, self.rows_per_part - self._rows)
            table = table.slice(head.num_rows)
            self._part.write(head)
            self._rows += head.num_rows
            self._ok += count_ok(head)
            if self._rows == self.rows_per_part:
                self._close_part()

    def _close_part(self) -> None:
        assert self._part is not None
        self._part.commit(closing_metadata(self._rows, self._ok, tagged=self._rows))
        self._part, self._rows, self._ok = None, 0, 0

    def commit(self, files: int, ok: int) -> None:
        if self._part is not None:
            self._close_part()
        publish(self._stage, self.out)  # an existing self.out was checked empty before the run

    def abort(self) -> None:
        if self._part is not None:
            self._part.abort()
            self._part = None
        discard(self._stage)


def writes_folder(out: Location) -> bool:
    """--out names a single file when it ends in .parquet, else a folder of part files."""
    return not name_of(out).lower().endswith(".parquet")


def _check_out(out: Location) -> None:
    """Refuse an output that cannot be written before any work is done."""
    if is_uri(out):
        # The driver uploads one finished object; parts in a bucket would need an upload per part and a cleanup.
        if writes_folder(out) or is_folder(out):
            raise UsageError(f"--engine ray writes an output in a bucket as one .parquet object, not {redact(out)}")
        return
    out = Path(out)
    if writes_folder(out):
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise TaggerError(f"output folder {out} exists and is not empty; name a new folder or a .parquet file")
    elif out.is_dir():
        raise TaggerError(f"output {out} is a folder; name a .parquet file")
    if not out.parent.is_dir():
        raise TaggerError(f"cannot write output {out}: no folder {out.parent}")


# Ray turns a node address of 127.0.0.1 into the machine's outward one and then listens on every interface; a
# single-machine instance (this switch, which Ray reads at import and Ray's processes read from the environment)
# keeps 127.0.0.1, and every Ray process then listens there only.
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """While a local Ray instance starts: its node address stays 127.0.0.1 (see SINGLE_MACHINE_ENV)."""
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(SINGLE_MACHINE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(SINGLE_MACHINE_ENV, None)
        else:
            os.environ[SINGLE_MACHINE_ENV] = saved_env


@contextlib.contextmanager
def _started_in(folder: str) -> Iterator[None]:
    """Run ray.init from `folder`: Ray puts the driver's working directory first on every worker's import path, and
    the processes of a local instance work there."""
    here = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(here)


@contextlib.contextmanager
def _without_core_level_line() -> Iterator[None]:
    """Ray's C++ core announces on stderr that it read RAY_CORE_LOG_ENV as it starts in this process (in ray.init):
    that line is dropped, whatever else is written to stderr meanwhile is passed on after."""
    if os.environ.get(RAY_CORE_LOG_ENV) != QUIET_CORE_LEVEL:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines(keepends=True):
                if f"environment variable {RAY_CORE_LOG_ENV}" not in line:
                    sys.stderr.write(line)
            sys.stderr.flush()


@contextlib.contextmanager
def _connected(ray: ModuleType, options: RayOptions) -> Iterator[None]:
    """Use an already initialised Ray (a notebook's, a test's), else join options.address or start a local one."""
    if ray.is_initialized():
        yield
        return
    # Workers' output comes back to the driver's stderr with -v only; a worker's error still reaches it as one.
    verbose = log.getEffectiveLevel() <= logging.INFO
    quiet: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": verbose}
    # Started from an empty folder, not the user's: one holding a folder named tagger/ (a checkout, say) would
    # shadow the installed package in every worker.
    empty = tempfile.mkdtemp(prefix="tagger-ray-")
    try:
        if options.address:
            try:
                with _started_in(empty), _without_core_level_line():
                    ray.init(address=options.address, **quiet)
            except ConnectionError as e:
                raise TaggerError(f"cannot join the Ray cluster at {options.address}: {_last_line(e)}") from None
        else:
            # Like the local engine, decode workers take every core and inference threads share them (ORT threads
            # sleep while they wait): one logical CPU per core for decode tasks, plus one per inference actor.
            # address="local": a bare ray.init() would join a cluster that `ray start` left on this machine.
            cpus = options.num_cpus or (os.cpu_count() or 1) + (options.actors or 1)
            with _started_in(empty), _loopback_only(), _without_core_level_line():
                ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=cpus, **quiet)
        try:
            yield
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(empty, ignore_errors=True)  # after the local instance's processes have stopped


RAY_LOGGERS = ("ray", "ray.data")  # the driver's Python loggers of Ray and Ray Data (executor, progress lines)
# The level of Ray's C++ core, which logs to stderr outside Python's logging: on every run it prints an error-level
# line about actor arguments kept in the object store, and on some machines a memory-monitor warning, neither of
# which is the user's business. Read when Ray starts its processes and the driver's core worker.
RAY_CORE_LOG_ENV = "RAY_BACKEND_LOG_LEVEL"
QUIET_CORE_LEVEL = "fatal"


@contextlib.contextmanager
def _quiet_ray_logs() -> Iterator[None]:
    """Ray's driver loggers no chattier than tagger's own (WARNING by default, ERROR with -q), and its C++ core
    silent but for fatal errors, unless tagger logs INFO (-v) or the user set RAY_CORE_LOG_ENV; the loggers' levels
    (which ray.init's logging_level also sets) and the environment restored after. Ray Data logs INFO to stderr by
    default: its plan, and progress lines when stderr is no terminal. A failed run still says why: Ray's errors
    reach tagger as exceptions."""
    level = log.getEffectiveLevel()
    loggers = [logging.getLogger(name) for name in RAY_LOGGERS]
    saved = [lg.level for lg in loggers]
    quiet_core = level > logging.INFO and RAY_CORE_LOG_ENV not in os.environ
    if level > logging.INFO:
        for lg in loggers:
            lg.setLevel(max(lg.getEffectiveLevel(), level))
    if quiet_core:
        os.environ[RAY_CORE_LOG_ENV] = QUIET_CORE_LEVEL
    try:
        yield
    finally:
        for lg, was in zip(loggers, saved):
            lg.setLevel(was)
        if quiet_core:
            os.environ.pop(RAY_CORE_LOG_ENV, None)


@contextlib.contextmanager
def _unwrapped_errors(ray: ModuleType) -> Iterator[None]:
    """A TaggerError raised in a Ray worker comes back as itself; any other Ray failure as one line."""
    try:
        yield
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, TaggerError):
            raise e.cause from None
        raise TaggerError(f"the Ray run failed: {_last_line(e.cause)}") from None
    except ray.exceptions.RayError as e:
        raise TaggerError(f"the Ray run failed: {_last_line(e)}") from None


def _last_line(e: BaseException) -> str:
    """Ray's errors carry a remote traceback; its last line says what happened."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return one_line(RuntimeError(lines[-1])) if lines else type(e).__name__


def _actor_shape(ray: ModuleType, device: str, options: RayOptions) -> tuple[int, float]:
    """(actors, GPUs per actor), checked against the cluster so that Ray never waits for GPUs that do not exist."""
    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    per = options.num_gpus_per_actor
    if per is None:
        per = 1.0 if device != "cpu" and gpus >= 1 else 0.0
    if per > 0 and device == "cpu":
        raise UsageError("--num-gpus-per-actor needs --device auto or cuda")
    actors = options.actors or (max(1, math.floor(gpus / per + 1e-9)) if per > 0 else 1)
    if actors * per > gpus + 1e-9:
        raise TaggerError(f"{actors} actors x {per:g} GPUs need more GPUs than the Ray cluster's {gpus:g}")
    return actors, per


def run_ray(config: RunConfig, options: RayOptions | None = None) -> RunSummary:
    """Tag config.catalog like the local engine, on Ray Data; config.out is a .parquet file or a folder of parts.

    Discovery runs here on the driver; decode runs as Ray tasks (one CPU each), inference in a pool of actors each
    holding one ONNX Runtime session; rows come back here and are written in discovery order. Paths (catalog,
    --files-from entries, --model) must be readable at the same absolute path on every node.
    """
    ray = import_ray()
    options = options or RayOptions()
    if config.incremental or config.resume:
        raise UsageError("--incremental and --resume work with --engine local only")
    if not is_uri(config.catalog):  # a URI is read as it is on every node; a local path must be the same everywhere
        config = dataclasses.replace(config, catalog=Path(os.path.abspath(config.catalog)))
    plan = RunPlan(config)  # first: an --out that is an input is refused as such, whatever its shape
    out = config.out
    _check_out(out)
    # The whole listing goes into the driver's memory (~200 bytes a file); see the README for larger catalogs.
    refs = list(plan.refs)
    model = model_argument(config.model)
    with _quiet_ray_logs(), _connected(ray, options), _unwrapped_errors(ray), _data_context(ray, config.progress):
        actors, gpus = _actor_shape(ray, config.device, options)
        probe = ray.remote(num_cpus=1, num_gpus=gpus)(probe_model)
        facts: ModelFacts = ray.get(probe.remote(model, config.device, config.threads, config.embeddings))
        log.info(
            "tagging %d files of %s%s on Ray: %d inference actors, %g GPUs each, on %s, batch %d",
            len(refs), redact(config.catalog), f" (shard {config.shard})" if config.shard else "", actors, gpus,
            facts.provider, config.batch_size or default_batch_size(facts.provider),
        )  # fmt: skip
        schema = output_schema(facts.tasks, config.top_k, facts.embedding_dim)
        metadata = plan.metadata(facts)
        sink: _FileSink | _PartsSink = (
            _PartsSink(Path(out), schema, metadata, options.rows_per_part)  # a URI folder was refused above
            if writes_folder(out)
            else _FileSink(out, schema, metadata)
        )
        files = ok = 0
        try:
            blocks: Iterable[pa.Table] = ()  # a shard may hold no file
            if refs:
                ds = tag_dataset(refs, config, facts.spec, model, actors, gpus)
                blocks = ds.iter_batches(batch_size=None, batch_format="pyarrow")
            for table in in_discovery_order(blocks):
                table = table.cast(schema)
                sink.write(table)
                files += table.num_rows
                ok += count_ok(table)
            if files != len(refs):
                raise TaggerError(f"the Ray run returned {files} rows for {len(refs)} files")
            plan.check_errors(files, files - ok)
            sink.commit(files, ok)
        except BaseException:
            sink.abort()
            raise
    return plan.summary(facts.provider, files, ok)


def tag_dataset(
    refs: list[ImageRef],
    config: RunConfig,
    spec: PreprocessSpec,
    model: str | None,
    actors: int,
    gpus: float,
) -> Any:
    """refs -> Ray dataset of output rows (the local engine's rows plus INDEX, in no particular order), lazy.

    Needs a connected Ray. model: an absolute path, a shipped model's name, or None for the workers' default model.
    """
    ray = import_ray()
    batch_size = config.batch_size or default_batch_size(CUDA if gpus else CPU)
    chunk = decode_chunk(batch_size)
    items = [
        {"path": r.path, "abspath": r.abspath, "size": r.size, "mtime": r.mtime, "unlistable": r.unlistable or "",
         INDEX: i}
        for i, r in enumerate(refs)
    ]
    ds = ray.data.from_items(items, override_num_blocks=min(MAX_BLOCKS, math.ceil(len(items) / chunk)))
    ds = ds.map_batches(
        decode_rows,
        batch_size=chunk,
        batch_format="numpy",
        fn_kwargs={
            "spec": spec, "max_pixels": config.max_pixels, "decode_memory": config.decode_memory,
            "io_threads": config.io_threads,
        },  # fmt: skip
        num_cpus=1,
        memory=DECODE_TASK_MEMORY,
    )
    return ds.map_batches(
        TagActor,
        batch_size=batch_size,
        batch_format="numpy",
        fn_constructor_kwargs={
            "model": model, "device": config.device, "threads": config.threads, "top_k": config.top_k,
            "embeddings": config.embeddings,
        },  # fmt: skip
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
        num_gpus=gpus,
    )


@contextlib.contextmanager
def _data_context(ray: ModuleType, progress: bool | None) -> Iterator[None]:
    """Ray Data's own progress bars unless progress is False (None leaves Ray's default); restored after."""
    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars
    if progress is not None:
        ctx.enable_progress_bars = progress
    try:
        yield
    finally:
        ctx.enable_progress_bars = saved


__all__ = [
    "INSTALL_HINT",
    "ModelFacts",
    "RayOptions",
    "TagActor",
    "batch_of_rows",
    "decode_rows",
    "import_ray",
    "in_discovery_order",
    "probe_model",
    "run_ray",
    "tag_dataset",
    "writes_folder",
]
