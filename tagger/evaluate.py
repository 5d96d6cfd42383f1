"""`tagger eval`: tag a labelled styles.csv + images/ folder through the `tagger run` pipeline and score it."""

from __future__ import annotations

import base64
import contextlib
import html
import importlib
import io
import logging
import os
import stat
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from tagger.contract import DEFAULT_TASKS, PreprocessSpec, TaskSpec
from tagger.errors import TaggerError
from tagger.metrics import IGNORE, calibration_error, confusion_matrix, per_class, summarize
from tagger.pipeline.decode import DECODE_ERRORS, DEFAULT_MAX_PIXELS, Failure, load_image
from tagger.pipeline.discover import ImageRef
from tagger.pipeline.compose import check_stage_options, decoded_batches, tag_batches
from tagger.pipeline.session import default_batch_size, default_inflight, open_session
from tagger.train.data import read_styles  # torch-free: csv, numpy, PIL only

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

DEFAULT_MISTAKES = 24  # most confident mistakes kept per task for the report
DEFAULT_MAX_CLASSES = 30  # classes drawn in a report's confusion matrix
EXAMPLES_KEPT = 20  # decode errors / missing ids listed by id
SCORE_THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)  # top-1 scores at which a report shows coverage and accuracy
THUMB_SIZE = 160
REPORT_EXTRA = 'pip install "tagger[report]"'


@dataclass(frozen=True)
class EvalConfig:
    """What `tagger eval` needs. `tasks` overrides task -> styles.csv column (defaults: contract.DEFAULT_TASKS)."""

    data: Path  # folder with styles.csv and images/<id>.jpg
    model: Path | None = None  # None: the shipped default model; a shipped model by name, e.g. "default-int8"
    device: str = "auto"  # auto | cpu | cuda
    batch_size: int | None = None  # None: 64 on CPU, 256 on CUDA
    workers: int | None = None  # decode processes; None: one per core; 0 or 1: decode in this process
    threads: int | None = None  # inference intra-op threads; None: one per core
    tasks: tuple[tuple[str, str], ...] = ()  # (task, column) overrides
    mistakes: int = DEFAULT_MISTAKES  # most confident mistakes kept per task
    max_pixels: int = DEFAULT_MAX_PIXELS
    progress: bool | None = None  # None: a progress bar on a terminal only

    def __post_init__(self) -> None:
        check_stage_options(self.batch_size, self.workers, self.threads)
        if self.mistakes < 0:
            raise TaggerError(f"--mistakes must be >= 0, got {self.mistakes}")


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
        return (
            f"{self.name} ({self.column}): top-1 {_fmt(self.top1_all)} all ({self.correct}/{self.labelled}), "
            f"{_fmt(self.top1_known)} known labels ({self.correct}/{self.scored}); macro-F1 {_fmt(self.macro_f1)}, "
            f"balanced acc {_fmt(self.balanced_acc)}; calibration error {_fmt(self.calibration_error)} (mean score "
            f"{_fmt(self.mean_score)}); rows {self.labelled}, scored {self.scored}, "
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
    missing: int  # rows without an images/<id>.jpg file
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


def _fmt(x: float) -> str:
    return "n/a" if np.isnan(x) else f"{x:.3f}"


@dataclass
class _Collected:
    """Per image file handed to the pipeline, in order: predicted label index and score per task."""

    ok: list[np.ndarray] = field(default_factory=list)  # bool [k] per batch
    index: dict[str, list[np.ndarray]] = field(default_factory=dict)  # int64 [k] per batch, -1 on error rows
    score: dict[str, list[np.ndarray]] = field(default_factory=dict)  # float32 [k] per batch


def _image_ref(root: Path, row_id: str) -> ImageRef | None:
    """images/<id>.jpg as an ImageRef, or None when it is not a file."""
    abspath = str(root / "images" / f"{row_id}.jpg")
    try:
        st = os.stat(abspath)  # follows symlinks
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return ImageRef(f"images/{row_id}.jpg", abspath, st.st_size, st.st_mtime)


def resolve_tasks(
    model_tasks: Sequence[TaskSpec], overrides: Sequence[tuple[str, str]], columns: set[str], csv_path: Path
) -> list[tuple[TaskSpec, str]]:
    """The model's tasks paired with their styles.csv columns; a default column absent from the csv skips its task."""
    names = [t.name for t in model_tasks]
    for name, _ in overrides:
        if name not in names:
            raise TaggerError(f"--task {name}: the model has no task {name!r}; its tasks: {', '.join(names)}")
    explicit = dict(overrides)
    out: list[tuple[TaskSpec, str]] = []
    for t in model_tasks:
        if t.name in explicit:
            column = explicit[t.name]
            if column not in columns:
                raise TaggerError(
                    f"--task {t.name}={column}: no column {column!r} in {csv_path}; columns: {sorted(columns)}"
                )
        else:
            column = DEFAULT_TASKS.get(t.name, t.name)
            if column not in columns:
                log.warning(
                    "task %r: no column %r in %s; not scored (use --task %s=COLUMN)", t.name, column, csv_path, t.name
                )
                continue
        out.append((t, column))
    if not out:
        raise TaggerError(f"no task of the model maps to a column of {csv_path}; use --task NAME=COLUMN")
    return out


@dataclass(frozen=True)
class LabelledFolder:
    """A styles.csv and the images/<id>.jpg files found for its rows."""

    root: Path
    csv_path: Path
    rows: list[dict[str, str]]
    columns: set[str]
    refs: list[ImageRef]  # one per row with an image file, in csv order
    ref_rows: list[int]  # the csv row of each ref
    missing_ids: list[str]  # ids of the rows without an image file

    def truth(self, column: str) -> list[str]:
        """The column's label of each ref's row ('' where empty)."""
        return [self.rows[i].get(column, "") for i in self.ref_rows]


def load_labelled_folder(root: Path) -> LabelledFolder:
    """Read root/styles.csv and find images/<id>.jpg for each row; TaggerError when nothing can be scored."""
    csv_path = root / "styles.csv"
    if not root.is_dir():
        raise TaggerError(f"data folder {root} does not exist")
    if not csv_path.is_file():
        raise TaggerError(f"{csv_path} not found: expected styles.csv and images/<id>.jpg")
    rows = read_styles(csv_path)
    if not rows:
        raise TaggerError(f"{csv_path} has no rows")
    columns = set(rows[0])
    if "id" not in columns:
        raise TaggerError(f"{csv_path} has no 'id' column")
    refs: list[ImageRef] = []
    ref_rows: list[int] = []
    missing_ids: list[str] = []
    for i, r in enumerate(rows):
        ref = _image_ref(root, r.get("id", ""))
        if ref is None:
            missing_ids.append(r.get("id", ""))
        else:
            refs.append(ref)
            ref_rows.append(i)
    if not refs:
        raise TaggerError(f"no row of {csv_path} has its image in {root / 'images'} (expected images/<id>.jpg)")
    if missing_ids:
        log.warning(
            "%d of %d rows have no image file (first: images/%s.jpg)", len(missing_ids), len(rows), missing_ids[0]
        )
    return LabelledFolder(root, csv_path, rows, columns, refs, ref_rows, missing_ids)


def evaluate(config: EvalConfig) -> EvalResult:
    """Tag every images/<id>.jpg listed in config.data/styles.csv with the `tagger run` stages and score each task.

    Rows without an image file and images that fail to decode are counted, not scored. A label the model does not
    know counts as wrong in the all-rows accuracy and is left out of everything else.
    """
    t_start = time.perf_counter()
    folder = load_labelled_folder(config.data)
    refs = folder.refs
    session = open_session(config.model, config.device, config.threads)
    tasks = resolve_tasks(session.tasks, config.tasks, folder.columns, folder.csv_path)
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


def check_report_dependencies() -> None:
    """Raise TaggerError (one line, with the install command) when matplotlib, needed for the report, is missing."""
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        raise TaggerError(f"the HTML report needs matplotlib: {REPORT_EXTRA}") from None


def write_report(result: EvalResult, path: str | os.PathLike[str], max_classes: int = DEFAULT_MAX_CLASSES) -> Path:
    """Write one self-contained HTML page (images inlined as data URIs): per task the scores, a confusion matrix of
    the `max_classes` most frequent classes, the per-class table and the most confident mistakes."""
    check_report_dependencies()
    if max_classes < 2:
        raise TaggerError(f"max_classes must be at least 2, got {max_classes}")
    out = Path(path)
    page = _page(result, max_classes)
    try:
        out.write_text(page, encoding="utf-8")
    except OSError as e:
        raise TaggerError(f"cannot write report {out}: {e.strerror or e}") from None
    log.info("report: %s (%.1f MB)", out, len(page) / 1e6)
    return out


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f5f6f8;color:#1d2330}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:0 0 12px}h3{font-size:15px;margin:18px 0 8px}
.sub{color:#667085;font-size:13px}
section{background:#fff;border-radius:10px;box-shadow:0 1px 3px rgba(0,0,0,.08);padding:20px 24px;margin:20px 0}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:12px 0}
.card{background:#f0f3f8;border-radius:8px;padding:10px 14px;min-width:110px}
.card b{display:block;font-size:21px}.card span{font-size:12px;color:#667085}
table{border-collapse:collapse;font-size:13px;width:100%}
th,td{padding:4px 8px;border-bottom:1px solid #eceef2;text-align:right}
th:first-child,td:first-child{text-align:left}
thead th{position:sticky;top:0;background:#fff}
.scroll{max-height:520px;overflow:auto}
.bar{background:linear-gradient(90deg,#cfe0f7 var(--w),transparent var(--w))}
.cm{max-width:100%;height:auto}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(172px,1fr));gap:12px}
.tile{background:#fafbfc;border:1px solid #eceef2;border-radius:8px;padding:6px;font-size:12px;text-align:center}
.tile img{width:160px;height:160px;object-fit:contain;background:#fff}
.nothumb{width:160px;height:160px;display:flex;align-items:center;justify-content:center;color:#98a2b3;margin:auto}
.true{color:#1a7f37}.pred{color:#c62828}.id{color:#98a2b3}
ul{margin:4px 0;padding-left:20px;font-size:13px}
"""


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _card(value: object, label: str) -> str:
    return f'<div class="card"><b>{_e(value)}</b><span>{_e(label)}</span></div>'


def _page(result: EvalResult, max_classes: int) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>tagger eval: {_e(result.data.name)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>tagger eval: {_e(result.data.name)}</h1>",
        f'<div class="sub">model {_e(result.model.name)} (sha256 {_e(result.model_sha256[:12])}) on '
        f"{_e(result.provider)} &middot; data {_e(result.data)} &middot; {when}</div>",
        '<section><h2>Rows</h2><div class="cards">',
        _card(result.rows, "styles.csv rows"),
        _card(result.decoded, "decoded"),
        _card(result.decode_errors, "decode errors"),
        _card(result.missing, "without an image file"),
        "</div>",
        _problems(result),
        "</section>",
    ]
    parts += [_task_section(t, max_classes) for t in result.tasks]
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


def _problems(result: EvalResult) -> str:
    out = []
    if result.error_examples:
        items = "".join(f"<li>{_e(i)}: {_e(err)}</li>" for i, err in result.error_examples)
        out.append(f"<h3>Decode errors (first {len(result.error_examples)})</h3><ul>{items}</ul>")
    if result.missing_ids:
        ids = ", ".join(_e(i) for i in result.missing_ids)
        out.append(f"<h3>Rows without an image file (first {len(result.missing_ids)})</h3><p class=\"sub\">{ids}</p>")
    return "\n".join(out)


def _task_section(t: TaskResult, max_classes: int) -> str:
    png, caption = _confusion_png(t, max_classes)
    png_uri = "data:image/png;base64," + base64.b64encode(png).decode()
    parts = [
        f"<section><h2>{_e(t.name)} <span class=\"sub\">(column {_e(t.column)}, {len(t.labels)} labels)</span></h2>",
        '<div class="cards">',
        _card(_fmt(t.top1_all), f"top-1, all {t.labelled} rows"),
        _card(_fmt(t.top1_known), f"top-1, {t.scored} known labels"),
        _card(_fmt(t.macro_f1), "macro-F1"),
        _card(_fmt(t.balanced_acc), "balanced accuracy"),
        _card(_fmt(t.calibration_error), f"calibration error (mean score {_fmt(t.mean_score)})"),
        _card(t.unknown, "unknown labels"),
        _card(t.unlabelled, "unlabelled"),
        "</div>",
    ]
    if t.unknown_labels:
        items = ", ".join(f"{_e(k)} ({v})" for k, v in t.unknown_labels.items())
        parts.append(f'<h3>Labels the model does not know</h3><p class="sub">{items}</p>')
    confusions = t.top_confusions(10)
    if confusions:
        items = "".join(f"<li>{_e(a)} &rarr; {_e(b)}: {n}</li>" for a, b, n in confusions)
        parts.append(f"<h3>Top confusions (true &rarr; predicted)</h3><ul>{items}</ul>")
    parts += [
        "<h3>Confusion matrix</h3>",
        f'<img class="cm" alt="confusion matrix of {_e(t.name)}" src="{png_uri}">',
        f'<p class="sub">{_e(caption)}</p>',
        "<h3>Per class</h3>",
        _class_table(t),
        _threshold_table(t),
        _mistakes(t),
        "</section>",
    ]
    return "\n".join(parts)


def _class_table(t: TaskResult) -> str:
    pc = t.per_class()
    seen = np.flatnonzero((pc["support"] > 0) | (pc["predicted"] > 0))
    order = seen[np.lexsort((-pc["f1"][seen], -pc["support"][seen]))]  # by support, then F1
    rows = []
    for i in order:
        f1 = pc["f1"][i]
        rows.append(
            f"<tr><td>{_e(t.labels[i])}</td><td>{pc['precision'][i]:.3f}</td><td>{pc['recall'][i]:.3f}</td>"
            f'<td class="bar" style="--w:{100 * f1:.1f}%">{f1:.3f}</td>'
            f"<td>{int(pc['support'][i])}</td><td>{int(pc['predicted'][i])}</td></tr>"
        )
    unseen = len(t.labels) - len(seen)
    note = f'<p class="sub">{unseen} of the model\'s labels neither occur nor are predicted here.</p>' if unseen else ""
    return (
        '<div class="scroll"><table><thead><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th>'
        f"<th>support</th><th>predicted</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div>{note}"
    )


def _threshold_table(t: TaskResult) -> str:
    rows = "".join(
        f"<tr><td>&ge; {th:.2f}</td><td>{_fmt(cov)}</td><td>{_fmt(acc)}</td></tr>" for th, cov, acc in t.by_threshold
    )
    return (
        "<h3>Accepting rows above a score</h3>"
        f'<p class="sub">Of the {t.scored} rows with a known label: the share whose top-1 score reaches the threshold, '
        "and the top-1 accuracy among them.</p>"
        f"<table><thead><tr><th>{_e(t.name)}_score</th><th>rows</th><th>top-1 among them</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )


def _mistakes(t: TaskResult) -> str:
    if not t.mistakes:
        return "<h3>Most confident mistakes</h3><p class=\"sub\">none</p>"
    tiles = []
    for m in t.mistakes:
        uri = _thumbnail(m.path)
        img = f'<img alt="{_e(m.id)}" src="{uri}">' if uri else '<div class="nothumb">no preview</div>'
        tiles.append(
            f'<div class="tile">{img}<div class="true">true: {_e(m.true)}</div>'
            f'<div class="pred">predicted: {_e(m.predicted)} ({m.score:.2f})</div>'
            f'<div class="id">id {_e(m.id)}</div></div>'
        )
    return f"<h3>Most confident mistakes ({len(t.mistakes)})</h3><div class=\"grid\">{''.join(tiles)}</div>"


def _thumbnail(path: Path) -> str | None:
    """A JPEG data URI of the photo, at most THUMB_SIZE on its long side; None when it cannot be read."""
    try:
        img, _, _ = load_image(path, PreprocessSpec(size=THUMB_SIZE), DEFAULT_MAX_PIXELS)
    except DECODE_ERRORS as e:
        log.warning("no thumbnail for %s: %s", path, e)
        return None
    img.thumbnail((THUMB_SIZE, THUMB_SIZE))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _confusion_png(t: TaskResult, max_classes: int) -> tuple[bytes, str]:
    """PNG of the confusion matrix over the most frequent true classes, and a caption saying what it shows."""
    cm = t.confusion
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    seen = np.flatnonzero((support > 0) | (predicted > 0))
    shown = seen[np.argsort(-support[seen], kind="stable")][:max_classes]
    sub = cm[np.ix_(shown, shown)]  # [n, n]
    truncated = len(shown) < len(seen)
    names = [t.labels[i] for i in shown]
    if truncated:
        other = cm[shown].sum(axis=1) - sub.sum(axis=1)  # predictions of classes not drawn
        sub = np.concatenate([sub, other[:, None]], axis=1)  # [n, n + 1]
        caption = (
            f"The {len(shown)} most frequent of the {len(seen)} classes present; the column '(other)' counts "
            "predictions of the classes left out. "
        )
    else:
        caption = f"All {len(shown)} classes present. "
    caption += "Rows: true class; columns: predicted; colour: share of the row; numbers: counts."
    fig = _matrix_figure(sub, names, names + ["(other)"] if truncated else names, t.name)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue(), caption


def _matrix_figure(counts: np.ndarray, rows: list[str], cols: list[str], title: str) -> "Figure":
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = max(len(rows), len(cols))
    side = min(16.0, 2.5 + 0.34 * n)
    fig = Figure(figsize=(side + 1.0, side))
    FigureCanvasAgg(fig)  # Agg, without touching pyplot's global backend
    ax = fig.add_subplot()
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    fontsize = 9 if n <= 20 else 7
    for (i, j), c in np.ndenumerate(counts):
        if c:
            ax.text(j, i, str(c), ha="center", va="center", fontsize=fontsize - 1,
                    color="white" if share[i, j] > 0.55 else "#1d2330")  # fmt: skip
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(len(rows)), rows, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}: confusion matrix")
    return fig


__all__ = [
    "EvalConfig",
    "EvalResult",
    "Mistake",
    "TaskResult",
    "check_report_dependencies",
    "evaluate",
    "write_report",
]
