"""`tagger eval`: tag a labelled styles.csv + images/ folder through the `tagger run` pipeline and score it."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from tagger.contract import DEFAULT_TASKS, TaskSpec
from tagger.errors import TaggerError, UsageError
from tagger.guards import check_no_input
from tagger.labelled import LabelledFolder, load_labelled_folder
from tagger.metrics import IGNORE, calibration_error, confusion_matrix, per_class, summarize
from tagger.model.info import task_columns
from tagger.model.registry import resolve_model
from tagger.pipeline.decode import DEFAULT_MAX_PIXELS, Failure
from tagger.pipeline.discover import ImageRef
from tagger.compose import check_stage_options, decoded_batches, tag_batches
from tagger.pipeline.session import default_batch_size, default_inflight, open_session

log = logging.getLogger(__name__)

DEFAULT_MISTAKES = 24  # most confident mistakes kept per task for the report
EXAMPLES_KEPT = 20  # decode errors / missing ids listed by id
SCORE_THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)  # top-1 scores at which coverage and accuracy are measured


@dataclass(frozen=True)
class EvalConfig:
    """What `tagger eval` needs. `tasks` overrides task -> styles.csv column (defaults: contract.DEFAULT_TASKS)."""

    data: Path  # a labelled folder: styles.csv and images/<id>.jpg (tagger.labelled)
    model: Path | None = None  # None: the shipped default model; a shipped model by name, e.g. "default-int8"
    device: str = "auto"  # auto | cpu | cuda
    batch_size: int | None = None  # None: 64 on CPU, 256 on CUDA
    workers: int | None = None  # decode processes; None: one per core; 0 or 1: decode in this process
    threads: int | None = None  # inference intra-op threads; None: one per core
    tasks: tuple[tuple[str, str], ...] = ()  # (task, column) overrides
    mistakes: int = DEFAULT_MISTAKES  # most confident mistakes kept per task
    max_pixels: int = DEFAULT_MAX_PIXELS
    progress: bool | None = None  # None: a progress bar on a terminal only
    limit: int | None = None  # score a seeded random sample of this many rows of styles.csv
    seed: int = 0  # of the limit sample

    def __post_init__(self) -> None:
        check_stage_options(self.batch_size, self.workers, self.threads)
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"--limit must be at least 1, got {self.limit}")
        if self.mistakes < 0:
            raise UsageError(f"--mistakes must be >= 0, got {self.mistakes}")


@dataclass(frozen=True)
class Mistake:
    """A scored row predicted wrong: its id, image file, true and predicted labels and the predicted label's score."""

    id: str
    path: Path
    true: str
    predicted: str
    score: float


@dataclass(frozen=True, eq=False)
class TaskResult:
    """One task's scores. Only decoded rows count; `labelled` = `scored` (label known to the model) + `unknown`."""

    name: str
    column: str
    labels: tuple[str, ...]  # the model's labels; index i of `confusion` is labels[i]
    labelled: int
    scored: int
    unknown: int  # rows whose label the model does not know: always wrong, left out of the confusion matrix
    unlabelled: int  # rows with an empty label: not counted anywhere else
    correct: int
    macro_f1: float  # over scored rows, classes seen in truth or predictions
    balanced_acc: float  # mean recall over classes present in truth
    calibration_error: float  # ECE of the top-1 score over scored rows (tagger.metrics.calibration_error)
    mean_score: float  # mean top-1 score over scored rows; compare with top1_known
    # (threshold, coverage, accuracy) over scored rows: the share whose top-1 score is >= threshold, and how many of
    # those are right; what auto-accepting rows above a score would give.
    by_threshold: tuple[tuple[float, float, float], ...]
    confusion: np.ndarray  # int64 [C, C], rows = true, columns = predicted; scored rows only
    unknown_labels: Mapping[str, int] = field(default_factory=dict)  # label -> rows, most frequent first
    mistakes: tuple[Mistake, ...] = ()  # most confident first

    @property
    def top1_all(self) -> float:
        """Accuracy over every labelled row, unknown labels counted as wrong."""
        return self.correct / self.labelled if self.labelled else float("nan")

    @property
    def top1_known(self) -> float:
        """Accuracy over the rows whose label the model knows."""
        return self.correct / self.scored if self.scored else float("nan")

    def per_class(self) -> dict[str, np.ndarray]:
        """precision, recall, f1, support, predicted: float64 [C] each (tagger.metrics.per_class)."""
        return per_class(self.confusion)

    def top_confusions(self, n: int) -> list[tuple[str, str, int]]:
        """The n most frequent (true, predicted, count) pairs with true != predicted; ties in label order."""
        off = self.confusion.copy()
        np.fill_diagonal(off, 0)
        flat = np.argsort(-off, axis=None, kind="stable")[:n]
        c = len(self.labels)
        return [(self.labels[i // c], self.labels[i % c], int(off.flat[i])) for i in flat if off.flat[i] > 0]

    def line(self) -> str:
        f = format_score
        return (
            f"{self.name} ({self.column}): top-1 {f(self.top1_all)} all ({self.correct}/{self.labelled}), "
            f"{f(self.top1_known)} known labels ({self.correct}/{self.scored}); macro-F1 {f(self.macro_f1)}, "
            f"balanced acc {f(self.balanced_acc)}; calibration error {f(self.calibration_error)} (mean score "
            f"{f(self.mean_score)}); rows {self.labelled}, scored {self.scored}, "
            f"unknown labels {self.unknown}, unlabelled {self.unlabelled}"
        )


@dataclass(frozen=True, eq=False)
class EvalResult:
    """The evaluation of one model on one labelled folder."""

    data: Path
    model: Path
    model_sha256: str
    provider: str
    rows: int  # styles.csv rows
    missing: int  # rows without an image file
    decode_errors: int
    tasks: tuple[TaskResult, ...]
    elapsed_s: float
    missing_ids: tuple[str, ...] = ()  # the first few
    error_examples: tuple[tuple[str, str], ...] = ()  # (id, error) of the first few decode errors

    @property
    def decoded(self) -> int:
        return self.rows - self.missing - self.decode_errors

    def task(self, name: str) -> TaskResult:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    def lines(self, confusions: int = 0) -> list[str]:
        """What `tagger eval` prints: a counts line, then one line per task (and its top confusions)."""
        out = [
            f"{self.rows} rows: {self.decoded} decoded, {self.decode_errors} decode errors, {self.missing} without "
            f"an image file; {self.model.name} on {self.provider}, {self.elapsed_s:.1f} s"
        ]
        for t in self.tasks:
            out.append(t.line())
            if t.unknown_labels:
                shown = ", ".join(f"{k} ({v})" for k, v in list(t.unknown_labels.items())[:8])
                more = len(t.unknown_labels) - 8
                out.append(f"  unknown labels: {shown}" + (f", ... {more} more" if more > 0 else ""))
            for true, pred, n in t.top_confusions(confusions):
                out.append(f"  {true} -> {pred}: {n}")
        return out


def format_score(x: float) -> str:
    return "n/a" if np.isnan(x) else f"{x:.3f}"


@dataclass
class _Collected:
    """Per image file handed to the pipeline, in order: predicted label index and score per task."""

    ok: list[np.ndarray] = field(default_factory=list)  # bool [k] per batch
    index: dict[str, list[np.ndarray]] = field(default_factory=dict)  # int64 [k] per batch, -1 on error rows
    score: dict[str, list[np.ndarray]] = field(default_factory=dict)  # float32 [k] per batch


def resolve_tasks(
    model_tasks: Sequence[TaskSpec],
    overrides: Sequence[tuple[str, str]],
    folder: LabelledFolder,
    columns: Mapping[str, str] = DEFAULT_TASKS,
) -> list[tuple[TaskSpec, str]]:
    """The model's tasks paired with their styles.csv columns: an override, else the column the model records
    (`columns`, model.info.task_columns), else the task's own name; a column absent from the csv skips its task."""
    names = [t.name for t in model_tasks]
    for name, _ in overrides:
        if name not in names:
            raise TaggerError(f"--task {name}: the model has no task {name!r}; its tasks: {', '.join(names)}")
    explicit = dict(overrides)
    out: list[tuple[TaskSpec, str]] = []
    for t in model_tasks:
        if t.name in explicit:
            column = explicit[t.name]
            folder.require_column(column, f"--task {t.name}={column}")
        else:
            column = columns.get(t.name, t.name)
            if column not in folder.columns:
                log.warning(
                    "task %r: no column %r in %s; not scored (use --task %s=COLUMN)",
                    t.name, column, folder.csv_path, t.name,
                )
                continue
        out.append((t, column))
    if not out:
        raise TaggerError(f"no task of the model maps to a column of {folder.csv_path}; use --task NAME=COLUMN")
    return out



def check_report_path(report: Path, config: EvalConfig) -> None:
    """TaggerError when a report at `report` would overwrite an input: the model, styles.csv or a photo of the
    labelled folder."""
    sources = {"model": resolve_model(config.model), "labels file": config.data / "styles.csv"}
    check_no_input(report, what="report", sources=sources, catalog=config.data, catalog_kind="the labelled folder",
                   reader="that tagger eval reads")  # fmt: skip

def evaluate(config: EvalConfig) -> EvalResult:
    """Tag the image of every row of config.data/styles.csv with the `tagger run` stages and score each task.

    Rows without an image file and images that fail to decode are counted, not scored. A label the model does not
    know counts as wrong in the all-rows accuracy and is left out of everything else.
    """
    t_start = time.perf_counter()
    folder = load_labelled_folder(config.data, config.limit, config.seed)
    refs = folder.refs
    session = open_session(config.model, config.device, config.threads)
    tasks = resolve_tasks(session.tasks, config.tasks, folder, task_columns(session.info))
    log.info("evaluating %s on %d images of %s (%s)", session.path.name, len(refs), folder.root, session.provider)

    got = _Collected(index={t.name: [] for t, _ in tasks}, score={t.name: [] for t, _ in tasks})
    errors: list[tuple[int, str]] = []  # (ref position, error)
    show_bar = config.progress if config.progress is not None else sys.stderr.isatty()
    with contextlib.ExitStack() as stack:
        batch_size = config.batch_size or default_batch_size(session.provider)
        decoded = decoded_batches(refs, session.spec, batch_size, config.workers, config.max_pixels)
        batches = stack.enter_context(contextlib.closing(decoded))
        bar = stack.enter_context(
            tqdm(total=len(refs), unit="img", disable=not show_bar, dynamic_ncols=True, file=sys.stderr)
        )
        pos = 0
        for batch, table in tag_batches(batches, session, inflight=default_inflight(session.provider)):
            ok = np.array([not isinstance(r, Failure) for r in batch.results], dtype=bool)  # [k]
            got.ok.append(ok)
            errors += [(pos + j, r.error) for j, r in enumerate(batch.results) if isinstance(r, Failure)]
            for t, _ in tasks:
                got.index[t.name].append(_label_indices(table, t))
                got.score[t.name].append(table.column(f"{t.name}_score").to_numpy(zero_copy_only=False))
            pos += len(batch)
            bar.update(len(batch))

    ok = np.concatenate(got.ok)  # [M]
    truth_rows = [folder.rows[i] for i in folder.ref_rows]
    results = tuple(
        _score_task(
            t, column, folder.truth(column), ok, np.concatenate(got.index[t.name]),
            np.concatenate(got.score[t.name]), refs, truth_rows, config.mistakes,
        )
        for t, column in tasks
    )  # fmt: skip
    result = EvalResult(
        data=folder.root,
        model=session.path,
        model_sha256=session.info.sha256,
        provider=session.provider,
        rows=len(folder.rows),
        missing=len(folder.missing_ids),
        decode_errors=len(errors),
        tasks=results,
        elapsed_s=time.perf_counter() - t_start,
        missing_ids=tuple(folder.missing_ids[:EXAMPLES_KEPT]),
        error_examples=tuple((truth_rows[p].get("id", ""), e) for p, e in errors[:EXAMPLES_KEPT]),
    )
    log.info("evaluated %d rows in %.1f s", result.rows, result.elapsed_s)
    return result


def _label_indices(table: pa.Table, task: TaskSpec) -> np.ndarray:
    """The task's dictionary column of `tag_batches` output -> int64 [k] indices into task.labels, -1 on error rows."""
    col = table.column(task.name).combine_chunks()  # DictionaryArray
    lookup = {label: i for i, label in enumerate(task.labels)}
    remap = np.array([lookup[x] for x in col.dictionary.to_pylist()] + [-1], dtype=np.int64)
    return remap[col.indices.fill_null(-1).to_numpy(zero_copy_only=False)]


def truth_indices(task: TaskSpec, truth: Sequence[str]) -> np.ndarray:
    """Labels -> int64 indices into task.labels; IGNORE for a label the model does not know or an empty one."""
    lookup = {label: i for i, label in enumerate(task.labels)}
    return np.array([lookup.get(x, IGNORE) for x in truth], dtype=np.int64)


def _score_task(
    task: TaskSpec,
    column: str,
    truth: list[str],  # [M] labels of the rows with an image file
    ok: np.ndarray,  # bool [M]
    pred: np.ndarray,  # int64 [M], -1 where not ok
    score: np.ndarray,  # float32 [M]
    refs: Sequence[ImageRef],
    rows: Sequence[Mapping[str, str]],
    n_mistakes: int,
) -> TaskResult:
    true = truth_indices(task, truth)  # [M]
    has_label = np.array([bool(x) for x in truth], dtype=bool)
    labelled = ok & has_label
    scored = labelled & (true != IGNORE)
    unknown = labelled & ~scored
    correct = scored & (pred == true)
    y_true = np.where(scored, true, IGNORE)[ok]
    summary = summarize(y_true, pred[ok], len(task.labels))
    cm = confusion_matrix(y_true, pred[ok], len(task.labels))
    unknown_labels = Counter(truth[i] for i in np.flatnonzero(unknown))
    wrong = np.flatnonzero(scored & ~correct)
    order = wrong[np.argsort(-score[wrong], kind="stable")][:n_mistakes]
    mistakes = tuple(
        Mistake(rows[i].get("id", ""), Path(refs[i].abspath), truth[i], task.labels[pred[i]], float(score[i]))
        for i in order
    )
    return TaskResult(
        name=task.name,
        column=column,
        labels=task.labels,
        labelled=int(labelled.sum()),
        scored=int(scored.sum()),
        unknown=int(unknown.sum()),
        unlabelled=int((ok & ~has_label).sum()),
        correct=int(correct.sum()),
        macro_f1=summary["macro_f1"],
        balanced_acc=summary["balanced_acc"],
        calibration_error=calibration_error(score[scored], correct[scored]),
        mean_score=float(score[scored].mean()) if scored.any() else float("nan"),
        by_threshold=_by_threshold(score[scored], correct[scored]),
        confusion=cm,
        unknown_labels=dict(unknown_labels.most_common()),
        mistakes=mistakes,
    )


def _by_threshold(score: np.ndarray, correct: np.ndarray) -> tuple[tuple[float, float, float], ...]:
    out = []
    for threshold in SCORE_THRESHOLDS:
        above = score >= threshold
        accuracy = float(correct[above].mean()) if above.any() else float("nan")
        out.append((threshold, float(above.mean()) if len(score) else float("nan"), accuracy))
    return tuple(out)


__all__ = [
    "EvalConfig",
    "EvalResult",
    "Mistake",
    "TaskResult",
    "evaluate",
    "format_score",
    "resolve_tasks",
    "truth_indices",
]
