"""The training loop: train_one_epoch, evaluate, and fit(config), which writes a self-describing run directory."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

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
from tagger.train.data import Example, class_weights, decode_cache, default_workers, load_labelled_set
from tagger.train.model import MultiTaskNet

log = logging.getLogger(__name__)

BEST_NAME = "image_mtl_best.pt"
LAST_NAME = "last.pt"
FEW_BATCHES = 10  # batches an epoch below which a run is said to learn little (a small --limit, a large --batch-size)


@dataclass(frozen=True)
class TrainConfig:
    data: Path
    out: Path
    epochs: int = 15
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    image_size: int = 160
    backbone: str = "tf_efficientnet_lite0"
    weights: str = "imagenet"
    device: str = "auto"
    workers: int = field(default_factory=default_workers)
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

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


class CachedImages(Dataset):
    """Decoded uint8 [N, S, S, 3] images plus int64 labels [N, T], transformed per sample."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: nn.Module) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(self.images[i]).permute(2, 0, 1)  # HWC -> CHW, uint8
        return self.transform(x), torch.from_numpy(self.labels[i])


class Ema:
    """Exponential moving average of the weights, with timm's warm-up so early epochs are not stuck at the init."""

    def __init__(self, model: MultiTaskNet, decay: float) -> None:
        self.module: MultiTaskNet = copy.deepcopy(model).eval()
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.mul_(d).add_(m.detach(), alpha=1 - d)
            else:
                e.copy_(m)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise TaggerError("--device cuda was asked for, but no CUDA device is available to torch")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise TaggerError(f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device(name)


PRECISIONS = ("auto", "bf16", "fp32")
_CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_has_bf16() -> bool:
    """Whether the CPU has bf16 instructions (AVX512-BF16 or AMX), as /proc/cpuinfo lists them. torch's own check
    (mkldnn bf16 support) also says yes on AVX512 CPUs that only emulate bf16, where it does not pay."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(
                line.startswith("flags") and not _CPU_BF16_FLAGS.isdisjoint(line.split()) for line in f
            )
    except OSError:  # not Linux
        return False


def mixed_precision(device: torch.device, precision: str = "auto") -> bool:
    """Whether to train and validate under bf16 autocast with channels_last tensors: on CUDA, and on CPUs with
    bf16 instructions (on an AVX512-BF16 CPU, Lite0 at 160 px trained 1.2x more images per CPU-second than in fp32
    and reached the same validation accuracy; README, Training)."""
    if precision not in PRECISIONS:
        raise TaggerError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" or cpu_has_bf16()


def _labels(examples: Sequence[Example]) -> np.ndarray:
    return np.array([e.labels for e in examples], dtype=np.int64).reshape(len(examples), -1)


def task_losses(
    logits: dict[str, torch.Tensor], y: torch.Tensor, criteria: dict[str, nn.Module]
) -> dict[str, torch.Tensor]:
    """Cross-entropy per task; a batch with no scored label for a task contributes 0, not NaN."""
    out = {}
    for i, (name, crit) in enumerate(criteria.items()):
        target = y[:, i]
        if bool((target != IGNORE).any()):
            out[name] = crit(logits[name].float(), target)
        else:
            out[name] = logits[name].sum() * 0.0
    return out


def train_one_epoch(
    model: MultiTaskNet,
    loader: DataLoader,
    criteria: dict[str, nn.Module],
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
    for x, y in bar:
        x = x.to(device, non_blocking=True, memory_format=torch.channels_last if bf16 else torch.contiguous_format)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        losses = task_losses(logits, y, criteria)
        loss = sum(task_weights[t] * losses[t] for t in losses)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(model)
        n = len(x)
        total_loss += float(loss.detach()) * n  # type: ignore[union-attr]
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
) -> dict[str, dict[str, float]]:
    """Per task on fitted-and-padded uint8 images, as the runtime sees them: top-1, macro-F1, balanced accuracy,
    and the temperature that calibrates the scores on these images (tagger.temperature.fit_temperature)."""
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
    out: dict[str, dict[str, float]] = {}
    for i, t in enumerate(tasks):
        p, y = np.concatenate(probs[t.name]), labels[:, i]  # [N, C], [N]
        out[t.name] = dict(summarize(y, p.argmax(1), len(t.labels)))
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
    # Build the model first: an unknown backbone or missing weights fail before minutes of decoding.
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

    model = MultiTaskNet(cfg.backbone, tasks, weights=cfg.weights).to(device)
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    log.info("training on %s in %s", device.type, "bf16 autocast, channels_last" if bf16 else "fp32")
    criteria: dict[str, nn.Module] = {
        t.name: nn.CrossEntropyLoss(
            weight=weights[t.name].to(device), ignore_index=IGNORE, label_smoothing=cfg.label_smoothing
        )
        for t in tasks
    }
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(
        CachedImages(train_images, train_labels, train_transform(spec)),
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=len(train_images) > cfg.batch_size,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.workers > 0,
        generator=generator,
    )
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
        "source": cfg.data.name,
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
        train_stats = train_one_epoch(
            model, loader, criteria, task_weights, optimizer, scheduler, device, ema, f"epoch {epoch}/{cfg.epochs}",
            bf16,
        )
        scored = ema.module if ema is not None else model
        val = evaluate(scored, val_images, val_labels, tasks, spec, device, bf16=bf16)
        seconds = time.perf_counter() - t_epoch
        score = float(np.mean([val[t.name]["top1"] for t in tasks]))
        log.info(
            "epoch %d/%d | train acc %s | %s | loss %.3f | %.1fs",
            epoch, cfg.epochs,
            " ".join(f"{t.name} {train_stats['acc_' + t.name]:.2%}" for t in tasks),
            " | ".join(f"val {t.name} {val[t.name]['top1']:.2%}" for t in tasks),
            train_stats["loss"], seconds,
        )
        record: dict[str, Any] = {"epoch": epoch, "train_loss": train_stats["loss"], "seconds": seconds, "lr": scheduler.get_last_lr()[0]}
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
