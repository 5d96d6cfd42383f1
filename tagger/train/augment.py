"""Training-only augmentation (torchvision transforms v2) and the evaluation transform the runtime mirrors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from tagger.contract import PreprocessSpec


def normalize(spec: PreprocessSpec) -> v2.Transform:
    """uint8 [3, S, S] -> normalised float, the same arithmetic the exported graph performs."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std))])


class DownUp(torch.nn.Module):
    """With probability p, shrink a uint8 [3, S, S] image by a random factor in `scale` and scale it back to S.

    A 60x80 thumbnail fitted into 160 px is a 2x upscale, soft; a real-size photo fitted into 160 px is sharp. Down
    to 0.35-0.9 and back up, a sharp photo looks like a thumbnail, or like the small photos catalogs also hold, so the
    backbone learns both looks of one product; on a thumbnail it costs little (its detail is already at 0.5).
    """

    def __init__(self, p: float, scale: tuple[float, float] = (0.35, 0.9)) -> None:
        super().__init__()
        self.p, self.scale = p, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p <= 0 or float(torch.rand(())) >= self.p:
            return x
        size = x.shape[-1]
        f = self.scale[0] + float(torch.rand(())) * (self.scale[1] - self.scale[0])
        small = F.interpolate(x[None].float(), size=max(8, round(size * f)), mode="bilinear", antialias=True)
        up = F.interpolate(small, size=size, mode="bilinear", align_corners=False)
        return up[0].round().clamp(0, 255).to(torch.uint8)


def train_transform(spec: PreprocessSpec, downscale: float = 0.0, size: int | None = None) -> v2.Transform:
    """Mild geometric and photometric jitter on the already fitted-and-padded uint8 image; `downscale` is DownUp's
    probability; `size` resizes the result (the smaller inputs of early epochs).

    Colour is a label, so there is no hue or saturation jitter and brightness/contrast stay mild. Affine fill is the
    pad colour so shifted products still sit on white.
    """
    steps: list[torch.nn.Module] = [
        DownUp(downscale),
        v2.RandomHorizontalFlip(),
        v2.RandomAffine(degrees=5, translate=(0.06, 0.06), scale=(0.85, 1.1), fill=list(spec.pad_color)),
        v2.ColorJitter(brightness=0.1, contrast=0.1),
    ]
    if size is not None and size != spec.size:
        steps.append(v2.Resize(size, antialias=True))
    return v2.Compose([*steps, normalize(spec)])


def eval_transform(spec: PreprocessSpec) -> v2.Transform:
    """No augmentation: exactly the runtime's input after fit-and-pad."""
    return normalize(spec)
