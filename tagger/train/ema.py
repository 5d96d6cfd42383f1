"""A weight EMA for training: validation and the best checkpoint score the averaged weights."""

from __future__ import annotations

import copy

import torch
from torch import nn

from tagger.train.model import MultiTaskNet


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
