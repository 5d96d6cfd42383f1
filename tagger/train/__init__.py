"""Training side: the only part of tagger that imports torch, torchvision and timm."""
