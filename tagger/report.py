"""The HTML pages of `tagger eval --report` and `tagger dupes --report`: self-contained files, published atomically."""

from __future__ import annotations

import base64
import html
import importlib
import io
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tagger.contract import PreprocessSpec
from tagger.errors import TaggerError
from tagger.evaluate import EvalResult, TaskResult, format_score
from tagger.pipeline.decode import DECODE_ERRORS, DEFAULT_MAX_PIXELS, load_image
from tagger.storage import publish_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from tagger.similar import DupesResult

log = logging.getLogger(__name__)

DEFAULT_MAX_CLASSES = 30  # classes drawn in a report's confusion matrix
THUMB_SIZE = 160
REPORT_EXTRA = 'pip install "tagger[report]"'


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
    page = _page(result, max_classes).encode("utf-8")
    publish_bytes(out, page)
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
    parts.append(_tasks_table(result))
    parts += [_task_section(t, max_classes) for t in result.tasks]
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


def _tasks_table(result: EvalResult) -> str:
    """Every scored task on one line each, so a model with many tasks reads at a glance."""
    rows = "".join(
        f"<tr><td><a href=\"#task-{_e(t.name)}\">{_e(t.name)}</a></td><td>{_e(t.column)}</td><td>{len(t.labels)}</td>"
        f"<td>{t.top1_all:.1%}</td><td>{t.top1_known:.1%}</td><td>{t.macro_f1:.3f}</td><td>{t.labelled}</td></tr>"
        for t in result.tasks
    )
    return (
        '<section><h2>Tasks</h2><div class="scroll"><table><thead><tr><th>task</th><th>column</th><th>labels</th>'
        "<th>top-1 (all)</th><th>top-1 (known labels)</th><th>macro-F1</th><th>labelled</th></tr></thead>"
        f"<tbody>{rows}</tbody></table></div></section>"
    )


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
        f"<section id=\"task-{_e(t.name)}\"><h2>{_e(t.name)} <span class=\"sub\">(column {_e(t.column)}, {len(t.labels)} labels)</span></h2>",
        '<div class="cards">',
        _card(format_score(t.top1_all), f"top-1, all {t.labelled} rows"),
        _card(format_score(t.top1_known), f"top-1, {t.scored} known labels"),
        _card(format_score(t.macro_f1), "macro-F1"),
        _card(format_score(t.balanced_acc), "balanced accuracy"),
        _card(format_score(t.calibration_error), f"calibration error (mean score {format_score(t.mean_score)})"),
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
        f"<tr><td>&ge; {th:.2f}</td><td>{format_score(cov)}</td><td>{format_score(acc)}</td></tr>"
        for th, cov, acc in t.by_threshold
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


__all__ = ["DEFAULT_MAX_CLASSES", "check_report_dependencies", "write_report"]


MAX_DUPES_GROUPS = 500  # groups drawn in a dupes report (disagreeing first); the Parquet file has them all

_DUPES_CSS = """
.group{display:flex;gap:10px;overflow-x:auto;padding:4px 0}
.group .tile{flex:0 0 172px}
.disagree{border-left:4px solid #c62828}
.kind{font-size:12px;color:#667085;margin-left:8px}
"""


def write_dupes_report(result: "DupesResult", path: str | os.PathLike[str], max_groups: int = MAX_DUPES_GROUPS) -> Path:
    """Write one self-contained HTML page of duplicate groups: each group's thumbnails side by side with their
    similarity to its first member and their tags; groups whose tags disagree first. Needs no extra."""
    out = Path(path)
    page = _dupes_page(result, max_groups).encode("utf-8")
    publish_bytes(out, page)
    log.info("report: %s (%.1f MB)", out, len(page) / 1e6)
    return out


def _dupes_page(result: "DupesResult", max_groups: int) -> str:
    from tagger.similar import GROUP_COLUMNS

    g = result.groups
    tasks = [c for c in g.column_names if c not in GROUP_COLUMNS]
    members: dict[int, list[dict[str, object]]] = {}
    for row in g.to_pylist():
        members.setdefault(int(row["group"]), []).append(row)  # type: ignore[call-overload]
    order = sorted(members, key=lambda k: (not members[k][0]["disagree"], k))  # disagreeing first, then by id
    shown = order[:max_groups]
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    disagree = sum(1 for k in members if members[k][0]["disagree"])
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>tagger dupes: {_e(result.source)}</title><style>{_CSS}{_DUPES_CSS}</style></head><body><main>",
        f"<h1>tagger dupes: {_e(result.source)}</h1>",
        f'<div class="sub">cosine &ge; {result.threshold:g} &middot; catalog {_e(result.catalog)} &middot; {when}</div>',
        '<section><div class="cards">',
        _card(len(members), "groups"),
        _card(g.num_rows, "photos in groups"),
        _card(disagree, "groups whose tags disagree"),
        _card(result.rows, "rows in the table"),
        _card(result.left_out, "left out (error or no embedding)"),
        "</div>",
    ]
    if len(shown) < len(members):
        parts.append(f'<p class="sub">The first {len(shown)} of {len(members)} groups; the Parquet file has all.</p>')
    parts.append("</section>")
    for k in shown:
        rows = members[k]
        head = rows[0]
        tiles = []
        for r in rows:
            uri = _thumbnail(_photo_path(result.catalog, str(r["path"])))
            img = f'<img alt="{_e(r["path"])}" src="{uri}">' if uri else '<div class="nothumb">no preview</div>'
            tags = "".join(f"<div>{_e(t)}: {_e(r[t])}</div>" for t in tasks)
            tiles.append(
                f'<div class="tile">{img}<div>similarity {float(r["similarity"]):.4f}</div>{tags}'  # type: ignore[arg-type]
                f'<div class="id">{_e(r["path"])}</div></div>'
            )
        cls = "disagree" if head["disagree"] else ""
        flag = " &middot; tags disagree" if head["disagree"] else ""
        parts.append(
            f'<section class="{cls}"><h2>group {k}<span class="kind">{_e(head["kind"])}, {len(rows)} photos{flag}'
            f'</span></h2><div class="group">{"".join(tiles)}</div></section>'
        )
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


def _photo_path(catalog: str | None, path: str) -> Path:
    """A table row's photo on disk: its path relative to the catalog (an absolute path stays as it is)."""
    return Path(catalog or ".") / path
