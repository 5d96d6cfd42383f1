"""Training speed of `tagger train`'s own loop for each precision on the same images, model and steps: images per
second of wall time, and images per CPU-second (this process and its loader workers), which a shared, loaded
machine distorts far less than wall time."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from tagger.contract import DEFAULT_TASKS, PreprocessSpec
from tagger.metrics import IGNORE
from tagger.train.augment import train_transform
from tagger.train.data import decode_cache, load_labelled_set
from tagger.train.hardware import cpu_has_bf16, mixed_precision, pick_device
from tagger.train.loop import CachedImages, _labels, train_one_epoch
from tagger.train.model import MultiTaskNet

WARMUP_BATCHES = 3  # first steps allocate and pick kernels; not timed


def _cpu_seconds() -> float:
    """CPU time of this process and of its children that ended (the loader's workers end with each pass)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(args: argparse.Namespace, precision: str, dataset: CachedImages, tasks: tuple) -> tuple[float, float]:
    """(images/s, images per CPU-second) of one timed pass of train_one_epoch over `dataset`, after a short
    untimed one."""
    torch.manual_seed(0)
    device = pick_device(args.device)
    bf16 = mixed_precision(device, precision)
    model = MultiTaskNet(args.backbone, tasks, weights="none").to(device)  # speed does not depend on the weights
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    criteria = {t.name: nn.CrossEntropyLoss(ignore_index=IGNORE, reduction="none") for t in tasks}
    weights = {t.name: 1.0 for t in tasks}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def loader(data: CachedImages | Subset) -> DataLoader:
        return DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers)

    warmup = Subset(dataset, range(min(len(dataset), WARMUP_BATCHES * args.batch_size)))
    train_one_epoch(model, loader(warmup), criteria, weights, optimizer, scheduler, device, None, "warm-up", bf16)
    timed = loader(dataset)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    train_one_epoch(model, timed, criteria, weights, optimizer, scheduler, device, None, precision, bf16)
    n = len(timed) * args.batch_size
    return n / (time.perf_counter() - t0), n / (_cpu_seconds() - c0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", type=Path, required=True, help="styles.csv + images/ folder")
    p.add_argument("--limit", type=int, default=640, help="training images (steps = limit / batch size)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8))
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated, timed in this order")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    data = load_labelled_set([args.data], dict(DEFAULT_TASKS), limit=args.limit, val_fraction=0.01)
    spec = PreprocessSpec(size=args.image_size)
    images, examples = decode_cache(data.train, spec, args.workers)
    dataset = CachedImages(images, _labels(examples), train_transform(spec))
    result: dict[str, object] = {
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
        "cpu_bf16": cpu_has_bf16(),
        "torch": torch.__version__,
        "load_before": os.getloadavg()[0],
        "images": len(dataset),
        "steps": len(dataset) // args.batch_size,
        "config": {k: str(v) for k, v in vars(args).items() if k != "json"},
    }
    rates, per_cpu = {}, {}
    for precision in args.precisions.split(","):
        rates[precision], per_cpu[precision] = measure(args, precision, dataset, data.tasks)
        print(f"{precision:5s} {rates[precision]:7.1f} img/s", file=sys.stderr)
    result["img_per_s"] = rates
    result["img_per_cpu_s"] = per_cpu
    result["load_after"] = os.getloadavg()[0]
    first, first_cpu = next(iter(rates.values())), next(iter(per_cpu.values()))
    for name in rates:
        print(
            f"{name:5s} {rates[name]:7.1f} img/s ({rates[name] / first:.2f}x)  "
            f"{per_cpu[name]:6.2f} img/CPU-s ({per_cpu[name] / first_cpu:.2f}x)"
        )
    print(f"{result['machine']}, cpu bf16: {result['cpu_bf16']}, load {result['load_before']:.1f} -> {result['load_after']:.1f}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
