"""Ray Data engine for `tagger run`: the local engine's stages as streaming decode tasks and an inference actor pool."""

from __future__ import annotations

import dataclasses
import heapq
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa

from tagger.compose import tag_batches
from tagger.contract import PreprocessSpec
from tagger.engines.plan import ModelFacts, RunConfig, RunPlan, RunSummary, model_argument
from tagger.engines.raystart import INSTALL_HINT, connected, data_context, import_ray, quiet_ray_logs, unwrapped_errors
from tagger.engines.sink import OutputSink
from tagger.errors import TaggerError, UsageError
from tagger.output.writer import ROWS_PER_PART, check_output, writes_folder
from tagger.pipeline.batch import Batch
from tagger.pipeline.decode import DecodeMemory, DecodeResult, Failure, Sample, decode_chunk, decode_many
from tagger.pipeline.discover import ImageRef
from tagger.pipeline.session import CPU, CUDA, default_batch_size, open_session
from tagger.storage import open_location, redact

if TYPE_CHECKING:
    from types import ModuleType

log = logging.getLogger(__name__)

INDEX = "index"  # discovery position, carried through Ray so rows can be written back in order; not written
MAX_BLOCKS = 10_000  # input blocks of the ref listing; more only adds scheduling overhead
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
    """Tag config.catalog like the local engine, on Ray Data, into the same OutputSink (--incremental and --resume
    included); config.out is a .parquet file or (another name, not with --incremental) a folder of parts.

    Discovery and the sink run here on the driver; decode runs as Ray tasks (one CPU each), inference in a pool of
    actors each holding one ONNX Runtime session; rows come back here and are written in discovery order. Paths
    (catalog, --files-from entries, --model) must be readable at the same absolute path on every node.
    """
    ray = import_ray()
    options = options or RayOptions()
    catalog_store, catalog = open_location(config.catalog)
    if not catalog_store.remote:  # a URI is read as it is on every node; a local path must be the same everywhere
        config = dataclasses.replace(config, catalog=Path(os.path.abspath(catalog)))
    plan = RunPlan(config)  # first: an --out that is an input is refused as such, whatever its shape
    if config.incremental and writes_folder(config.out):
        raise UsageError("--incremental reads the previous output as one file: name a .parquet --out")
    check_output(config.out)
    # The whole listing goes into the driver's memory (~200 bytes a file); see the README for larger catalogs.
    refs = list(plan.refs)
    model = model_argument(config.model)
    # Like the local engine, decode workers take every core and inference threads share them (ORT threads sleep
    # while they wait): a local instance has one logical CPU per core for decode tasks, plus one per actor.
    cpus = options.num_cpus or (os.cpu_count() or 1) + (options.actors or 1)
    with (
        quiet_ray_logs(),
        connected(ray, options.address, cpus),
        unwrapped_errors(ray),
        data_context(ray, config.progress),
    ):
        actors, gpus = _actor_shape(ray, config.device, options)
        probe = ray.remote(num_cpus=1, num_gpus=gpus)(probe_model)
        facts: ModelFacts = ray.get(probe.remote(model, config.device, config.threads, config.embeddings))
        with OutputSink(plan, facts, options.rows_per_part) as sink:
            to_tag = list(sink.refs_to_tag(refs))
            log.info(
                "tagging %d of %d files of %s%s on Ray: %d inference actors, %g GPUs each, on %s, batch %d",
                len(to_tag), len(refs), redact(config.catalog), f" (shard {config.shard})" if config.shard else "",
                actors, gpus, facts.provider, config.batch_size or default_batch_size(facts.provider),
            )  # fmt: skip
            blocks: Iterable[pa.Table] = ()  # a shard, or an incremental run, may have no file to tag
            if to_tag:
                ds = tag_dataset(to_tag, config, facts.spec, model, actors, gpus)
                blocks = ds.iter_batches(batch_size=None, batch_format="pyarrow")
            for table in in_discovery_order(blocks):
                sink.write(table.cast(sink.schema))
            if sink.tagged != len(to_tag):
                raise TaggerError(f"the Ray run returned {sink.tagged} rows for {len(to_tag)} files")
            sink.finish()
    return sink.summary()


def execute(config: RunConfig, options: Mapping[str, Any]) -> RunSummary:
    """The ENGINES entry point: run_ray with RayOptions(**options)."""
    return run_ray(config, RayOptions(**options))


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
    "execute",
    "run_ray",
    "tag_dataset",
]
