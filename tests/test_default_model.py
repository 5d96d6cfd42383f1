"""The shipped default model is found without --model, and the shipped models are packaged into the wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tagger.model.registry import DEFAULT_MODEL_NAME, SHIPPED_MODELS, default_model_path

ROOT = Path(__file__).resolve().parents[1]


def test_default_model_is_found_in_a_source_checkout() -> None:
    if not (ROOT / "export" / DEFAULT_MODEL_NAME).is_file():
        pytest.skip("no default model in export/")
    assert default_model_path().read_bytes()[:64] == (ROOT / "export" / DEFAULT_MODEL_NAME).read_bytes()[:64]


@pytest.mark.slow
def test_built_wheel_carries_the_shipped_models(tmp_path: Path) -> None:
    if not (ROOT / "export" / DEFAULT_MODEL_NAME).is_file():
        pytest.skip("no default model in export/")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        check=True,
    )
    (wheel,) = tmp_path.glob("tagger-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"tagger/_default_model/{file}" for file in SHIPPED_MODELS.values()} <= set(names)
    assert "tagger/py.typed" in names


def test_every_package_of_tagger_is_listed_for_the_wheel() -> None:
    """pyproject lists the packages by hand: a new one left out would be missing from `pip install .`."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "tagger").rglob("__init__.py")}
    assert packages and packages <= listed, sorted(packages - listed)
