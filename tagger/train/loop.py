"""The training loop: train_one_epoch, evaluate, and fit(config), which writes a self-describing run directory."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from tagger.contract import DEFAULT_TASKS, PreprocessSpec, TaskSpec, check_task_names
from tagger.errors import TaggerError
from tagger.metrics import IGNORE, summarize
from tagger.storage import publish_bytes, publishing
from tagger.temperature import fit_temperature
from tagger.train.augment import eval_transform, train_transform
from tagger.train.checkpoint import read_checkpoint, save_checkpoint
from tagger.train.data import (
    Example, class_weights, data_folder_weights, decode_cache, default_train_workers, load_labelled_set,
)
from tagger.train.ema import Ema
from tagger.train.hardware import mixed_precision, pick_device
from tagger.train.init import apply_init, calibrate_folded_norms, calibration_images, load_init
from tagger.train.model import MultiTaskNet

log = logging.getLogger(__name__)

BEST_NAME = "image_mtl_best.pt"
LAST_NAME = "last.pt"
FEW_BATCHES = 10  # batches an epoch below which a run is said to learn little (a small --limit, a large --batch-size)


@dataclass(frozen=True)
class TrainConfig:
    data: tuple[Path, ...]  # folders of styles.csv + images/; an id of an earlier folder keeps that image's side
    out: Path
    data_weights: tuple[tuple[Path, float], ...] = ()  # a folder's weight of each image in the loss (default 1)
    init: str | None = None  # start from: default, a checkpoint or a tagger .onnx model (tagger.train.init)
    epochs: int = 15
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    image_size: int = 160
    backbone: str = "tf_efficientnet_lite0"
    weights: str = "imagenet"
    device: str = "auto"
    workers: int = field(default_factory=default_train_workers)
    limit: int | None = None
    seed: int = 0
    resume: Path | None = None
    tasks: tuple[tuple[str, str], ...] = tuple(DEFAULT_TASKS.items())  # (task, styles.csv column), primary first
    task_weights: tuple[tuple[str, float], ...] = ()  # tasks not named weigh 1.0
    min_count: int = 8
    val_fraction: float = 0.15
    label_smoothing: float = 0.1
    ema_decay: float = 0.999  # 0 disables the weight EMA
    class_weight_power: float = 0.3
    precision: str = "auto"  # auto: bf16 where the hardware runs it natively (mixed_precision); bf16; fp32
    downscale: float = 0.0  # probability of shrinking an image and scaling it back up (augment.DownUp)
    early_size: int | None = None  # side of the first `early_epochs` epochs' inputs (FixRes-style progressive sizes)
    early_epochs: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (paths as strings), so checkpoints load with weights_only=True."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


class CachedImages(Dataset):
    """Decoded uint8 [N, S, S, 3] images, int64 labels [N, T] and float32 sample weights [N], transformed per
    sample."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: nn.Module, weights: np.ndarray | None = None) -> None:
        self.images, self.labels, self.transform = images, labels, transform
        self.weights = np.ones(len(images), np.float32) if weights is None else weights

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(self.images[i]).permute(2, 0, 1)  # HWC -> CHW, uint8
        return self.transform(x), torch.from_numpy(self.labels[i]), torch.tensor(self.weights[i])


def _labels(examples: Sequence[Example]) -> np.ndarray:
    return np.array([e.labels for e in examples], dtype=np.int64).reshape(len(examples), -1)


def task_losses(
    logits: dict[str, torch.Tensor], y: torch.Tensor, criteria: dict[str, nn.CrossEntropyLoss], w: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Cross-entropy per task (criteria with reduction "none"), sample weights w [B]; a batch with no scored label for
    a task contributes 0, not NaN.

    The mean is weighted as torch's own with class weights: sum(w_i * l_i) / sum(w_i * class_weight[y_i]), so with
    w = 1 it equals reduction "mean".
    """
    out = {}
    for i, (name, crit) in enumerate(criteria.items()):
        target = y[:, i]  # [B]
        scored = target != IGNORE
        if bool(scored.any()):
            per_sample = crit(logits[name].float(), target)  # [B], 0 where IGNORE
            cw = crit.weight[target.clamp_min(0)] if crit.weight is not None else torch.ones_like(w)
            out[name] = (w * per_sample).sum() / (w * cw * scored).sum()
        else:
            out[name] = logits[name].sum() * 0.0
    return out


def train_one_epoch(
    model: MultiTaskNet,
    loader: DataLoader,
    criteria: dict[str, nn.CrossEntropyLoss],
    task_weights: dict[str, float],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    ema: Ema | None,
    desc: str,
    bf16: bool = False,
) -> dict[str, float]:
    """One pass over the training set; returns mean loss and per-task training accuracy. bf16: autocast and
    channels_last (mixed_precision)."""
    model.train()
    total_loss, seen = 0.0, 0
    correct = {t: 0 for t in criteria}
    scored = {t: 0 for t in criteria}
    # A bar on a terminal only (a log gets the epoch's line), and none with -q (errors only).
    quiet = not sys.stderr.isatty() or not log.isEnabledFor(logging.WARNING)
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=quiet)
    for x, y, w in bar:
        x = x.to(device, non_blocking=True, memory_format=torch.channels_last if bf16 else torch.contiguous_format)
        y, w = y.to(device, non_blocking=True), w.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        losses = task_losses(logits, y, criteria, w)
        loss = sum(task_weights[t] * losses[t] for t in losses)
        value = float(loss.detach())  # type: ignore[union-attr]
        if not math.isfinite(value):  # a step on it would make every weight NaN
            raise TaggerError(f"{desc}: the loss is {value} after {seen} images; lower --lr or try --precision fp32")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(model)
        n = len(x)
        total_loss += value * n
        seen += n
        for i, t in enumerate(criteria):
            mask = y[:, i] != IGNORE
            correct[t] += int((logits[t].argmax(1)[mask] == y[mask, i]).sum())
            scored[t] += int(mask.sum())
        bar.set_postfix(loss=f"{total_loss / seen:.3f}")
    return {"loss": total_loss / max(seen, 1), **{f"acc_{t}": correct[t] / max(scored[t], 1) for t in criteria}}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    tasks: Sequence[TaskSpec],
    spec: PreprocessSpec,
    device: torch.device,
    batch_size: int = 256,
    bf16: bool = False,
    groups: Mapping[str, np.ndarray] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per task on fitted-and-padded uint8 images, as the runtime sees them: top-1, macro-F1, balanced accuracy,
    and the temperature that calibrates the scores on these images (tagger.temperature.fit_temperature).

    groups: name -> bool mask [N] of a subset (one --data folder's images), summarised under that name per task
    from the same predictions.
    """
    model.eval()
    norm = eval_transform(spec)
    probs: dict[str, list[np.ndarray]] = {t.name: [] for t in tasks}
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size]).to(device).permute(0, 3, 1, 2)  # [B,3,S,S] uint8
        x = norm(x).contiguous(memory_format=torch.channels_last if bf16 else torch.contiguous_format)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        for t in tasks:
            probs[t.name].append(torch.softmax(logits[t.name].float(), dim=1).cpu().numpy())  # [B, C]
    out: dict[str, dict[str, Any]] = {}
    for i, t in enumerate(tasks):
        p, y = np.concatenate(probs[t.name]), labels[:, i]  # [N, C], [N]
        out[t.name] = dict(summarize(y, p.argmax(1), len(t.labels)))
        for name, mask in (groups or {}).items():
            out[t.name][name] = dict(summarize(y[mask], p[mask].argmax(1), len(t.labels)))
        known = y != IGNORE
        out[t.name]["temperature"] = fit_temperature(p[known], y[known]) if known.any() else 1.0
    return out


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and normalisation parameters (1-D tensors)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _warmup_cosine(total_steps: int, warmup_steps: int) -> Any:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fit(cfg: TrainConfig) -> Path:
    """Train, validate every epoch, and write the run directory; returns the best checkpoint's path."""
    _seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    bf16 = mixed_precision(device, cfg.precision)
    task_columns = dict(cfg.tasks)
    try:
        check_task_names(task_columns)
    except ValueError as e:
        raise TaggerError(f"--task: {e}") from None
    task_weights = {t: 1.0 for t in task_columns}
    for name, w in cfg.task_weights:
        if name not in task_weights:
            raise TaggerError(f"--task-weight names unknown task {name!r}; tasks: {', '.join(task_weights)}")
        task_weights[name] = w
    folder_weights = data_folder_weights(cfg.data, cfg.data_weights)
    # Build the model first: an unknown backbone, missing weights or a bad --init fail before minutes of decoding.
    init = load_init(cfg.init) if cfg.init is not None and cfg.resume is None else None  # resume restores all
    probe_tasks = [TaskSpec(t, ("_",)) for t in task_columns]
    MultiTaskNet(cfg.backbone, probe_tasks, weights="none")

    data = load_labelled_set(cfg.data, task_columns, cfg.min_count, cfg.val_fraction, cfg.seed, cfg.limit)
    tasks = data.tasks
    spec = PreprocessSpec(size=cfg.image_size)
    t0 = time.perf_counter()
    train_images, train_ex = decode_cache(data.train, spec, cfg.workers)
    val_images, val_ex = decode_cache(data.val, spec, cfg.workers)
    log.info("decoded %d images in %.1fs", len(train_ex) + len(val_ex), time.perf_counter() - t0)
    train_labels, val_labels = _labels(train_ex), _labels(val_ex)
    sample_weights = np.array([folder_weights[e.source] for e in train_ex], np.float32)  # [N_train]
    val_sources = np.array([e.source for e in val_ex])
    # With several folders, each folder's validation images are scored on their own too (thumbnails, photos).
    val_groups = {}
    if len(cfg.data) > 1:
        val_groups = {d.name: val_sources == i for i, d in enumerate(cfg.data) if (val_sources == i).any()}

    cfg.out.mkdir(parents=True, exist_ok=True)
    weights_np = class_weights(train_ex, tasks, cfg.class_weight_power)
    weights = {t: torch.from_numpy(w) for t, w in weights_np.items()}
    with publishing(cfg.out / "class_weights.pt") as tmp:
        torch.save(weights, tmp)
    split = {
        "method": "sha256 of image bytes, seeded; identical files share a side",
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "train_ids": [e.id for e in train_ex],
        "val_ids": [e.id for e in val_ex],
    }
    publish_bytes(cfg.out / "split.json", json.dumps(split).encode())

    model = MultiTaskNet(cfg.backbone, tasks, weights="none" if init else cfg.weights)
    if init is not None:
        apply_init(model, tasks, init)
        calib = calibration_images(train_images, 512, cfg.seed)  # uint8 [n, S, S, 3]
        calibrate_folded_norms(model, init, eval_transform(spec)(torch.from_numpy(calib).permute(0, 3, 1, 2)))
    model = model.to(device)
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    log.info("training on %s in %s", device.type, "bf16 autocast, channels_last" if bf16 else "fp32")
    criteria = {
        t.name: nn.CrossEntropyLoss(
            weight=weights[t.name].to(device), ignore_index=IGNORE, label_smoothing=cfg.label_smoothing,
            reduction="none",
        )
        for t in tasks
    }
    generator = torch.Generator().manual_seed(cfg.seed)

    def loader_for(epoch: int) -> DataLoader:
        """The epoch's loader: early epochs train on smaller inputs (validation and export use the full size)."""
        size = cfg.early_size if epoch <= cfg.early_epochs else None
        return DataLoader(
            CachedImages(train_images, train_labels, train_transform(spec, cfg.downscale, size), sample_weights),
            batch_size=cfg.batch_size,
            shuffle=True,
            drop_last=len(train_images) > cfg.batch_size,
            num_workers=cfg.workers,
            pin_memory=device.type == "cuda",
            persistent_workers=cfg.workers > 0,
            generator=generator,
        )

    loader = loader_for(1)
    if len(loader) < FEW_BATCHES:
        log.warning(
            "only %d batches an epoch (%d training images at --batch-size %d%s): too few steps to learn much",
            len(loader), len(train_images), cfg.batch_size,
            f" (--limit {cfg.limit} kept {len(train_ex) + len(val_ex)} rows)" if cfg.limit is not None else "",
        )  # fmt: skip
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    steps = cfg.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(steps, max(1, int(cfg.warmup_epochs * len(loader))))
    )
    ema = Ema(model, cfg.ema_decay) if cfg.ema_decay > 0 else None

    start_epoch, best_score = 1, -1.0
    if cfg.resume is not None:
        start_epoch, best_score = _resume(cfg.resume, tasks, model, optimizer, scheduler, ema, generator)

    data_info = {
        "source": "+".join(d.name for d in cfg.data),
        "weights": {d.name: folder_weights[i] for i, d in enumerate(cfg.data)},
        "n_train": len(train_ex),
        "n_val": len(val_ex),
        "split": "content hash",
        "split_seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "min_count": cfg.min_count,
    }
    best_path = cfg.out / BEST_NAME
    for epoch in range(start_epoch, cfg.epochs + 1):
        t_epoch = time.perf_counter()
        if epoch == start_epoch or epoch == cfg.early_epochs + 1:
            loader = loader_for(epoch)
        train_stats = train_one_epoch(
            model, loader, criteria, task_weights, optimizer, scheduler, device, ema, f"epoch {epoch}/{cfg.epochs}",
            bf16,
        )
        scored = ema.module if ema is not None else model
        val = evaluate(scored, val_images, val_labels, tasks, spec, device, bf16=bf16, groups=val_groups)
        seconds = time.perf_counter() - t_epoch
        score = float(np.mean([val[t.name]["top1"] for t in tasks]))
        log.info(
            "epoch %d/%d | train acc %s | %s | loss %.3f | %.1fs",
            epoch, cfg.epochs,
            " ".join(f"{t.name} {train_stats['acc_' + t.name]:.2%}" for t in tasks),
            " | ".join(f"val {t.name} {_top1s(val[t.name], cfg.data)}" for t in tasks),
            train_stats["loss"], seconds,
        )
        record: dict[str, Any] = {"epoch": epoch, "train_loss": train_stats["loss"], "seconds": seconds, "lr": scheduler.get_last_lr()[0]}
        record["train_size"] = cfg.early_size if epoch <= cfg.early_epochs else cfg.image_size
        record.update({f"train_acc_{t.name}": train_stats["acc_" + t.name] for t in tasks})
        record.update({"val": val})
        with open(cfg.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

        extra = {
            "class_weights": weights,
            "metrics": val,
            "temperature": {t.name: val[t.name]["temperature"] for t in tasks},  # export divides logits by it
            "epoch": epoch,
            "args": cfg.to_dict(),
            "data": data_info,
        }
        if score > best_score:
            best_score = score
            save_checkpoint(best_path, scored, spec, tasks, **extra)
            log.info("new best (mean val top-1 %.2f%%) saved to %s", 100 * score, best_path)
        save_checkpoint(
            cfg.out / LAST_NAME, model, spec, tasks, **extra,
            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            ema=ema.module.state_dict() if ema is not None else None,
            ema_updates=ema.updates if ema is not None else 0, best_score=best_score, rng=_rng_state(generator),
        )
    return best_path


def _top1s(metrics: dict[str, Any], folders: Sequence[Path]) -> str:
    """"88.10%", or with several folders "88.10% (fashion-small 88.20%, fashion-photos 87.00%)"."""
    parts = [f"{d.name} {metrics[d.name]['top1']:.2%}" for d in folders if d.name in metrics]
    return f"{metrics['top1']:.2%}" + (f" ({', '.join(parts)})" if len(parts) > 1 else "")


def _resume(
    path: Path,
    tasks: Sequence[TaskSpec],
    model: MultiTaskNet,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema: Ema | None,
    generator: torch.Generator,
) -> tuple[int, float]:
    """Restore model, optimiser, schedule, EMA and random state from a last.pt; returns (next epoch, best score)."""
    raw = read_checkpoint(path)
    if raw["tasks"] != {t.name: list(t.labels) for t in tasks}:
        raise TaggerError(f"{path} was trained on other tasks or labels than this data; cannot resume")
    if "optimizer" not in raw:
        raise TaggerError(f"{path} holds no optimiser state; resume from a run's {LAST_NAME}")
    model.load_state_dict(raw["model"])
    optimizer.load_state_dict(raw["optimizer"])
    scheduler.load_state_dict(raw["scheduler"])
    if ema is not None and raw.get("ema") is not None:
        ema.module.load_state_dict(raw["ema"])
        ema.updates = int(raw.get("ema_updates", 0))
    if raw.get("rng") is not None:  # absent from checkpoints of older versions
        _set_rng_state(raw["rng"], generator)
    log.info("resumed from %s at epoch %d", path, raw["epoch"])
    return int(raw["epoch"]) + 1, float(raw.get("best_score", -1.0))


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    """The random state the next epoch draws from: shuffle order and worker seeds (generator), augmentation and
    dropout (torch's global generators). Saved in last.pt so a resumed run continues as an uninterrupted one would."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "loader": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
