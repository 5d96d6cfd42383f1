"""Self-describing checkpoints: everything needed to rebuild the model, export it and know where it came from."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from tagger._version import __version__
from tagger.contract import PreprocessSpec, TaskSpec
from tagger.errors import TaggerError, one_line
from tagger.guards import check_destination
from tagger.storage import publishing
from tagger.train.model import MultiTaskNet

CHECKPOINT_FORMAT = "tagger.checkpoint/1"
REQUIRED_KEYS = ("format", "model", "backbone", "preprocess", "tasks")


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A rebuilt model in eval mode plus the checkpoint's metadata."""

    model: MultiTaskNet
    preprocess: PreprocessSpec
    tasks: tuple[TaskSpec, ...]
    raw: Mapping[str, Any]  # the whole checkpoint dict: metrics, epoch, args, class_weights, data, version

    @property
    def metrics(self) -> Mapping[str, Any]:
        return self.raw.get("metrics", {})


def save_checkpoint(
    path: str | os.PathLike[str],
    model: MultiTaskNet,
    preprocess: PreprocessSpec,
    tasks: tuple[TaskSpec, ...],
    **extra: Any,
) -> None:
    """Publish through tagger.storage, so an interrupted save or a power loss never leaves a broken checkpoint."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "backbone": model.backbone_name,
        "preprocess": preprocess.to_dict(),
        "tasks": {t.name: list(t.labels) for t in tasks},
        "tagger_version": __version__,
        **extra,
    }
    with publishing(path) as tmp:
        try:
            torch.save(state, tmp)
        except OSError as e:
            raise TaggerError(f"cannot write {path}: {one_line(e)}") from None


def read_checkpoint(path: str | os.PathLike[str], map_location: str = "cpu") -> dict[str, Any]:
    """Load and validate the raw checkpoint dict; bad input becomes a TaggerError."""
    path = Path(path)
    if not path.is_file():
        raise TaggerError(f"checkpoint {path} is not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch warns about pickle protocols of foreign files
            raw = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many unrelated types for a non-checkpoint file
        # Its own advice (retry with weights_only=False) would run arbitrary code from the file, so it is not passed on.
        raise TaggerError(f"{path} is not a tagger checkpoint (torch.load failed with {type(e).__name__})") from None
    if not isinstance(raw, dict):
        raise TaggerError(f"{path} is not a tagger checkpoint (found {type(raw).__name__})")
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise TaggerError(f"{path} is missing checkpoint keys: {', '.join(missing)}")
    if raw["format"] != CHECKPOINT_FORMAT:
        raise TaggerError(f"{path} has checkpoint format {raw['format']!r}; this tagger reads {CHECKPOINT_FORMAT!r}")
    return raw


def load_checkpoint(path: str | os.PathLike[str], map_location: str = "cpu") -> LoadedCheckpoint:
    """Rebuild the model from the checkpoint alone (no pretrained weights are fetched)."""
    raw = read_checkpoint(path, map_location)
    tasks = tuple(TaskSpec(name, tuple(labels)) for name, labels in raw["tasks"].items())
    model = MultiTaskNet(raw["backbone"], tasks, weights="none")
    model.load_state_dict(raw["model"])
    model.eval()
    return LoadedCheckpoint(model, PreprocessSpec.from_dict(raw["preprocess"]), tasks, raw)


# What a weights file keeps of a checkpoint: enough to rebuild, export, fine-tune from (--init) and know its origin.
WEIGHTS_KEYS = (*REQUIRED_KEYS, "tagger_version", "temperature", "metrics", "epoch", "args", "data")


def save_weights(src: str | os.PathLike[str], dst: str | os.PathLike[str], half: bool = True) -> Path:
    """A checkpoint without the optimiser, schedule, EMA and random state, float tensors in fp16 with `half`
    (Lite0: 7 MB instead of 19 MB; the probabilities move by ~1e-3, so export the model from this file)."""
    raw = read_checkpoint(src)
    check_destination(Path(dst), Path(src), "checkpoint")
    model = {k: (v.half() if half and v.is_floating_point() else v) for k, v in raw["model"].items()}
    state = {k: raw[k] for k in WEIGHTS_KEYS if k in raw}
    state["model"] = model
    with publishing(dst) as tmp:
        try:
            torch.save(state, tmp)
        except OSError as e:
            raise TaggerError(f"cannot write {dst}: {one_line(e)}") from None
    return Path(dst)
