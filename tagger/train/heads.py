"""Heads-only training: fit new or refit task heads on a base ONNX model's cached pooled features, write base + heads."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from tagger.contract import TaskSpec, check_task_names
from tagger.errors import TaggerError, UsageError, one_line
from tagger.guards import check_destination
from tagger.labelled import LabelledFolder, load_labelled_folder
from tagger.metrics import IGNORE, summarize
from tagger.model.edit import Head, linear_head, model_metadata, onnx_module, with_heads
from tagger.model.info import ModelInfo, read_model_metadata, task_columns
from tagger.model.registry import resolve_model
from tagger.compose import decoded_batches
from tagger.pipeline.decode import Sample
from tagger.pipeline.session import open_session
from tagger.storage import publish_bytes, publishing
from tagger.temperature import fit_temperature
from tagger.train.data import class_weight_vector, data_folder_weights, split_sides
from tagger.train.features import default_cache_dir, embed, file_digests

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
CHECK_IMAGES = 64  # held-out images the written model is run on, to prove it equals the fitted heads
PARITY_ATOL = 1e-4  # max |p_onnx - p_numpy| (float32 features through the same Gemm in two libraries)


@dataclass(frozen=True)
class HeadsConfig:
    """A heads-only run. tasks: (name, styles.csv column) to add or refit; base tasks not named are kept unless
    dropped. data_weights: (folder, sample weight) for some of `data`; the others weigh 1."""

    base: str
    data: tuple[Path, ...]
    tasks: tuple[tuple[str, str], ...]
    out: Path
    drop: tuple[str, ...] = ()
    data_weights: tuple[tuple[Path, float], ...] = ()
    hidden: int = 0  # 0: a linear head; N: Linear(D, N) + ReLU + Linear(N, C)
    task_hidden: tuple[tuple[str, int], ...] = ()  # per task, overrides `hidden`
    warm_start: bool = True  # a refit linear head starts from the base's head of that name, where it has one
    epochs: int = 10
    task_epochs: tuple[tuple[str, int], ...] = ()  # per task, overrides `epochs`
    batch_size: int = 1024
    lr: float = 4e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    class_weight_power: float = 0.3
    min_count: int = 8
    val_fraction: float = 0.15
    seed: int = 0
    cache: Path | None = None
    workers: int | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        data_folder_weights(self.data, self.data_weights)  # a bad --data-weight fails before any work

    def for_task(self, name: str) -> HeadsConfig:
        """This config with the task's own hidden width and epochs, where given."""
        return replace(
            self,
            hidden=dict(self.task_hidden).get(name, self.hidden),
            epochs=dict(self.task_epochs).get(name, self.epochs),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return json.loads(json.dumps(d, default=str))


@dataclass
class Dataset:
    """Every labelled image of every folder, in folder order: features, split side, sample weight, task labels."""

    folders: list[LabelledFolder]
    source: np.ndarray  # int [N], index of the folder
    ids: list[str]
    features: np.ndarray  # float32 [N, D]
    val: np.ndarray  # bool [N]
    weight: np.ndarray  # float32 [N]
    counts: dict[str, int] = field(default_factory=dict)


def train_heads(cfg: HeadsConfig) -> Path:
    """Run heads-only training; returns the written model (RUN/model.onnx)."""
    t0 = time.perf_counter()
    base_path = resolve_model(cfg.base)
    info = read_model_metadata(base_path)
    columns = _plan_tasks(cfg, info)
    out = cfg.out / MODEL_FILE
    check_destination(out, base_path, "model")
    try:
        cfg.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TaggerError(f"cannot make the run folder {cfg.out}: {one_line(e)}") from None

    data = _load(cfg, base_path, columns)
    onnx = onnx_module()
    base = onnx.load(str(base_path))
    old_labels = {t.name: t.labels for t in info.tasks}
    heads, metrics = [], {}
    for name, column in cfg.tasks:
        y, task = _labels(data, column, name, cfg.min_count)
        task_cfg = cfg.for_task(name)
        init = None
        if cfg.warm_start and task_cfg.hidden <= 0 and name in old_labels:
            found = linear_head(base, name)
            init = (found[0], found[1], old_labels[name]) if found is not None else None
        head, m = _fit_task(task_cfg, data, task, y, init)
        heads.append(head)
        metrics[name] = m
        log.info("%s (%s): validation top-1 %.1f%%, macro-F1 %.3f, temperature %.2f", name, column,
                 100 * m["top1"], m["macro_f1"], head.temperature)

    keep = [t.name for t in info.tasks if t.name not in dict(cfg.tasks) and t.name not in cfg.drop]
    publish_bytes(cfg.out / "split.json", json.dumps(_split(cfg, data)).encode())
    meta = _metadata(cfg, info, base, data, metrics, columns, keep, [h.temperature for h in heads])
    model = with_heads(base, heads, keep, meta)
    with publishing(out) as tmp:  # published only once ORT on it equals the fitted heads
        onnx.save(model, str(tmp))
        _check(tmp, base_path, data, heads, keep, cfg)
    seconds = time.perf_counter() - t0
    publish_bytes(
        cfg.out / "metrics.json",
        json.dumps({"tasks": metrics, "seconds": round(seconds, 1), "images": data.counts}, indent=1).encode(),
    )
    log.info("wrote %s in %.0f s", out, seconds)
    return out


def _plan_tasks(cfg: HeadsConfig, info: ModelInfo) -> dict[str, str]:
    """Task -> column of every task of the new model (kept ones from the base's record, else the defaults)."""
    if not cfg.tasks:
        raise UsageError("--heads-only needs at least one --task NAME=COLUMN to fit")
    recorded = task_columns(info)
    base_names = [t.name for t in info.tasks]
    unknown = [t for t in cfg.drop if t not in base_names]
    if unknown:
        raise UsageError(f"--drop {unknown[0]}: the base model has tasks {', '.join(base_names)}")
    columns = {t: recorded[t] for t in base_names if t not in cfg.drop and t in recorded}
    columns.update(dict(cfg.tasks))
    names = [t for t in base_names if t not in cfg.drop and t not in dict(cfg.tasks)] + [n for n, _ in cfg.tasks]
    if len(set(n for n, _ in cfg.tasks)) != len(cfg.tasks):
        raise UsageError("--task names a task twice")
    try:
        check_task_names(names)
    except ValueError as e:
        raise UsageError(f"--task: {e}") from None
    return columns


def _load(cfg: HeadsConfig, base: Path, columns: Mapping[str, str]) -> Dataset:
    weights = data_folder_weights(cfg.data, cfg.data_weights)
    folders = [load_labelled_folder(d) for d in cfg.data]
    for folder in folders:
        for name, column in cfg.tasks:
            if column not in folder.columns:
                raise UsageError(
                    f"--task {name}={column}: no column {column!r} in {folder.csv_path}; columns: {sorted(folder.columns)}"
                )
    refs = [r for f in folders for r in f.refs]
    digests = file_digests(refs)
    cache = cfg.cache or default_cache_dir()
    t0 = time.perf_counter()
    features, ok, counts = embed(refs, digests, base, cache, workers=cfg.workers, threads=cfg.threads)
    log.info("features: %s in %.0f s", ", ".join(f"{v} {k}" for k, v in counts.items()), time.perf_counter() - t0)
    source = np.concatenate([np.full(len(f.refs), i) for i, f in enumerate(folders)])
    ids = [f.rows[r]["id"] for f in folders for r in f.ref_rows]
    val = np.array(split_sides(ids, digests, cfg.seed, cfg.val_fraction), dtype=bool)
    weight = np.array([weights[s] for s in source], np.float32)
    keep = np.flatnonzero(ok)
    return Dataset(
        folders=folders,
        source=source[keep],
        ids=[ids[i] for i in keep],
        features=features[keep],
        val=val[keep],
        weight=weight[keep],
        counts={**counts, "images": int(len(keep))},
    )


def _labels(data: Dataset, column: str, name: str, min_count: int) -> tuple[np.ndarray, TaskSpec]:
    """int [N] label index of each image (IGNORE for an empty or rare label) and the task's labels, sorted."""
    # `data` may have dropped images that did not decode: map through the kept ids per folder.
    by_key = {}
    for s, f in enumerate(data.folders):
        for r, value in zip(f.ref_rows, f.truth(column)):
            by_key[(s, f.rows[r]["id"])] = value
    values = [by_key[(int(s), i)] for s, i in zip(data.source, data.ids)]
    counts = Counter(v for v in values if v)
    labels = tuple(sorted(v for v, n in counts.items() if n >= min_count))
    if len(labels) < 2:
        raise UsageError(f"--task {name}={column}: fewer than 2 labels have {min_count} images")
    index = {v: i for i, v in enumerate(labels)}
    y = np.array([index.get(v, IGNORE) for v in values], np.int64)
    return y, TaskSpec(name, labels)


def _fit_task(
    cfg: HeadsConfig,
    data: Dataset,
    task: TaskSpec,
    y: np.ndarray,
    init: tuple[np.ndarray, np.ndarray, tuple[str, ...]] | None = None,
) -> tuple[Head, dict[str, Any]]:
    """Fit one head on the training side, its temperature on the validation side; report validation metrics.

    init: a linear head on the raw features to start from (weight [C', D], bias [C'], its labels): rows of labels
    this task also has are copied, the others start at zero."""
    import torch
    from torch import nn

    torch.manual_seed(cfg.seed)
    train = np.flatnonzero(~data.val & (y != IGNORE))
    val = np.flatnonzero(data.val & (y != IGNORE))
    if len(train) == 0 or len(val) == 0:
        raise TaggerError(f"task {task.name}: too few labelled images for a train/validation split")
    # Fit on standardised features, then fold the standardisation into the first layer: the graph reads raw ones.
    mu = data.features[train].mean(0)
    sd = data.features[train].std(0) + 1e-6
    x = torch.from_numpy((data.features[train] - mu) / sd)
    t = torch.from_numpy(y[train])
    w = torch.from_numpy(data.weight[train])
    dim, n_classes = x.shape[1], len(task.labels)
    net: nn.Module = (
        nn.Linear(dim, n_classes)
        if cfg.hidden <= 0
        else nn.Sequential(nn.Linear(dim, cfg.hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(cfg.hidden, n_classes))
    )
    if init is not None and isinstance(net, nn.Linear):
        w_old, b_old, labels_old = init
        row = {label: i for i, label in enumerate(labels_old)}
        w_new = np.zeros((n_classes, dim), np.float32)
        b_new = np.full(n_classes, float(b_old.min()), np.float32)  # a new label starts unlikely
        for i, label in enumerate(task.labels):
            if label in row:
                w_new[i], b_new[i] = w_old[row[label]], b_old[row[label]]
        with torch.no_grad():  # the same function of standardised features: W x + b == (W sd) z + (b + W mu)
            net.weight.copy_(torch.from_numpy(w_new * sd))
            net.bias.copy_(torch.from_numpy(b_new + w_new @ mu))
    criterion = nn.CrossEntropyLoss(
        weight=torch.from_numpy(class_weight_vector(y[train], n_classes, cfg.class_weight_power)),
        label_smoothing=cfg.label_smoothing,
        reduction="none",
    )
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, -(-len(train) // cfg.batch_size))
    # OneCycleLR divides by the length of each phase minus one step: a run of few steps gets phases of 1.5 steps
    # or more (a run of under 4 steps ends before its schedule does).
    total = max(4, cfg.epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=total, pct_start=max(0.1, 2.5 / total))
    gen = torch.Generator().manual_seed(cfg.seed)
    net.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(train), generator=gen)
        for k in range(steps_per_epoch):
            b = order[k * cfg.batch_size : (k + 1) * cfg.batch_size]
            loss = (criterion(net(x[b]), t[b]) * w[b]).sum() / w[b].sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    net.eval()
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    fitted = [(m.weight.detach().numpy().astype(np.float64), m.bias.detach().numpy().astype(np.float64)) for m in linears]
    w0, b0 = fitted[0]
    fitted[0] = (w0 / sd, b0 - (w0 / sd) @ mu)  # W (x - mu) / sd + b == (W / sd) x + (b - (W / sd) mu)
    layers = tuple((w.astype(np.float32), b.astype(np.float32)) for w, b in fitted)
    head = Head(task, layers)
    probs = head.probs(data.features[val])
    temperature = fit_temperature(probs, y[val])
    head = Head(task, layers, temperature)
    pred = probs.argmax(1)
    metrics: dict[str, Any] = {**summarize(y[val], pred, n_classes), "column": "", "temperature": temperature}
    for s, f in enumerate(data.folders):  # per folder: thumbnails and real-size photos are reported apart
        rows = val[data.source[val] == s]
        if len(rows):
            metrics[f.root.name] = summarize(y[rows], head.probs(data.features[rows]).argmax(1), n_classes)
    return head, metrics


def _split(cfg: HeadsConfig, data: Dataset) -> dict[str, Any]:
    return {
        "method": "sha256 of image bytes, seeded; identical files share a side; an id already in an earlier folder "
        "takes that image's side",
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "folders": {
            str(f.root): {
                "train_ids": [i for i, s, v in zip(data.ids, data.source, data.val) if s == k and not v],
                "val_ids": [i for i, s, v in zip(data.ids, data.source, data.val) if s == k and v],
            }
            for k, f in enumerate(data.folders)
        },
    }


def _metadata(
    cfg: HeadsConfig,
    info: ModelInfo,
    base: Any,
    data: Dataset,
    metrics: dict[str, dict[str, Any]],
    columns: Mapping[str, str],
    keep: Sequence[str],
    temperatures: Sequence[float],
) -> dict[str, Any]:
    """The base's META_MODEL with this run's record: columns, heads, per-task metrics, temperatures, provenance."""
    meta = model_metadata(base)
    meta.pop("quantization", None)  # the new heads are float; the record would describe another file
    for name, _ in cfg.tasks:
        metrics[name]["column"] = columns[name]
    old_metrics = {k: v for k, v in (meta.get("metrics") or {}).items() if k in keep}
    old_temps = {k: v for k, v in (meta.get("temperature") or {}).items() if k in keep}
    meta["columns"] = {t: columns[t] for t in [*keep, *(n for n, _ in cfg.tasks)] if t in columns}
    meta["metrics"] = {**old_metrics, **{k: _round(v) for k, v in metrics.items()}}
    meta["temperature"] = {**old_temps, **{n: float(t) for (n, _), t in zip(cfg.tasks, temperatures)}}
    meta["calibration"] = {"data": "the validation split of the heads-only run"}
    earlier = meta.get("heads")
    meta["heads"] = {
        "base_sha256": info.sha256,
        "base": info.path.name,
        "kept": list(keep),
        "fitted": [n for n, _ in cfg.tasks],
        "head": {n: _head_kind(cfg.for_task(n).hidden) for n, _ in cfg.tasks},
        "warm_start": cfg.warm_start,
        "data": [{"folder": str(p), "name": p.name, "weight": dict((q.resolve(), w) for q, w in cfg.data_weights).get(p.resolve(), 1.0)} for p in cfg.data],
        "images": data.counts["images"],
        "split": {"method": "content hash", "seed": cfg.seed, "val_fraction": cfg.val_fraction},
        "epochs": {n: cfg.for_task(n).epochs for n, _ in cfg.tasks},
        "label_smoothing": cfg.label_smoothing,
        "class_weight_power": cfg.class_weight_power,
    }
    if earlier is not None:  # the base came from heads-only training too: keep its record
        meta["heads"]["base_heads"] = earlier
    return meta


def _head_kind(hidden: int) -> str:
    return "linear" if hidden <= 0 else f"mlp {hidden}"


def _round(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _round(v) for k, v in d.items()}
    return round(d, 5) if isinstance(d, float) else d


def _check(model: Path, base: Path, data: Dataset, heads: Sequence[Head], keep: Sequence[str], cfg: HeadsConfig) -> None:
    """ORT on held-out images must give the fitted heads' probabilities, the base's for kept heads, and the
    normalised features as `embedding`."""
    val = np.flatnonzero(data.val)[:CHECK_IMAGES]
    by_id = [{f.rows[r]["id"]: ref for r, ref in zip(f.ref_rows, f.refs)} for f in data.folders]
    refs = [by_id[int(data.source[i])][data.ids[i]] for i in val]
    feats = [data.features[i] for i in val]
    new = open_session(model, "cpu", cfg.threads)
    old = open_session(base, "cpu", cfg.threads) if keep else None
    images, rows = [], []
    for batch in decoded_batches(refs, new.spec, 32, 0):
        for r in batch.results:
            if isinstance(r, Sample):
                images.append(r.array)
                rows.append(r.index)
    x = np.stack(images)
    got = new.predict(x)
    (embedding,) = new.outputs(x, ["embedding"])
    features = np.stack([feats[i] for i in rows])
    for head in heads:
        gap = float(np.abs(got[head.task.name] - head.probs(features)).max())
        if not gap <= PARITY_ATOL:  # NaN fails too
            raise TaggerError(f"the written model differs from the fitted {head.task.name} head (max |diff| {gap:.2e})")
    if old is not None:
        ref = old.predict(x)
        for t in keep:
            gap = float(np.abs(got[t] - ref[t]).max())
            if not gap <= PARITY_ATOL:
                raise TaggerError(f"the written model changed the kept {t} head (max |diff| {gap:.2e})")
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    if not float(np.abs(embedding - unit).max()) <= PARITY_ATOL:
        raise TaggerError("the written model's embedding is not the normalised features it was fitted on")
    log.info("checked %d held-out images: the written model equals the fitted heads", len(x))


__all__ = ["HeadsConfig", "MODEL_FILE", "train_heads"]
