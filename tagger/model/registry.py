"""Models shipped with the package, by the name `--model` accepts for them, and how a model argument becomes a file."""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path
from typing import Mapping

from tagger.errors import TaggerError

DEFAULT_MODEL_NAME = "tagger-default.onnx"
# Models shipped with the package, by the name `--model` accepts for them.
SHIPPED_MODELS: Mapping[str, str] = {"default": DEFAULT_MODEL_NAME, "default-int8": "tagger-default.int8.onnx"}
# The default model's training weights (`tagger train --init default`): `tagger export` of it gives the default model.
DEFAULT_WEIGHTS_NAME = "tagger-default.pt"


def default_model_path() -> Path:
    """The shipped default model."""
    return shipped_model_path("default")


def shipped_model_path(name: str) -> Path:
    """A model shipped with the package: package data tagger/_default_model/, else export/ of a source checkout."""
    return _shipped_file(SHIPPED_MODELS[name], f"the shipped model {name!r}", "pass --model MODEL.onnx")


def shipped_weights_path() -> Path:
    """The default model's training weights, shipped beside it."""
    return _shipped_file(DEFAULT_WEIGHTS_NAME, "the default model's weights", "pass --init CHECKPOINT.pt")


def _shipped_file(file: str, what: str, hint: str) -> Path:
    try:
        packaged = importlib.resources.files("tagger._default_model") / file
        if packaged.is_file():
            return Path(str(packaged))
    except ModuleNotFoundError:
        pass
    checkout = Path(__file__).resolve().parents[2] / "export" / file
    if checkout.is_file():
        return checkout
    raise TaggerError(f"{what} is not installed ({file} not found); {hint}")


def is_shipped_name(model: str | os.PathLike[str]) -> bool:
    """Whether `model` names a shipped model; a file of that name in the working folder wins."""
    return os.fspath(model) in SHIPPED_MODELS and not Path(model).exists()


def derived_model_path(model: str | os.PathLike[str] | None, resolved: Path, suffix: str) -> Path:
    """Default path of a file made from `model`: beside it with `suffix`, or in the working folder for a shipped one."""
    base = Path(resolved.name) if model is not None and is_shipped_name(model) else resolved
    return base.with_suffix(suffix)


def resolve_model(model: str | os.PathLike[str] | None) -> Path:
    """A model file: None is the default model, a shipped model's name is that model, anything else a path."""
    if model is None:
        return default_model_path()
    return shipped_model_path(os.fspath(model)) if is_shipped_name(model) else Path(model)
