"""Training side: the only part of tagger that imports torch, torchvision and timm (its modules; not this one)."""

from __future__ import annotations

import importlib

from tagger.errors import TaggerError

TRAIN_EXTRA = "pip install 'tagger[train]'"


def check_train_dependencies(what: str, modules: tuple[str, ...]) -> None:
    """Raise TaggerError (one line, with the install command) when a package of the train extra is missing."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise TaggerError(f"{what} needs the train extra: {TRAIN_EXTRA} (cannot import {name}: {e})") from None
