"""Thin Click CLI: parse and check arguments, call the library, turn TaggerError into one line and an exit code."""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

import click

from tagger import __version__
from tagger.errors import TaggerError

F = TypeVar("F", bound=Callable[..., Any])


def _friendly(fn: F) -> F:
    """Run a command, mapping expected failures to one clear line on stderr instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TaggerError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tagger")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only.")
def main(verbose: bool, quiet: bool) -> None:
    """Tag product photos with their article class and colour."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _pairs(values: tuple[str, ...], option: str, convert: Callable[[str], Any] = str) -> tuple[tuple[str, Any], ...]:
    """Parse repeated NAME=VALUE options."""
    out = []
    for v in values:
        name, sep, value = v.partition("=")
        if not sep or not name or not value:
            raise click.BadParameter(f"expected NAME=VALUE, got {v!r}", param_hint=option)
        try:
            out.append((name, convert(value)))
        except ValueError:
            raise click.BadParameter(f"bad value in {v!r}", param_hint=option) from None
    return tuple(out)


@main.command()
@click.option("--data", "data", type=click.Path(path_type=Path), required=True, help="Folder with styles.csv and images/<id>.jpg.")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Run directory to write.")
@click.option("--epochs", default=15, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--image-size", default=128, show_default=True, type=click.IntRange(16), help="Square input side in pixels.")
@click.option("--backbone", default="tf_efficientnet_lite0", show_default=True, help="Any timm model name.")
@click.option("--weights", default="imagenet", show_default=True, help="imagenet, none, or a state_dict file.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--workers", type=click.IntRange(0), default=None, help="Data-loading processes [default: cores, at most 8].")
@click.option("--limit", type=click.IntRange(1), default=None, help="Use a seeded random subset of N rows.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--resume", type=click.Path(path_type=Path), default=None, help="Continue from a run's last.pt.")
@click.option("--task", "tasks", multiple=True, metavar="NAME=COLUMN", help="Replace the default tasks (class=articleType, color=baseColour); repeatable, first is primary.")
@click.option("--task-weight", "task_weights", multiple=True, metavar="NAME=F", help="Loss weight of a task (default 1.0); repeatable.")
@click.option("--min-count", default=8, show_default=True, type=click.IntRange(1), help="Drop primary labels with fewer images.")
@click.option("--val-fraction", default=0.15, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True))
@click.option("--class-weight-power", default=0.5, show_default=True, type=click.FloatRange(0, 1), help="Class weight = frequency^-power; 0 = unweighted.")
@click.option("--label-smoothing", default=0.1, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option("--ema-decay", default=0.999, show_default=True, type=click.FloatRange(0, 1, max_open=True), help="Weight EMA; 0 disables.")
@_friendly
def train(**kw: Any) -> None:
    """Train the multi-task model on a styles.csv + images/ folder."""
    from tagger.contract import DEFAULT_TASKS
    from tagger.train.data import default_workers
    from tagger.train.loop import TrainConfig, fit

    kw["tasks"] = _pairs(kw["tasks"], "--task") or tuple(DEFAULT_TASKS.items())
    kw["task_weights"] = _pairs(kw["task_weights"], "--task-weight", float)
    if kw["workers"] is None:
        kw["workers"] = default_workers()
    best = fit(TrainConfig(**kw))
    click.echo(f"best checkpoint: {best}")


if __name__ == "__main__":
    main()
