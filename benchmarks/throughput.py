"""Throughput benchmark: `tagger run` against an eager-PyTorch baseline and against its own decode/inference limits.

    python benchmarks/throughput.py [--images DIR] [--repeat N] [--json FILE] ...

One run, one machine, the same images for every row. Each row is a function that measures one configuration on a
catalog and returns a Measurement; the driver warms every row up on a few images, then runs the rows in turn in
each round (interleaved, so a burst of load from elsewhere does not hit one row only) and keeps each row's fastest:

    tagger       tagger.run(): folder -> Parquet, end to end (model load included)
    tagger +emb  (--embeddings) the same, writing the embedding column too
    tagger s3    (--object-store) the catalog as objects in moto on 127.0.0.1, direct and behind a latency proxy
    decode       discover + decode + batch of the pipeline, no inference (all workers)
    inference    the pipeline's ONNX Runtime session on decoded batches held in memory (all threads)
    baseline     what a notebook does: PIL full decode + torchvision Resize/ToTensor/Normalize in a DataLoader,
                 eager PyTorch under inference_mode, pyarrow at the end (model load included)

Then the peak RSS of `tagger run` on 1x and 10x the catalog. Progress goes to stderr through logging; the final
table goes to stdout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import click
import numpy as np
from procs import cpu_seconds, descendants, status_kib
from s3server import ACCESS_KEY, SECRET_KEY, S3Server, ServerProcess, environment, free_port

import tagger
from tagger.contract import PreprocessSpec, TaskSpec
from tagger.errors import TaggerError
from tagger.model.info import ModelInfo, read_model_metadata
from tagger.pipeline.decode import default_workers
from tagger.pipeline.discover import ImageRef, discover

# The decode workers are spawned, and a spawned process re-imports this script: onnxruntime, pyarrow and the rest
# of the pipeline are imported inside functions so that workers start as light as those of `tagger run`.
if TYPE_CHECKING:
    from tagger.pipeline.session import Session

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO / "sample_images"
DEFAULT_REPEAT = 5
WARMUP_IMAGES = 8
RSS_SAMPLE_S = 0.05
RSS_SCALES = (1, 10)
RSS_WARM_BATCHES = 10  # peak RSS settles after about this many batches
STORE_BUCKET = "tagger-bench"
STORE_LATENCY_MS = 20.0
STORE_ROW = "tagger s3"
EMBEDDINGS_ROW = "tagger +emb"  # tagger run --embeddings, timed right after the plain tagger row of each round
LATENCY_PROXY = Path(__file__).resolve().with_name("latency_proxy.py")

COMBINED_NOTE = (
    "combined limit = 1 / (1/decode + 1/inference): decode and inference were each measured alone on all cores, "
    "and in `tagger run` they share those cores, so one image costs the core-time of both; a pipeline that keeps "
    "every core busy with no other overhead reaches it (and may pass it a little, as neither stage alone scales "
    "perfectly across cores)."
)
GPU_COMBINED_NOTE = (
    "combined limit = min(decode, inference): inference runs on the GPU, not on the cores that decode, so the two "
    "stages overlap and the slower one sets the pace."
)


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and how; every path uses the same batch size, workers and threads."""

    images: Path
    model: Path
    checkpoint: Path | None = None
    device: str = "auto"
    batch_size: int | None = None  # None: tagger run's default for the provider (64 on CPU, 256 on CUDA)
    inflight: int | None = None  # batches in the session at once; None: tagger run's default (2 on CUDA, 1 on CPU)
    workers: int = 1
    threads: int = 1
    repeat: int = DEFAULT_REPEAT
    limit: int | None = None
    rounds: int = 1
    skip_baseline: bool = False
    skip_rss: bool = False
    object_store: bool = False  # also tag the catalog from an S3 server on 127.0.0.1, direct and with added latency
    latency_ms: float = STORE_LATENCY_MS  # added per request on the far store row
    embeddings: bool = False  # also time `tagger run --embeddings` (needs a model with the embedding output)


def _cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (decode and DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Stopwatch:
    """Wall clock and CPU time of a block: the CPU seconds per image are a path's cost, whatever else runs."""

    seconds = cpu_seconds = 0.0

    def __enter__(self) -> Stopwatch:
        self._wall, self._cpu = time.perf_counter(), _cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._wall
        self.cpu_seconds = _cpu_seconds() - self._cpu


@dataclass(frozen=True)
class Measurement:
    """One timed path: `images` files in `seconds` of wall clock (the best of the rounds)."""

    name: str
    images: int
    seconds: float
    cpu_seconds: float
    detail: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, name: str, images: int, sw: Stopwatch, **detail: Any) -> Measurement:
        return cls(name, images, sw.seconds, sw.cpu_seconds, detail)

    @property
    def img_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "seconds": self.seconds,
            "img_per_s": self.img_per_s,
            "cpu_seconds": self.cpu_seconds,
            **self.detail,
        }


def keep_best(results: dict[str, Measurement], m: Measurement) -> None:
    """Keep the fastest round of each path: other jobs on the machine can only ever slow a round down."""
    if m.name not in results or m.seconds < results[m.name].seconds:
        results[m.name] = m


# --- catalog ---------------------------------------------------------------------------------------------------


def source_images(root: Path, limit: int | None) -> list[ImageRef]:
    """The image files under `root` in discover order, the first `limit` of them when given."""
    refs: list[ImageRef] = []
    for ref in discover(root):
        if limit is not None and len(refs) >= limit:
            break
        refs.append(ref)
    if not refs:
        raise TaggerError(f"no image files in {root}")
    return refs


def build_catalog(sources: Sequence[ImageRef], dest: Path, copies: int) -> str:
    """Fill `dest` with `copies` subfolders, each holding every source under its relative path.

    Hard links (no extra disk, same page cache) where the file system allows, else per-file symlinks, which
    discover follows (it only skips a folder it has already walked). Returns 'hardlink' or 'symlink'.
    """
    how = "hardlink"
    for c in range(copies):
        for ref in sources:
            target = dest / f"copy{c:04d}" / ref.path
            target.parent.mkdir(parents=True, exist_ok=True)
            if how == "hardlink":
                try:
                    os.link(ref.abspath, target)
                    continue
                except OSError as e:
                    log.info("hard links unavailable (%s); using symlinks", e.strerror or e)
                    how = "symlink"
            target.symlink_to(os.path.abspath(ref.abspath))
    return how


# --- the rows: each measures one configuration on a catalog --------------------------------------------------


@dataclass(frozen=True)
class Catalog:
    """The images a row runs on: the few of the warm-up or the measured catalog."""

    folder: Path
    refs: Sequence[ImageRef]
    keep: int  # decoded images the decode row keeps for the inference row
    warmup: bool = False
    uri: str | None = None  # the same images as objects (--object-store)


@dataclass
class Bench:
    """What the rows share: the config, the model and its session, the batch size and batches in flight resolved
    for the session's provider, the store."""

    cfg: BenchConfig
    info: ModelInfo
    session: Session
    batch_size: int
    inflight: int
    tmp: Path
    torch_device: str = "cpu"
    store: ObjectStore | None = None
    images: np.ndarray = field(default_factory=lambda: np.empty((0, 0, 0, 3), np.uint8))  # from the decode row


RowFn = Callable[[Bench, Catalog], Measurement]


@dataclass(frozen=True)
class Row:
    """A named row of the table and the function that measures it."""

    name: str
    measure: RowFn
    optional: bool = False  # a TaggerError in its warm-up leaves it out with a note instead of ending the benchmark


def tagger_row(b: Bench, cat: Catalog) -> Measurement:
    return measure_tagger(cat.folder, b.cfg, b.tmp / "tagger.parquet")


def embeddings_row(b: Bench, cat: Catalog) -> Measurement:
    return measure_tagger(cat.folder, b.cfg, b.tmp / "tagger-emb.parquet", EMBEDDINGS_ROW, embeddings=True)


def store_row(name: str, delayed: bool) -> RowFn:
    """`tagger run` on the catalog's objects, straight from the server or through the latency proxy."""

    def row(b: Bench, cat: Catalog) -> Measurement:
        if b.store is None or cat.uri is None:
            raise TaggerError(f"{name} needs --object-store")
        endpoint = b.store.delayed if delayed else b.store.endpoint
        return measure_tagger(cat.uri, b.cfg, b.tmp / "tagger.parquet", name, b.store, endpoint)

    return row


def decode_row(b: Bench, cat: Catalog) -> Measurement:
    m, b.images = measure_decode(cat.folder, b.info.preprocess, b.cfg, b.batch_size, cat.keep)
    return m


def inference_row(b: Bench, cat: Catalog) -> Measurement:
    # The warm-up runs the timed batch shape too (cuDNN tunes per shape): full batches, as many as run at once.
    total = b.batch_size * b.inflight if cat.warmup else len(cat.refs)
    return measure_inference(b.session, b.images, total, b.batch_size, b.inflight)


def baseline_row(b: Bench, cat: Catalog) -> Measurement:
    return measure_baseline(cat.refs, b.info, b.cfg, b.tmp / "baseline.parquet", b.torch_device)


def plan_rows(cfg: BenchConfig, baseline: bool) -> list[Row]:
    """The rows this configuration measures, in the order each round runs them (decode feeds inference)."""
    rows = [Row("tagger", tagger_row)]
    if cfg.embeddings:
        rows.append(Row(EMBEDDINGS_ROW, embeddings_row))
    if cfg.object_store:
        far = delayed_row(cfg.latency_ms)
        rows += [Row(STORE_ROW, store_row(STORE_ROW, False)), Row(far, store_row(far, True))]
    rows += [Row("decode", decode_row), Row("inference", inference_row)]
    if baseline:
        rows.append(Row("baseline", baseline_row, optional=True))  # e.g. a backbone torch cannot rebuild
    return rows


def run_rows(
    b: Bench, rows: Sequence[Row], warm: Catalog, timed: Catalog, rounds: int, notes: list[str]
) -> dict[str, Measurement]:
    """Warm every row up on `warm`, then time the rows in turn on `timed` for each round; the fastest of each."""
    log.info("warm-up")
    kept = []
    for row in rows:
        try:
            row.measure(b, warm)
        except TaggerError as e:
            if not row.optional:
                raise
            notes.append(f"{row.name} skipped: {e}")
            continue
        kept.append(row)
    results: dict[str, Measurement] = {}
    for r in range(rounds):
        for row in kept:
            log.info("round %d/%d: %s", r + 1, rounds, row.name)
            keep_best(results, row.measure(b, timed))
    return results


# --- what the rows measure -------------------------------------------------------------------------------------


def measure_tagger(
    catalog: Path | str,
    cfg: BenchConfig,
    out: Path,
    name: str = "tagger",
    store: ObjectStore | None = None,
    endpoint: str | None = None,
    embeddings: bool = False,
) -> Measurement:
    """`tagger run` in this process: folder or URI -> Parquet, session creation and worker start-up included.

    endpoint: the S3 endpoint a URI catalog is read through; the store's own CPU time (server, proxy) is reported
    apart, as store_cpu_seconds.
    """
    import pyarrow.parquet as pq

    from tagger import RunConfig, run

    config = RunConfig(
        catalog=catalog,
        out=out,
        model=cfg.model,
        device=cfg.device,
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        threads=cfg.threads,
        inflight=cfg.inflight,
        progress=False,
        embeddings=embeddings,
    )
    store_cpu = store.cpu_seconds() if store else 0.0
    with environment(store.env(endpoint) if store and endpoint else {}), Stopwatch() as sw:
        summary = run(config)
    store_cpu = store.cpu_seconds() - store_cpu if store else 0.0
    if summary.errors:
        log.warning("%s: %d of %d files failed to decode", name, summary.errors, summary.files)
    rows = pq.read_metadata(out).num_rows
    if rows != summary.files:
        raise RuntimeError(f"{name} wrote {rows} rows for {summary.files} files")
    return Measurement.of(
        name,
        summary.files,
        sw,
        **({"store_cpu_seconds": store_cpu} if store else {}),
        errors=summary.errors,
        provider=summary.provider,
        stage_seconds=dict(summary.stage_seconds),
        parquet_bytes_per_row=out.stat().st_size / rows,
    )


def measure_decode(
    catalog: Path, spec: PreprocessSpec, cfg: BenchConfig, batch_size: int, keep: int
) -> tuple[Measurement, np.ndarray]:
    """discover -> decode -> batch with no inference; also returns the first `keep` decoded images [k, S, S, 3]."""
    from tagger.compose import decoded_batches

    kept: list[np.ndarray] = []
    n_kept = files = 0
    with Stopwatch() as sw, contextlib.closing(
        decoded_batches(discover(catalog), spec, batch_size, cfg.workers)
    ) as batches:
        for batch in batches:
            files += len(batch)
            if n_kept < keep and len(batch.images):
                kept.append(batch.images[: keep - n_kept])
                n_kept += len(kept[-1])
    images = np.concatenate(kept) if kept else np.empty((0, spec.size, spec.size, 3), np.uint8)
    return Measurement.of("decode", files, sw), images


def inference_batches(images: np.ndarray, total: int, batch_size: int) -> Iterator[np.ndarray]:
    """`total` images in batches of `batch_size`, cycling through the decoded `images` [k, S, S, 3]."""
    for start in range(0, total, batch_size):
        yield images[np.arange(start, min(start + batch_size, total)) % len(images)]


def measure_inference(
    session: Session, images: np.ndarray, total: int, batch_size: int, inflight: int
) -> Measurement:
    """The session alone on pre-decoded uint8 batches, `inflight` at once as in `tagger run`: no file reading,
    no decoding."""
    if not len(images):
        raise TaggerError("no image could be decoded, so there is nothing to infer on")
    with Stopwatch() as sw:
        for _ in session.predict_each(inference_batches(images, total, batch_size), lambda b: b, inflight):
            pass
    return Measurement.of("inference", total, sw)


@dataclass(frozen=True)
class BaselineModel:
    """The eager PyTorch model of the baseline and where it came from."""

    model: Any  # torch.nn.Module in eval mode
    spec: PreprocessSpec
    tasks: tuple[TaskSpec, ...]
    weights: str  # 'checkpoint' or 'random'


def baseline_model(info: ModelInfo, checkpoint: Path | None) -> BaselineModel:
    """The checkpoint's model, else the ONNX model's backbone and heads rebuilt with random weights."""
    if checkpoint is not None:
        loaded = tagger.load_checkpoint(str(checkpoint))
        if loaded.preprocess.size != info.preprocess.size:
            log.warning(
                "checkpoint input size %d differs from the model's %d", loaded.preprocess.size, info.preprocess.size
            )
        return BaselineModel(loaded.model.eval(), loaded.preprocess, loaded.tasks, "checkpoint")
    from tagger.train.model import MultiTaskNet

    model = MultiTaskNet(info.backbone, info.tasks, weights="none").eval()
    return BaselineModel(model, info.preprocess, info.tasks, "random")


class _NotebookDataset:
    """PIL decode of the whole file, then torchvision Resize((S, S)) -> ToTensor -> Normalize."""

    def __init__(self, paths: Sequence[str], transform: Any) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Any:
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB"))


def measure_baseline(
    refs: Sequence[ImageRef], info: ModelInfo, cfg: BenchConfig, out: Path, device: str
) -> Measurement:
    """The reference notebook's loop, model load included (as `tagger run` includes its session's)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from torch.utils.data import DataLoader
    from torchvision import transforms

    torch.set_num_threads(cfg.threads)
    with Stopwatch() as sw:
        bm = baseline_model(info, cfg.checkpoint)
        model = bm.model.to(device)
        s = bm.spec.size
        transform = transforms.Compose(
            [transforms.Resize((s, s)), transforms.ToTensor(), transforms.Normalize(bm.spec.mean, bm.spec.std)]
        )
        loader: DataLoader[Any] = DataLoader(
            _NotebookDataset([r.abspath for r in refs], transform),  # type: ignore[arg-type]  # duck-typed map-style
            batch_size=cfg.batch_size,
            num_workers=cfg.workers if cfg.workers > 1 else 0,
            shuffle=False,
        )
        preds: dict[str, list[Any]] = {t.name: [] for t in bm.tasks}
        with torch.inference_mode():
            for x in loader:  # float [B, 3, S, S]
                logits = model(x.to(device))
                for name, lg in logits.items():
                    preds[name].append(torch.softmax(lg, dim=1).max(dim=1))
        columns: dict[str, Any] = {"path": [r.path for r in refs]}
        for t in bm.tasks:
            score = torch.cat([p.values for p in preds[t.name]]).cpu().numpy()
            index = torch.cat([p.indices for p in preds[t.name]]).cpu().numpy()
            columns[t.name] = [t.labels[i] for i in index]
            columns[f"{t.name}_score"] = score
        pq.write_table(pa.table(columns), out)
    return Measurement.of("baseline", len(refs), sw, weights=bm.weights, device=device)


# --- memory ----------------------------------------------------------------------------------------------------


def measure_rss(catalog: Path | str, cfg: BenchConfig, out: Path, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run `python -m tagger.cli run` and sample the RSS of its process tree (the CLI plus its decode workers).

    env: what the run's environment adds (an object store's endpoint and credentials).

    peak_tree_rss_mb: the highest sum over the tree at one sample (shared library pages count once per process,
    so an upper bound); peak_process_rss_mb: the highest single-process high-water mark (VmHWM).
    """
    import pyarrow.parquet as pq

    cmd = [
        sys.executable, "-m", "tagger.cli", "-q", "run", str(catalog), "--out", str(out), "--model", str(cfg.model),
        "--device", cfg.device, "--batch-size", str(cfg.batch_size), "--workers", str(cfg.workers),
        "--threads", str(cfg.threads),
    ]  # fmt: skip
    env = {**os.environ, **(env or {})}
    # The child imports this very tagger, wherever it is installed or checked out.
    package_root = str(Path(tagger.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    peak_tree = peak_process = 0
    with tempfile.TemporaryFile("w+") as output:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)
        try:
            while proc.poll() is None:
                tree = 0
                for pid in descendants(proc.pid):
                    kib = status_kib(pid, ("VmRSS", "VmHWM"))
                    tree += kib.get("VmRSS", 0)
                    peak_process = max(peak_process, kib.get("VmHWM", 0))
                peak_tree = max(peak_tree, tree)
                time.sleep(RSS_SAMPLE_S)
        finally:
            if proc.poll() is None:  # interrupted: do not leave the run behind
                proc.terminate()
                proc.wait()
        seconds = time.perf_counter() - t0
        output.seek(0)
        text = output.read().strip()
    if proc.returncode != 0:
        raise RuntimeError(f"`tagger run` exited {proc.returncode}: {text[-500:]}")
    files = pq.read_metadata(out).num_rows
    return {
        "images": files,
        "seconds": seconds,
        "img_per_s": files / seconds if seconds > 0 else 0.0,
        "peak_tree_rss_mb": peak_tree / 1024,
        "peak_process_rss_mb": peak_process / 1024,
    }


# --- object store --------------------------------------------------------------------------------------------


def delayed_row(latency_ms: float) -> str:
    return f"{STORE_ROW} +{latency_ms:g}ms"


@dataclass(frozen=True)
class ObjectStore:
    """An S3 server (moto) on 127.0.0.1 and a latency proxy in front of it, both started by the benchmark."""

    server: S3Server
    proxy: ServerProcess

    @property
    def endpoint(self) -> str:
        """Straight to the server."""
        return self.server.endpoint

    @property
    def delayed(self) -> str:
        """The same server through the proxy: its latency more per request."""
        return f"http://127.0.0.1:{self.proxy.port}"

    @property
    def pids(self) -> tuple[int, ...]:
        return self.server.process.pid, self.proxy.pid

    def cpu_seconds(self) -> float:
        """The server's and the proxy's CPU time, which a row reports apart from tagger's."""
        return sum(cpu_seconds(pid) for pid in self.pids)

    def env(self, endpoint: str) -> dict[str, str]:
        """What a client (this process, a decode worker, a `tagger run`) needs to read the store through `endpoint`."""
        return {**self.server.env(), "AWS_ENDPOINT_URL": endpoint}


@contextlib.contextmanager
def object_store(home: Path, latency_ms: float = STORE_LATENCY_MS) -> Iterator[ObjectStore]:
    """Start moto and the latency proxy on free ports of 127.0.0.1; both stop at the end. home: the clients'
    (empty) AWS config files."""
    try:
        server = S3Server(home)
    except RuntimeError as e:
        raise TaggerError(f"--object-store: {e}") from None
    try:
        port = free_port()
        cmd = [
            sys.executable, str(LATENCY_PROXY), "--port", str(port), "--upstream", str(server.port),
            "--delay-ms", str(latency_ms),
        ]  # fmt: skip
        try:
            proxy = ServerProcess(cmd, port, "latency proxy")
        except RuntimeError as e:
            raise TaggerError(f"--object-store: {e}") from None
        try:
            yield ObjectStore(server, proxy)
        finally:
            proxy.stop()
    finally:
        server.stop()


def boto_credentials() -> dict[str, str]:
    return {"aws_access_key_id": ACCESS_KEY, "aws_secret_access_key": SECRET_KEY, "region_name": "us-east-1"}


def upload(folder: Path, endpoint: str, prefix: str) -> str:
    """Put every file under `folder` into STORE_BUCKET/prefix/<relative path>; returns the s3:// URI of the prefix.

    boto3's single PutObject per file: moto 5.2's answer to a multipart upload's completion trips pyarrow's writer.
    """
    import boto3  # type: ignore[import-untyped]

    s3 = boto3.client("s3", endpoint_url=endpoint, **boto_credentials())
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=STORE_BUCKET)
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]

    def put(path: Path) -> None:
        s3.put_object(Bucket=STORE_BUCKET, Key=f"{prefix}/{path.relative_to(folder).as_posix()}", Body=path.read_bytes())

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, files))
    return f"s3://{STORE_BUCKET}/{prefix}"


# --- facts and report ------------------------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_facts() -> dict[str, Any]:
    import onnxruntime as ort

    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "tagger": tagger.__version__,
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,  # other jobs skew timings
    }


def ratios(results: dict[str, Measurement], shared_cores: bool = True) -> dict[str, float | None]:
    """tagger over the baseline, over the slower stage, and over the combined limit.

    shared_cores: inference runs on the CPU cores that decode uses; on a GPU it does not, and the stages overlap,
    so the combined limit is the slower stage.
    """
    t = results["tagger"].img_per_s
    d, i = results["decode"].img_per_s, results["inference"].img_per_s
    if d <= 0 or i <= 0:
        combined = 0.0
    else:
        combined = 1 / (1 / d + 1 / i) if shared_cores else min(d, i)
    b = results["baseline"].img_per_s if "baseline" in results else 0.0
    return {
        "combined_limit_img_per_s": combined,
        "tagger_over_baseline": t / b if b > 0 else None,
        "tagger_over_min_stage": t / min(d, i) if min(d, i) > 0 else None,
        "tagger_over_combined_limit": t / combined if combined > 0 else None,
    }


def render_table(report: dict[str, Any]) -> str:
    cfg, res, r = report["config"], report["results"], report["ratios"]
    lines = [
        f"{report['images']['total']} images ({report['images']['distinct']} distinct x {cfg['repeat']}), "
        f"{report['model']['backbone']} {report['model']['input_size']}px on {report['provider']}, "
        f"batch {cfg['batch_size']} ({cfg['inflight']} in flight), {cfg['workers']} workers, {cfg['threads']} threads, "
        f"{report['machine']['cpu_count']} CPUs ({report['machine']['cpu_model']})",
    ]
    load = (report["machine"].get("loadavg_before"), report["machine"].get("loadavg"))
    if load[0] and load[1]:
        lines.append(f"load average (1 min) {load[0][0]:.1f} before, {load[1][0]:.1f} after: other jobs skew timings")
    lines += [*(f"note: {n}" for n in report["notes"])]
    lines += ["", f"{'path':<16} {'images':>7} {'seconds':>8} {'img/s':>8} {'cpu s':>8}"]
    store_names = [n for n in res if n.startswith(STORE_ROW)]
    if store_names:
        lines[-1] += f" {'store cpu s':>12}"
    for name in ("tagger", EMBEDDINGS_ROW, *store_names, "baseline", "decode", "inference"):
        m = res.get(name)
        if m is not None:
            label = f"{name} limit" if name in ("decode", "inference") else name
            store_cpu = f" {m['store_cpu_seconds']:>12.1f}" if "store_cpu_seconds" in m else ""
            lines.append(
                f"{label:<16} {m['images']:>7} {m['seconds']:>8.2f} {m['img_per_s']:>8.1f} {m['cpu_seconds']:>8.1f}"
                + store_cpu
            )
    lines.append(f"{'combined limit':<16} {'':>7} {'':>8} {r['combined_limit_img_per_s']:>8.1f}")
    lines.append("")

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}x"

    lines += [
        f"tagger / baseline              {fmt(r['tagger_over_baseline'])}",
        f"tagger / min(decode, infer)    {fmt(r['tagger_over_min_stage'])}",
        f"tagger / combined limit        {fmt(r['tagger_over_combined_limit'])}",
    ]
    for name in store_names:
        lines.append(f"{name + ' / tagger':<30} {fmt(res[name]['img_per_s'] / res['tagger']['img_per_s'])}")
    if EMBEDDINGS_ROW in res:
        emb, plain = res[EMBEDDINGS_ROW], res["tagger"]
        lines.append(
            f"{EMBEDDINGS_ROW + ' / tagger':<30} {fmt(emb['img_per_s'] / plain['img_per_s'])} img/s, "
            f"{fmt(emb['cpu_seconds'] / plain['cpu_seconds'])} cpu s; Parquet {plain['parquet_bytes_per_row']:.0f} -> "
            f"{emb['parquet_bytes_per_row']:.0f} bytes/row"
        )
    for scale, m in report["rss"].items():
        lines.append(
            f"peak RSS `tagger run` {scale:>4} ({m['images']:>6} images): tree {m['peak_tree_rss_mb']:7.0f} MB, "
            f"largest process {m['peak_process_rss_mb']:6.0f} MB"
        )
    return "\n".join(lines)


# --- driver ----------------------------------------------------------------------------------------------------


def _torch_device(provider: str) -> str | None:
    """The baseline's torch device: CUDA when the tagger runs on CUDA and torch sees a GPU; None without torch."""
    try:
        import torch
    except ImportError:
        return None
    return "cuda" if provider == "CUDAExecutionProvider" and torch.cuda.is_available() else "cpu"


def measure_rows(
    cfg: BenchConfig, info: ModelInfo, tmp: Path, store: ObjectStore | None, warm: Catalog, timed: Catalog,
    notes: list[str],
) -> tuple[BenchConfig, str, dict[str, Measurement]]:
    """Open the session, resolve the batch size and batches in flight for its provider, and run every row; returns
    the resolved config, the provider and the results. The session is closed when this returns."""
    from tagger.pipeline.session import CUDA, default_batch_size, default_inflight, open_session

    session = open_session(cfg.model, cfg.device, cfg.threads)
    provider = session.provider
    notes.append(COMBINED_NOTE if provider != CUDA else GPU_COMBINED_NOTE)
    batch_size, inflight = cfg.batch_size or default_batch_size(provider), cfg.inflight or default_inflight(provider)
    cfg = replace(cfg, batch_size=batch_size, inflight=inflight)
    torch_device = None if cfg.skip_baseline else _torch_device(provider)
    if cfg.skip_baseline:
        notes.append("baseline skipped (--skip-baseline)")
    elif torch_device is None:
        notes.append("baseline skipped: torch is not installed (pip install 'tagger[train]')")
    b = Bench(cfg, info, session, batch_size, inflight, tmp, torch_device or "cpu", store)
    return cfg, provider, run_rows(b, plan_rows(cfg, torch_device is not None), warm, timed, cfg.rounds, notes)


def benchmark(cfg: BenchConfig) -> dict[str, Any]:
    """Measure every row on the same catalog, then the peak RSS of `tagger run`; returns the whole report (what
    --json writes)."""
    load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    info = read_model_metadata(cfg.model)
    spec = info.preprocess
    sources = source_images(cfg.images, cfg.limit)
    notes: list[str] = []
    rss: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tagger-bench-") as tmp_name, contextlib.ExitStack() as stack:
        tmp = Path(tmp_name)
        build_catalog(sources[:WARMUP_IMAGES], tmp / "warm", 1)
        links = build_catalog(sources, tmp / "catalog", cfg.repeat)
        refs = list(discover(tmp / "catalog"))
        total = len(refs)
        log.info("catalog: %d images (%d x %d, %s)", total, len(sources), cfg.repeat, links)
        warm = Catalog(tmp / "warm", list(discover(tmp / "warm")), WARMUP_IMAGES, warmup=True)
        timed = Catalog(tmp / "catalog", refs, len(sources))
        store = None
        if cfg.object_store:
            store = stack.enter_context(object_store(tmp / "aws", cfg.latency_ms))
            log.info("uploading the catalog to moto_server at %s", store.endpoint)
            warm = replace(warm, uri=upload(warm.folder, store.endpoint, "warm"))
            timed = replace(timed, uri=upload(timed.folder, store.endpoint, "catalog"))
            notes.append(
                f"{STORE_ROW}: the same catalog as objects in moto_server on 127.0.0.1 ({timed.uri}); "
                f"{delayed_row(cfg.latency_ms)}: the same server behind a proxy that delays every request by "
                f"{cfg.latency_ms:g} ms; store cpu s: the server's and the proxy's CPU time, not in cpu s"
            )

        cfg, provider, results = measure_rows(cfg, info, tmp, store, warm, timed, notes)
        if "baseline" in results:
            if results["baseline"].detail["weights"] == "random":
                notes.append(
                    f"baseline model: {info.backbone} rebuilt from the ONNX metadata with random weights "
                    "(throughput does not depend on the weights; --checkpoint loads real ones)"
                )
            notes.append(
                "baseline resizes with Resize((S, S)) (stretching) as the reference notebook does; tagger fits and pads"
            )

        if cfg.skip_rss:
            notes.append("RSS skipped (--skip-rss)")
        elif not Path("/proc/self/status").exists():
            notes.append("RSS skipped: needs Linux /proc")
        else:
            for scale in RSS_SCALES:
                log.info("peak RSS of `tagger run` on %dx the catalog (%d images)", scale, scale * total)
                rss_catalog = tmp / f"rss{scale}"
                build_catalog(sources, rss_catalog, scale * cfg.repeat)
                rss[f"{scale}x"] = measure_rss(rss_catalog, cfg, tmp / f"rss{scale}.parquet")
            if store is not None and timed.uri is not None:
                for name, endpoint in ((STORE_ROW, store.endpoint), (delayed_row(cfg.latency_ms), store.delayed)):
                    log.info("peak RSS of `tagger run` on the catalog from %s", name)
                    rss[f"1x {name}"] = measure_rss(timed.uri, cfg, tmp / "rss-store.parquet", store.env(endpoint))
            if total < RSS_WARM_BATCHES * (cfg.batch_size or 1):
                notes.append(
                    f"the 1x catalog holds under {RSS_WARM_BATCHES} batches, so its peak RSS is still ramping up "
                    "(ONNX Runtime's memory arena grows over the first batches); use --repeat for a flat comparison"
                )

    shared_cores = provider != "CUDAExecutionProvider"  # does inference run on the cores that decode?
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "machine": {**machine_facts(), "loadavg_before": load_before},
        "provider": provider,
        "model": {
            "path": str(cfg.model),
            "sha256": info.sha256,
            "backbone": info.backbone,
            "input_size": spec.size,
            "precision": info.precision,
        },
        "images": {"source": str(cfg.images), "distinct": len(sources), "total": total, "catalog_links": links},
        "results": {name: m.to_dict() for name, m in results.items()},
        "ratios": ratios(results, shared_cores),
        "combined_limit": COMBINED_NOTE if shared_cores else GPU_COMBINED_NOTE,
        "rss": rss,
        "notes": notes,
    }


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--images", type=click.Path(path_type=Path, file_okay=False), default=DEFAULT_IMAGES, show_default="the repo's sample_images/", help="Image folder, walked recursively.")
@click.option("--model", type=click.Path(path_type=Path, dir_okay=False), default=None, help="ONNX model, or a shipped one: default, default-int8 [default: default].")
@click.option("--checkpoint", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Trainer checkpoint for the baseline [default: the model's backbone with random weights].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--batch-size", default=None, type=click.IntRange(1), help="Images per inference call, for every path [default: tagger run's].")
@click.option("--inflight", type=click.IntRange(1), default=None, help="Batches in the session at once, for tagger and the inference limit [default: tagger run's, 2 on CUDA, 1 on CPU].")
@click.option("--workers", type=click.IntRange(0), default=None, help="Decode processes, for every path [default: one per core].")
@click.option("--threads", type=click.IntRange(1), default=None, help="Inference threads, for every path [default: one per core].")
@click.option("--repeat", default=DEFAULT_REPEAT, show_default=True, type=click.IntRange(1), help="Copies of the images in the measured catalog.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Use only the first N images of --images.")
@click.option("--rounds", default=1, show_default=True, type=click.IntRange(1), help="Time each path N times, keep the best.")
@click.option("--json", "json_out", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Write the full report here.")
@click.option("--skip-baseline", is_flag=True, help="Do not run the PyTorch baseline.")
@click.option("--skip-rss", is_flag=True, help="Do not measure the peak RSS of `tagger run`.")
@click.option("--object-store", is_flag=True, help="Also tag the catalog from an S3 server (moto) on 127.0.0.1: direct, and behind a proxy that adds --latency-ms per request.")
@click.option("--embeddings", is_flag=True, help="Also time `tagger run --embeddings` right after each tagger round (the model needs the embedding output).")
@click.option("--latency-ms", type=click.FloatRange(0), default=STORE_LATENCY_MS, show_default=True, help="Delay per request on the far object-store row.")
@click.option("-v", "--verbose", is_flag=True, help="Also show the pipeline's own log lines.")
def main(
    images: Path,
    model: Path | None,
    checkpoint: Path | None,
    device: str,
    batch_size: int | None,
    inflight: int | None,
    workers: int | None,
    threads: int | None,
    repeat: int,
    limit: int | None,
    rounds: int,
    json_out: Path | None,
    skip_baseline: bool,
    skip_rss: bool,
    object_store: bool,
    latency_ms: float,
    embeddings: bool,
    verbose: bool,
) -> None:
    """Measure `tagger run` against an eager-PyTorch baseline and its decode and inference limits."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("tagger").setLevel(logging.INFO if verbose else logging.WARNING)
    from tagger.model.registry import resolve_model
    from tagger.pipeline.session import default_threads

    try:
        cfg = BenchConfig(
            images=images,
            model=resolve_model(model),
            checkpoint=checkpoint,
            device=device,
            batch_size=batch_size,
            inflight=inflight,
            workers=default_workers() if workers is None else workers,
            threads=default_threads() if threads is None else threads,
            repeat=repeat,
            limit=limit,
            rounds=rounds,
            skip_baseline=skip_baseline,
            skip_rss=skip_rss,
            object_store=object_store,
            latency_ms=latency_ms,
            embeddings=embeddings,
        )
        report = benchmark(cfg)
    except TaggerError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2) + "\n")
        log.info("wrote %s", json_out)
    click.echo(render_table(report))


if __name__ == "__main__":
    main()
