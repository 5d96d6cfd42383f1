"""Thin Click CLI: parse and check arguments, call the library, turn TaggerError into one line and an exit code."""

from __future__ import annotations

import functools
import logging
import os
import select
import signal
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

import click

from tagger._version import __version__
from tagger.engines import ENGINES
from tagger.errors import TaggerError, one_line
from tagger.options import Bytes, pairs, task_ints
from tagger.similar import DEFAULT_K, DEFAULT_THRESHOLD

F = TypeVar("F", bound=Callable[..., Any])


def _friendly(fn: F) -> F:
    """Run a command, mapping expected failures to one clear line on stderr instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TaggerError as e:
            click.echo(f"error: {e}", err=True)
            _exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            _exit(130)
        except SystemExit as e:  # SIGTERM, or a command's own exit code
            if isinstance(e.code, int):
                _exit(e.code)
            raise
        except MemoryError as e:  # an allocation too large for this machine: one line, no traceback
            click.echo(f"error: out of memory: {one_line(e, named=True)}", err=True)
            sys.exit(TaggerError.exit_code)
        except BrokenPipeError as e:
            if not _stdout_closed():
                click.echo(f"error: {one_line(e, named=True)}", err=True)
                sys.exit(TaggerError.exit_code)
            # Whoever read stdout went away (`| head -1`): nothing to tell it. Exit as a Unix tool killed by
            # SIGPIPE does (whatever the command did before printing, an output published included, stays done).
            sys.exit(128 + signal.SIGPIPE)

    return wrapper  # type: ignore[return-value]


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader is gone (poll: POLLERR); if so stdout now writes to /dev/null, so that
    the flush at exit stays quiet."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # replaced by a stream without a descriptor (a test runner's)
        return False
    if not hasattr(select, "poll"):
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if not any(events & select.POLLERR for _, events in poller.poll(0)):
        return False
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
    return True


def _quiet() -> bool:
    """Whether -q was given: errors only."""
    return bool(click.get_current_context().find_root().params.get("quiet"))


def _say(text: str) -> None:
    """The summary line of a command that writes files, on stdout, unless -q (eval and info print what they are
    for whatever the verbosity)."""
    if not _quiet():
        click.echo(text)


def _exit(code: int) -> None:
    """Exit with `code`; at once when calls to a store that does not answer are still waiting (see storage)."""
    from tagger.storage import exit_if_stuck

    exit_if_stuck(code)
    sys.exit(code)


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM: stop waiting for object stores (at most a few seconds of clean-up), then unwind like Ctrl-C."""
    from tagger.storage import stop_waiting

    stop_waiting()
    pool = sys.modules.get("tagger.pipeline.pool")  # no pool to stop where decoding never started
    if pool is not None:
        pool.stop_decoders()  # a worker stuck in a store read would hold the run's unwinding for its timeout
    sys.exit(128 + signum)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tagger")
@click.option("-v", "--verbose", count=True, help="-v: details (INFO); -vv: debug.")
@click.option("-q", "--quiet", is_flag=True, help="Errors only: no warnings, progress or summary line (eval and info still print their result).")
def main(verbose: int, quiet: bool) -> None:
    """Tag product photos: class, colour and the other tasks of the model, one Parquet row per file.

    \b
    Exit codes: 0 done (a run with error rows included, up to --max-errors), 1 the job could not be done (bad
    model, unwritable output, no CUDA with --device cuda, a refused merge, more error rows than --max-errors),
    2 bad or missing arguments.
    """
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@main.command()
@click.option("--data", "data", type=click.Path(path_type=Path), multiple=True, required=True, help="Folder with styles.csv and images/<id>.jpg; repeatable (an id already in an earlier folder takes that image's side of the split).")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Run directory to write.")
@click.option("--heads-only", is_flag=True, help="Fit task heads on the pooled features of --base (minutes on a CPU) and write RUN/model.onnx.")
@click.option("--base", default="default", show_default=True, help="--heads-only: the model whose backbone is kept: default, default-int8 or an .onnx file.")
@click.option("--data-weight", "data_weights", multiple=True, metavar="DIR=W", help="Weight in the loss of every image of one --data folder (default 1); repeatable.")
@click.option("--drop", multiple=True, metavar="TASK", help="--heads-only: leave this task of the base model out; repeatable. Base tasks not named by --task or --drop are kept as they are.")
@click.option("--hidden", default=0, show_default=True, type=click.IntRange(0), help="--heads-only: 0 fits linear heads; N fits Linear(D, N) + ReLU + Linear(N, classes).")
@click.option("--task-hidden", "task_hidden", multiple=True, metavar="NAME=N", help="--heads-only: --hidden for one task; repeatable.")
@click.option("--task-epochs", "task_epochs", multiple=True, metavar="NAME=E", help="--heads-only: --epochs for one task; repeatable.")
@click.option("--from-scratch", is_flag=True, help="--heads-only: a refit head starts from zero, not from the base's head of that name.")
@click.option("--cache", type=click.Path(path_type=Path), default=None, help="--heads-only: folder of the feature cache [default: $TAGGER_CACHE/heads or ~/.cache/tagger/heads].")
@click.option("--threads", type=click.IntRange(1), default=None, help="--heads-only: inference threads [default: one per core].")
@click.option("--epochs", default=None, type=click.IntRange(1), help="[default: 15; --heads-only: 10]")
@click.option("--batch-size", default=None, type=click.IntRange(1), help="[default: 128; --heads-only: 1024]")
@click.option("--lr", default=None, type=click.FloatRange(min=0, min_open=True), help="[default: 1e-3; --heads-only: 4e-3]")
@click.option("--image-size", default=160, show_default=True, type=click.IntRange(16), help="Square input side in pixels.")
@click.option("--init", default=None, metavar="default|FILE", help="Start from a model's weights: default (the shipped model's), a checkpoint (.pt) or a tagger model (.onnx).")
@click.option("--downscale", default=0.0, show_default=True, type=click.FloatRange(0, 1), help="Probability of shrinking a training image and scaling it back up, so sharp photos also look like thumbnails.")
@click.option("--early-size", type=click.IntRange(16), default=None, help="Input side of the first --early-epochs epochs (smaller is faster; validation uses --image-size).")
@click.option("--early-epochs", default=0, show_default=True, type=click.IntRange(0), help="Epochs at --early-size.")
@click.option("--backbone", default="tf_efficientnet_lite0", show_default=True, help="Any timm model name.")
@click.option("--weights", default="imagenet", show_default=True, help="imagenet, none, or a state_dict file.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--workers", type=click.IntRange(0), default=None, help="Data-loading (decode) processes [default: cores, at most 8].")
@click.option("--limit", type=click.IntRange(1), default=None, help="Use a seeded random subset of N rows.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--resume", type=click.Path(path_type=Path), default=None, help="Continue from a run's last.pt.")
@click.option("--task", "tasks", multiple=True, metavar="NAME=COLUMN", help="Replace the default tasks (class=articleType, color=baseColour); repeatable, first is primary. --heads-only: the tasks to add or refit.")
@click.option("--task-weight", "task_weights", multiple=True, metavar="NAME=F", help="Loss weight of a task (default 1.0); repeatable.")
@click.option("--min-count", default=8, show_default=True, type=click.IntRange(1), help="Drop primary labels with fewer images (--heads-only: each task's).")
@click.option("--val-fraction", default=0.15, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True))
@click.option("--class-weight-power", default=0.3, show_default=True, type=click.FloatRange(0, 1), help="Class weight = frequency^-power; 0 = unweighted.")
@click.option("--label-smoothing", default=0.1, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option("--ema-decay", default=0.999, show_default=True, type=click.FloatRange(0, 1, max_open=True), help="Weight EMA; 0 disables.")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True, help="auto: bf16 autocast on CUDA and on CPUs with bf16 instructions (AVX512-BF16, AMX), else fp32.")
@_friendly
def train(**kw: Any) -> None:
    """Train the multi-task model on a styles.csv + images/ folder, or (--heads-only) fit task heads on a model."""
    from tagger.train import check_train_dependencies

    heads = kw["heads_only"]
    check_train_dependencies("tagger train", ("torch", "onnx") if heads else ("torch", "torchvision", "timm"))
    if not _quiet():  # a long job: its rows kept and dropped and a line per epoch by default, not only with -v
        logging.getLogger("tagger.train").setLevel(min(logging.INFO, logging.getLogger().getEffectiveLevel()))
    from tagger.contract import DEFAULT_TASKS

    heads_only = ("base", "drop", "hidden", "task_hidden", "task_epochs", "from_scratch", "cache", "threads")
    if kw.pop("heads_only"):
        _train_heads(kw)
        return
    used = [f"--{k.replace('_', '-')}" for k in heads_only if kw[k] not in (None, (), 0, False, "default")]
    if used:
        raise click.UsageError(f"{used[0]} needs --heads-only")
    if (kw["early_size"] is None) != (kw["early_epochs"] == 0):
        raise click.UsageError("--early-size and --early-epochs go together")
    for k in heads_only:
        kw.pop(k)
    from tagger.train.data import default_train_workers
    from tagger.train.loop import TrainConfig, fit

    kw["data"] = tuple(kw["data"])
    kw["data_weights"] = tuple((Path(p), w) for p, w in pairs(kw["data_weights"], "--data-weight", float))
    kw["tasks"] = pairs(kw["tasks"], "--task") or tuple(DEFAULT_TASKS.items())
    kw["task_weights"] = pairs(kw["task_weights"], "--task-weight", float)
    for k, default in (("epochs", 15), ("batch_size", 128), ("lr", 1e-3)):
        kw[k] = default if kw[k] is None else kw[k]
    if kw["workers"] is None:
        kw["workers"] = default_train_workers()
    best = fit(TrainConfig(**kw))
    _say(f"best checkpoint: {best}")


def _train_heads(kw: dict[str, Any]) -> None:
    from tagger.train.heads import HeadsConfig, train_heads

    full_only = ("image_size", "backbone", "weights", "device", "limit", "resume", "task_weights", "ema_decay", "init", "downscale", "early_size", "early_epochs")
    defaults = {"image_size": 160, "backbone": "tf_efficientnet_lite0", "weights": "imagenet", "device": "auto", "ema_decay": 0.999, "downscale": 0.0, "early_epochs": 0}
    used = [f"--{k.replace('_', '-')}" for k in full_only if kw[k] not in (None, (), defaults.get(k))]
    if used:
        raise click.UsageError(f"{used[0]} does not apply to --heads-only")
    tasks = pairs(kw["tasks"], "--task")
    config = HeadsConfig(
        base=kw["base"],
        data=tuple(kw["data"]),
        tasks=tasks,
        out=kw["out"],
        drop=tuple(kw["drop"]),
        data_weights=tuple((Path(p), w) for p, w in pairs(kw["data_weights"], "--data-weight", float)),
        hidden=kw["hidden"],
        task_hidden=task_ints(kw["task_hidden"], "--task-hidden", tasks, 0),
        task_epochs=task_ints(kw["task_epochs"], "--task-epochs", tasks, 1),
        warm_start=not kw["from_scratch"],
        **{k: kw[k] for k in ("epochs", "batch_size", "lr") if kw[k] is not None},
        label_smoothing=kw["label_smoothing"],
        class_weight_power=kw["class_weight_power"],
        min_count=kw["min_count"],
        val_fraction=kw["val_fraction"],
        seed=kw["seed"],
        cache=kw["cache"],
        workers=kw["workers"],
        threads=kw["threads"],
    )
    _say(f"model: {train_heads(config)}")


@main.command("run")
@click.argument("catalog")
@click.option("--out", "out", required=True, help="Parquet file to write, local or a URI such as s3://bucket/tags.parquet (replaced only on success).")
@click.option("--model", type=click.Path(path_type=Path), default=None, help="Exported .onnx model, or a shipped one: default, default-int8 (faster on CPUs) [default: default].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="auto: CUDA when it really works, else CPU; cuda: fail unless it works.")
@click.option("--batch-size", default=None, type=click.IntRange(1), help="Images per inference call [default: 64 on CPU, 256 on CUDA].")
@click.option("--workers", type=click.IntRange(0), default=None, help="Decode processes; 0 or 1 decodes in-process [default: one per core].")
@click.option("--threads", type=click.IntRange(1), default=None, help="Inference threads [default: one per core, shared with the decode workers].")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(0), help="Also write the K best labels per task as <task>_topk.")
@click.option("--embeddings", is_flag=True, help="Also write the model's L2-normalised image embedding as the column embedding (fixed-size list of float16), for similarity and duplicate search.")
@click.option("--ext", default=None, metavar="LIST", help="Extensions to tag, comma-separated [default: jpg,jpeg,jfif,png,webp,avif,bmp,gif,tif,tiff].")
@click.option("--max-pixels", default=None, type=click.IntRange(1), help="Refuse images with more pixels (error row) [default: 150000000].")
@click.option("--decode-memory", default="4GiB", show_default=True, type=Bytes(), help="Decoding all decode workers may hold at once (e.g. 512MiB): a large image waits for room; one larger than this is an error row.")
@click.option("--files-from", default=None, help="Tag the paths listed in this file (relative to CATALOG, absolute, or URIs) instead of walking CATALOG; may itself be a URI.")
@click.option("--io-threads", default=None, type=click.IntRange(1), help="Concurrent object-store reads per decode worker (a CATALOG in a bucket) [default: 16].")
@click.option("--incremental", is_flag=True, help="Reuse the rows of --out for unchanged files (same path, size and mtime, same model); tag new and changed ones; drop deleted ones.")
@click.option("--retry-errors", is_flag=True, help="--incremental: also tag files with an error row again, even when unchanged.")
@click.option("--checksum", is_flag=True, help="--incremental: also read and hash files whose path, size and mtime match, and tag them again when their bytes changed.")
@click.option("--allow-other-catalog", is_flag=True, help="--incremental: reuse the rows of an --out written from another catalog (moved), by path, size and mtime.")
@click.option("--keep-stale-model", is_flag=True, help="--incremental: reuse rows written by another model instead of tagging everything again.")
@click.option("--resume", is_flag=True, help="Reuse the rows an interrupted run committed to OUT.work/ (--incremental does too).")
@click.option("--commit-every", default=10_000, show_default=True, type=click.IntRange(0), metavar="N", help="Commit tagged rows to OUT.work/ every N images (0: not by count).")
@click.option("--commit-seconds", default=60.0, show_default=True, type=click.FloatRange(0), metavar="T", help="... or every T seconds (0: not by time).")
@click.option("--max-errors", default="50%", show_default=True, metavar="N|P%", help="Fail the run (exit 1, the previous output stays) when its output would hold more error rows than N, or than P% of its rows.")
@click.option("--shard", default=None, metavar="I/N", help="Tag only shard I of N (by a stable hash of each path); `tagger merge` joins the N outputs.")
@click.option("--engine", type=click.Choice(list(ENGINES)), default="local", show_default=True, help="ray: run on Ray Data (needs the ray extra); --out may then also name a folder of part files.")
@click.option("--ray-address", default=None, metavar="ADDR", help="--engine ray: join this cluster ('auto', 'ray://head:10001') [default: start a local Ray instance].")
@click.option("--num-gpus-per-actor", type=click.FloatRange(0), default=None, help="--engine ray: GPUs per inference actor, fractions share a GPU [default: 1 with a GPU and --device auto/cuda, else 0].")
@click.option("--actors", type=click.IntRange(1), default=None, help="--engine ray: inference actors [default: cluster GPUs / --num-gpus-per-actor, or 1].")
@_friendly
def run_command(
    catalog: str, out: str, ext: str | None, max_pixels: int | None, io_threads: int | None, **kw: Any
) -> None:
    """Tag every photo under CATALOG (a folder, or s3://bucket/prefix, gs://..., any pyarrow.fs URI) into a
    Parquet file: one row per file, errors included."""
    from tagger import ErrorLimit, RunConfig
    from tagger.engines import execute
    from tagger.pipeline.discover import parse_extensions

    # A scheduler's SIGTERM unwinds like Ctrl-C, so the half-written temp output is removed.
    signal.signal(signal.SIGTERM, _terminate)
    if ext is not None:
        kw["extensions"] = parse_extensions(ext)
    if max_pixels is not None:
        kw["max_pixels"] = max_pixels
    kw["max_errors"] = ErrorLimit.parse(kw["max_errors"])
    if io_threads is not None:  # else RunConfig's default (decode.DEFAULT_IO_THREADS), not imported by --help
        kw["io_threads"] = io_threads
    if kw["shard"] is not None:
        from tagger.nightly.shard import Shard

        kw["shard"] = Shard.parse(kw["shard"])
    engine = kw.pop("engine")
    options = {"address": kw.pop("ray_address"), "actors": kw.pop("actors"), "num_gpus_per_actor": kw.pop("num_gpus_per_actor")}
    if _quiet():
        kw["progress"] = False
    summary = execute(engine, RunConfig(catalog=catalog, out=out, **kw), options)
    _say(summary.line())


@main.command("merge")
@click.argument("out")
@click.argument("shards", nargs=-1, required=True)
@_friendly
def merge_command(out: str, shards: tuple[str, ...]) -> None:
    """Merge the outputs of `tagger run --shard I/N` (all N) into OUT, as one unsharded run would have written it."""
    from tagger.nightly.shard import merge_shards

    _say(merge_shards(out, shards).line())


@main.command("eval")
@click.option("--data", "data", type=click.Path(path_type=Path), required=True, help="Folder with styles.csv and images/<id>.jpg.")
@click.option("--model", type=click.Path(path_type=Path), default=None, help="Exported .onnx model, or a shipped one: default, default-int8 (faster on CPUs) [default: default].")
@click.option("--report", type=click.Path(path_type=Path), default=None, help="Also write a self-contained HTML report (needs the report extra).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--batch-size", default=None, type=click.IntRange(1), help="Images per inference call [default: 64 on CPU, 256 on CUDA].")
@click.option("--workers", type=click.IntRange(0), default=None, help="Decode processes; 0 or 1 decodes in-process [default: one per core].")
@click.option("--threads", type=click.IntRange(1), default=None, help="Inference threads [default: one per core].")
@click.option("--task", "tasks", multiple=True, metavar="NAME=COLUMN", help="Score model task NAME against styles.csv COLUMN [default: class=articleType, color=baseColour]; repeatable.")
@click.option("--mistakes", default=24, show_default=True, type=click.IntRange(0), help="Most confident mistakes shown per task in the report.")
@click.option("--show-confusions", default=5, show_default=True, type=click.IntRange(0), help="Print the N most frequent confusions per task.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Score a random sample of N rows of styles.csv (seeded: the same rows each time).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1), help="Seed of the --limit sample.")
@_friendly
def eval_command(report: Path | None, show_confusions: int, **kw: Any) -> None:
    """Score a model on a labelled styles.csv + images/ folder, tagged exactly as `tagger run` tags."""
    from tagger.evaluate import EvalConfig, check_report_path, evaluate
    from tagger.report import check_report_dependencies, write_report

    kw["tasks"] = pairs(kw["tasks"], "--task")
    config = EvalConfig(**kw)
    if report is not None:  # before the run, not after it
        check_report_dependencies()
        check_report_path(report, config)
    result = evaluate(config)
    click.echo("\n".join(result.lines(show_confusions)))  # what eval is for: printed with -q too
    if report is not None:
        click.echo(f"report: {write_report(result, report)}")


@main.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None, help="ONNX file to write [default: CHECKPOINT with suffix .onnx, or .fp16.onnx with --fp16].")
@click.option("--fp16", is_flag=True, help="Half-precision variant for GPUs (still uint8 in, float32 out); usually slower than fp32 on CPU.")
@click.option("--opset", type=int, default=None, help="ONNX opset, 18 or newer [default: 18].")
@click.option("--check-image", "check_images", multiple=True, type=click.Path(path_type=Path), help="Extra photo for the PyTorch-vs-ONNX parity check; repeatable.")
@click.option("--weights-out", type=click.Path(path_type=Path), default=None, help="Also write the checkpoint's weights alone in fp16 (what `tagger train --init` reads) and export from exactly those.")
@_friendly
def export_command(checkpoint: Path, out: Path | None, fp16: bool, opset: int | None, check_images: tuple[Path, ...], weights_out: Path | None) -> None:
    """Export a training checkpoint to the single-file ONNX model `tagger run` serves, verified against PyTorch."""
    from tagger.train import check_train_dependencies

    check_train_dependencies("tagger export", ("torch", "onnx"))
    from tagger.export import export_checkpoint

    if weights_out is not None:
        from tagger.train.checkpoint import save_weights

        checkpoint = save_weights(checkpoint, weights_out)
        _say(f"weights: {weights_out}")
    report = export_checkpoint(checkpoint, out, fp16=fp16, opset=opset, check_images=check_images or None)
    _say(report.summary())


@main.command("quantize")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--images", type=click.Path(path_type=Path), required=True, help="Folder of photos like the catalog's, to calibrate and check on.")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None, help="ONNX file to write [default: MODEL with suffix .int8.onnx].")
@click.option("--limit", "n_images", default=512, show_default=True, type=click.IntRange(48), help="Photos sampled from --images: 3/4 calibrate, 1/4 check.")
@click.option("--min-agreement", default=0.95, show_default=True, type=click.FloatRange(0, 1), help="Least top-1 agreement with MODEL per task on the check photos.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the photo sample.")
@_friendly
def quantize_command(model: Path, images: Path, out: Path | None, n_images: int, min_agreement: float, seed: int) -> None:
    """Quantize an exported model to int8 for CPUs, calibrated on real photos and checked against MODEL."""
    from tagger.quantize import quantize_model

    report = quantize_model(model, images, out, n_images=n_images, min_agreement=min_agreement, seed=seed)
    _say(report.summary())


@main.command("calibrate")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", "data", type=click.Path(path_type=Path), required=True, help="Labelled folder (styles.csv and images/<id>.jpg) the model did not train on.")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None, help="ONNX file to write [default: MODEL with suffix .calibrated.onnx].")
@click.option("--task", "tasks", multiple=True, metavar="NAME=COLUMN", help="Fit model task NAME on styles.csv COLUMN [default: class=articleType, color=baseColour]; repeatable.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--workers", type=click.IntRange(0), default=None, help="Decode processes; 0 or 1 decodes in-process [default: one per core].")
@click.option("--threads", type=click.IntRange(1), default=None, help="Inference threads [default: one per core].")
@_friendly
def calibrate_command(model: Path, data: Path, out: Path | None, tasks: tuple[str, ...], **kw: Any) -> None:
    """Rescale a model's scores so they match how often its top-1 label is right; no label changes."""
    from tagger.calibrate import calibrate_model

    report = calibrate_model(model, data, out, task_columns=pairs(tasks, "--task"), **kw)
    _say(report.summary())


@main.command("dupes")
@click.argument("table")
@click.option("-o", "--out", required=True, help="Parquet file of the groups to write: one row per photo in a group.")
@click.option("--threshold", default=DEFAULT_THRESHOLD, show_default=True, type=click.FloatRange(0, 1, min_open=True), help="Cosine of two embeddings at or above which the photos are near-duplicates.")
@click.option("--report", type=click.Path(path_type=Path), default=None, help="Also write a self-contained HTML page of the groups, disagreeing ones first.")
@_friendly
def dupes_command(table: str, out: str, threshold: float, report: Path | None) -> None:
    """Group the duplicate photos of a `tagger run --embeddings` TABLE: byte-identical (same sha256) and near
    (cosine >= --threshold), as connected components."""
    from tagger.output.writer import check_parquet_name
    from tagger.report import write_dupes_report
    from tagger.similar import check_dupes_outputs, dupes, write_groups

    check_parquet_name(out, "-o")  # before minutes of grouping
    result = dupes(table, threshold)
    check_dupes_outputs(table, out, report, result.catalog)
    write_groups(result, out, table)
    _say(f"{result.line()} -> {out}")
    if report is not None:
        _say(f"report: {write_dupes_report(result, report)}")


@main.command("similar")
@click.argument("table")
@click.argument("queries", nargs=-1, required=True)
@click.option("-k", "k", default=DEFAULT_K, show_default=True, type=click.IntRange(1), help="Neighbours per query.")
@click.option("--model", type=click.Path(path_type=Path), default=None, help="Model to embed a query image with; it must be the one TABLE was made with [default: the shipped model of that sha256].")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@_friendly
def similar_command(table: str, queries: tuple[str, ...], k: int, model: Path | None, as_json: bool) -> None:
    """The K photos of a `tagger run --embeddings` TABLE nearest to each QUERY: a path in TABLE, or an image file
    embedded with TABLE's model."""
    import json

    from tagger.similar import similar

    results = similar(table, queries, k=k, model=model)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        click.echo("\n".join(line for r in results for line in r.lines()))


@main.command("info")
@click.argument("model", type=click.Path(path_type=Path), required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
@click.option("--all-labels", is_flag=True, help="List every label [default: the first 12 per task].")
@_friendly
def info_command(model: Path | None, as_json: bool, all_labels: bool) -> None:
    """Show what an ONNX model carries: tasks and labels, preprocessing, provenance.

    MODEL: an exported .onnx file, or a shipped model by name: default, default-int8 [default: default].
    """
    import json

    from tagger.model.info import describe, read_model_metadata
    from tagger.model.registry import resolve_model

    info = read_model_metadata(resolve_model(model))
    click.echo(json.dumps(info.to_dict(), indent=2) if as_json else describe(info, max_labels=0 if all_labels else 12))


if __name__ == "__main__":
    main()
