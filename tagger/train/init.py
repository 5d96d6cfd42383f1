"""`tagger train --init`: start from a model's weights (the shipped default, a checkpoint, or a tagger ONNX model)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from tagger.contract import TaskSpec
from tagger.errors import TaggerError
from tagger.model.edit import linear_head, onnx_module
from tagger.model.info import read_model_metadata
from tagger.model.registry import default_model_path, shipped_weights_path
from tagger.train.checkpoint import read_checkpoint
from tagger.train.model import MultiTaskNet

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = "default"  # --init default: the shipped default model's weights (tagger-default.pt)


@dataclass(frozen=True)
class InitWeights:
    """Weights to start from. A model from `tagger export` has no batch norms: the exporter folded each into the
    conv before it, whose bias [C] is in `folded` by conv module name (absent where it was all zeros);
    `calibrate_folded_norms` rebuilds those norms from data."""

    source: str
    backbone: str
    state: Mapping[str, torch.Tensor]  # backbone tensors, MultiTaskNet key names
    heads: Mapping[str, tuple[tuple[str, ...], torch.Tensor, torch.Tensor]]  # task -> (labels, W [C, F], b [C])
    folded: Mapping[str, torch.Tensor]


def load_init(source: str) -> InitWeights:
    """`default`, a tagger checkpoint (.pt) or a model `tagger export` wrote (.onnx)."""
    path = Path(source)
    if source == DEFAULT_WEIGHTS:
        try:
            path = shipped_weights_path()
        except TaggerError:  # an install without the weights file: read them back from the default model's graph
            path = default_model_path()
    if not path.is_file():
        raise TaggerError(f"--init {source}: no such file; use default, a checkpoint (.pt) or a tagger model (.onnx)")
    if path.suffix == ".onnx":
        return _from_onnx(path)
    raw = read_checkpoint(path)
    state = {k: v.float() for k, v in raw["model"].items()}
    heads = {
        name: (tuple(labels), state[f"heads.{name}.weight"], state[f"heads.{name}.bias"])
        for name, labels in raw["tasks"].items()
    }
    backbone = {k: v for k, v in state.items() if k.startswith("backbone.")}
    return InitWeights(str(path), str(raw["backbone"]), backbone, heads, {})


def _from_onnx(path: Path) -> InitWeights:
    """Weights read back from the graph. The exporter folds each batch norm into the conv before it (weight and a
    `<conv>.weight_bias` initializer); those convs are listed in `folded`."""
    onnx = onnx_module()
    proto = onnx.load(str(path))
    info = read_model_metadata(path)
    inits = {i.name: torch.from_numpy(onnx.numpy_helper.to_array(i).copy()) for i in proto.graph.initializer}
    if any(t.dtype != torch.float32 for k, t in inits.items() if k.startswith("backbone.")):
        raise TaggerError(f"--init {path}: only fp32 models can be trained from; use the fp32 model")
    folded = {k[: -len(".weight_bias")]: v for k, v in inits.items() if k.endswith(".weight_bias")}
    state = {k: v for k, v in inits.items() if k.startswith("backbone.") and not k.endswith(".weight_bias")}
    heads = {}
    for task in info.tasks:
        found = linear_head(proto, task.name)
        if found is None:
            log.warning("--init: the %s head of %s is not linear; it starts from scratch", task.name, path)
            continue
        w, b = found
        heads[task.name] = (tuple(task.labels), torch.from_numpy(w), torch.from_numpy(b))
    return InitWeights(str(path), info.backbone, state, heads, folded)


def apply_init(model: MultiTaskNet, tasks: Sequence[TaskSpec], init: InitWeights) -> None:
    """Copy the backbone, and each head row whose task and label both exist in `init`; the rest keep their fresh
    initialisation (a new task, or a label the init model never had)."""
    if init.backbone != model.backbone_name:
        raise TaggerError(f"--init {init.source} is a {init.backbone} model; this run trains {model.backbone_name}")
    own = model.state_dict()
    rebuilt = {norm for norm, _ in _folded_norms(own, init).values()}
    # The exporter drops a bias of zeros from the graph (a conv whose weight is there has one of zeros).
    zeros = [k for k in own if k.endswith(".bias") and k not in init.state and f"{k[:-5]}.weight" in init.state]
    missing = [
        k for k in own
        if k.startswith("backbone.") and k not in init.state and k not in zeros and k.rsplit(".", 1)[0] not in rebuilt
    ]
    if missing:
        raise TaggerError(f"--init {init.source}: its weights do not fit {model.backbone_name} (no {missing[0]})")
    with torch.no_grad():
        for k, v in init.state.items():
            if k not in own or own[k].shape != v.shape:
                raise TaggerError(f"--init {init.source}: its weights do not fit {model.backbone_name} (at {k})")
            own[k].copy_(v)
        for k in zeros:
            own[k].zero_()
        for task in tasks:
            if task.name not in init.heads:
                continue
            labels, w, b = init.heads[task.name]
            row = {lab: i for i, lab in enumerate(labels)}
            head = model.heads[task.name]
            assert isinstance(head, nn.Linear)
            shared = [(i, row[lab]) for i, lab in enumerate(task.labels) if lab in row]
            for i, j in shared:
                head.weight[i].copy_(w[j])
                head.bias[i].copy_(b[j])
            log.info("--init: %s head from %s (%d of %d labels)", task.name, init.source, len(shared), len(task.labels))


def _folded_norms(own: Mapping[str, torch.Tensor], init: InitWeights) -> dict[str, tuple[str, torch.Tensor]]:
    """Conv module -> (the batch norm after it, its folded bias [C]) for each norm `init` has no tensors of.

    A norm belongs to the last conv defined before it (timm's blocks define each norm after its conv; a squeeze-
    excite's convs come before the projecting conv and its norm)."""
    if not init.folded and any(k.endswith(".running_mean") for k in init.state):
        return {}
    out: dict[str, tuple[str, torch.Tensor]] = {}
    last_conv = None
    for name in dict.fromkeys(k.rsplit(".", 1)[0] for k in own):
        weight = own.get(f"{name}.weight")
        if f"{name}.running_mean" in own:
            if f"{name}.running_mean" in init.state:
                continue
            channels = own[f"{name}.running_mean"].shape[0]
            if last_conv is None or own[f"{last_conv}.weight"].shape[0] != channels:
                raise TaggerError(f"cannot tell which conv {name} follows; this model cannot be trained from")
            out[last_conv] = (name, init.folded.get(last_conv, torch.zeros(channels)))
            last_conv = None
        elif weight is not None and weight.ndim == 4:
            last_conv = name
    return out


@torch.no_grad()
def calibrate_folded_norms(model: MultiTaskNet, init: InitWeights, images: torch.Tensor, batch_size: int = 64) -> None:
    """Rebuild the batch norms the exporter folded away, so the network computes exactly what the ONNX graph does.

    Each folded norm first becomes "add the folded bias" (gamma 1, beta bias, mean 0, var 1 - eps). The inputs z
    [N, C, H, W] each norm then sees on `images` (normalised float [N, 3, S, S]) give per-channel mean m and
    variance v; with running stats (m, v), gamma sqrt(v + eps) and beta m + bias the eval output is unchanged, and
    in training the batch statistics start where the graph's activations are, not at an arbitrary scale.
    """
    pairs = _folded_norms(model.state_dict(), init)
    if not pairs:
        return
    modules = dict(model.named_modules())
    stats: dict[str, list[torch.Tensor]] = {norm: [] for norm, _ in pairs.values()}
    hooks = []
    for norm, bias in pairs.values():
        bn = modules[norm]
        assert isinstance(bn, nn.BatchNorm2d)
        bn.weight.fill_(1.0)
        bn.bias.copy_(bias)
        bn.running_mean.zero_()  # type: ignore[union-attr]
        bn.running_var.fill_(1.0 - bn.eps)  # type: ignore[union-attr]

        def record(_m: nn.Module, args: tuple[torch.Tensor, ...], name: str = norm) -> None:
            z = args[0].float()  # [N, C, H, W]
            stats[name].append(torch.stack([z.mean((0, 2, 3)), (z * z).mean((0, 2, 3))]))  # [2, C]

        hooks.append(bn.register_forward_pre_hook(record))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(images), batch_size):
            model.features(images[start : start + batch_size])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    for norm, bias in pairs.values():
        bn = modules[norm]
        assert isinstance(bn, nn.BatchNorm2d)
        mean, sq = torch.stack(stats[norm]).mean(0)  # equal batches but the last: close enough for a start
        var = (sq - mean * mean).clamp_min(1e-6)
        bn.running_mean.copy_(mean)  # type: ignore[union-attr]
        bn.running_var.copy_(var)  # type: ignore[union-attr]
        bn.weight.copy_(torch.sqrt(var + bn.eps))
        bn.bias.copy_(mean + bias)
    log.info("--init: rebuilt %d folded batch norms from %d images", len(pairs), len(images))


def calibration_images(images: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A seeded sample of up to n uint8 [S, S, 3] training images."""
    pick = np.random.default_rng(seed).permutation(len(images))[:n]
    return images[np.sort(pick)]
