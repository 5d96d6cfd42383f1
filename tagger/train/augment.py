"""Training-only augmentation (torchvision transforms v2) and the evaluation transform the runtime mirrors."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from tagger.contract import PreprocessSpec


def normalize(spec: PreprocessSpec) -> v2.Transform:
    """uint8 [3, S, S] -> normalised float, the same arithmetic the exported graph performs."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std))])


def train_transform(spec: PreprocessSpec) -> v2.Transform:
    """Mild geometric and photometric jitter on the already fitted-and-padded uint8 image.

    Colour is a label, so there is no hue or saturation jitter and brightness/contrast stay mild. Affine fill is the
    pad colour so shifted products still sit on white.
    """
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomAffine(degrees=5, translate=(0.06, 0.06), scale=(0.85, 1.1), fill=list(spec.pad_color)),
            v2.ColorJitter(brightness=0.1, contrast=0.1),
            normalize(spec),
        ]
    )


def eval_transform(spec: PreprocessSpec) -> v2.Transform:
    """No augmentation: exactly the runtime's input after fit-and-pad."""
    return normalize(spec)
