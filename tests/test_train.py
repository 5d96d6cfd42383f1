"""Trainer tests on generated catalogs: CSV quirks, the content-hash split, learning, checkpoints, clean errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageDraw

import tagger
from tagger.cli import main
from tagger.labelled import read_styles
from tagger.metrics import IGNORE
from tagger.train.data import class_weights, load_labelled_set
from tagger.train.loop import TrainConfig, fit

HEADER = "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName\n"
COLORS = {"Red": (220, 30, 30), "Green": (30, 190, 40), "Blue": (30, 40, 220)}
SHAPES = ("Circle", "Square", "Bar")


def _draw(shape: str, rgb: tuple[int, int, int], rng: np.random.Generator) -> Image.Image:
    img = Image.new("RGB", (48, 64), "white")  # portrait, like product photos
    d = ImageDraw.Draw(img)
    x, y = rng.integers(4, 12), rng.integers(8, 20)
    if shape == "Circle":
        d.ellipse([x, y, x + 30, y + 30], fill=rgb)
    elif shape == "Square":
        d.rectangle([x, y, x + 30, y + 30], fill=rgb)
    else:
        d.rectangle([x + 10, y - 6, x + 18, y + 40], fill=rgb)
    return img


def make_catalog(root: Path, per_combo: int = 14, seed: int = 0) -> Path:
    """styles.csv + images/<id>.jpg of coloured shapes: class = shape, color = fill colour."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    lines = [HEADER]
    i = 1000
    for shape in SHAPES:
        for color, rgb in COLORS.items():
            for _ in range(per_combo):
                _draw(shape, rgb, rng).save(root / "images" / f"{i}.jpg", quality=92)
                lines.append(f"{i},Men,Apparel,Topwear,{shape},{color},Summer,2012,Casual,A {color} {shape}\n")
                i += 1
    (root / "styles.csv").write_text("".join(lines))
    return root


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_catalog(tmp_path_factory.mktemp("catalog"))


@pytest.fixture(scope="module")
def trained(catalog: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainConfig]:
    cfg = TrainConfig(
        data=(catalog,), out=tmp_path_factory.mktemp("run"), epochs=8, batch_size=16, lr=3e-3, image_size=32,
        backbone="test_efficientnet", weights="none", device="cpu", workers=0, val_fraction=0.25, ema_decay=0.0,
    )
    return fit(cfg), cfg


def test_extra_commas_in_last_field_are_rejoined(tmp_path: Path) -> None:
    (tmp_path / "styles.csv").write_text(
        HEADER
        + "1,Men,Apparel,Topwear,Tshirts,Navy Blue,Fall,2011,Casual,Turtle Men, Navy, Blue Shirt\n"
        + '2,Women,Footwear,Shoes,Heels,Black,Summer,2012,Casual,"Quoted, Heels"\n'
    )
    rows = read_styles(tmp_path / "styles.csv")
    assert [r["articleType"] for r in rows] == ["Tshirts", "Heels"]
    assert rows[0]["baseColour"] == "Navy Blue"
    assert rows[0]["productDisplayName"] == "Turtle Men, Navy, Blue Shirt"
    assert rows[1]["productDisplayName"] == "Quoted, Heels"


def test_rare_labels_and_missing_images(tmp_path: Path) -> None:
    root = make_catalog(tmp_path / "c", per_combo=3)
    with open(root / "styles.csv", "a") as f:
        f.write("1,Men,Apparel,Topwear,Circle,Magenta,Summer,2012,Casual,rare colour\n")  # kept, colour ignored
        f.write("2,Men,Apparel,Topwear,Circle,Red,Summer,2012,Casual,no image\n")  # dropped
        f.write("3,Men,Apparel,Topwear,Hexagon,Red,Summer,2012,Casual,rare class\n")  # dropped
    shutil.copy(root / "images" / "1000.jpg", root / "images" / "1.jpg")
    Image.new("RGB", (10, 10), "red").save(root / "images" / "3.jpg")
    data = load_labelled_set([root], {"class": "articleType", "color": "baseColour"}, min_count=8, val_fraction=0.3)
    tasks = {t.name: t.labels for t in data.tasks}
    assert set(tasks["class"]) == set(SHAPES)
    assert "Magenta" not in tasks["color"] and "Hexagon" not in tasks["class"]
    examples = {e.id: e for e in data.train + data.val}
    assert "2" not in examples and "3" not in examples
    assert examples["1"].labels[1] == IGNORE and examples["1"].labels[0] != IGNORE


def test_hash_split_never_leaks_a_duplicate(tmp_path: Path) -> None:
    root = make_catalog(tmp_path / "c", per_combo=10)
    lines = (root / "styles.csv").read_text().splitlines(keepends=True)
    # 40 byte-identical copies under new ids, some with conflicting labels.
    for k in range(40):
        src = 1000 + 2 * k
        shutil.copy(root / "images" / f"{src}.jpg", root / "images" / f"{5000 + k}.jpg")
        color = "Blue" if k % 2 else lines[1 + 2 * k].split(",")[5]
        lines.append(f"{5000 + k},Men,Apparel,Topwear,{lines[1 + 2 * k].split(',')[4]},{color},S,2012,C,copy\n")
    (root / "styles.csv").write_text("".join(lines))
    for seed in (0, 1, 2):
        data = load_labelled_set([root], {"class": "articleType", "color": "baseColour"}, seed=seed, val_fraction=0.3)
        train_digests = {e.digest for e in data.train}
        assert not train_digests & {e.digest for e in data.val}
        assert len(data.train) + len(data.val) == 90 + 40
    a = load_labelled_set([root], {"class": "articleType"}, seed=0, val_fraction=0.3)
    b = load_labelled_set([root], {"class": "articleType"}, seed=0, val_fraction=0.3)
    assert [e.id for e in a.val] == [e.id for e in b.val]  # seeded, deterministic


def test_class_weights_temper_inverse_frequency(catalog: Path) -> None:
    data = load_labelled_set([catalog], {"class": "articleType"}, val_fraction=0.2)
    examples = list(data.train) + [e for e in data.train if e.labels[0] == 0] * 9  # class 0 ten times as frequent
    n = np.bincount([e.labels[0] for e in examples])
    for power in (0.3, 0.5):
        w = class_weights(examples, data.tasks, power)["class"]
        assert w[0] < w[1]
        assert w[1] / w[0] == pytest.approx((n[0] / n[1]) ** power, rel=1e-5)  # tempered, not the full 10x
        assert float((w[[e.labels[0] for e in examples]]).mean()) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.slow
def test_training_learns_and_writes_the_run_directory(trained: tuple[Path, TrainConfig]) -> None:
    best, cfg = trained
    for name in ("image_mtl_best.pt", "last.pt", "class_weights.pt", "metrics.jsonl", "split.json"):
        assert (cfg.out / name).is_file(), name
    records = [json.loads(line) for line in (cfg.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, 9))
    final = max(records, key=lambda r: r["val"]["class"]["top1"] + r["val"]["color"]["top1"])["val"]
    # Chance is 1/3 per task; the shapes are easy, so a few epochs must clearly beat it.
    assert final["class"]["top1"] > 0.6 and final["color"]["top1"] > 0.6
    assert {"top1", "macro_f1", "balanced_acc", "temperature"} <= set(final["color"])
    weights = torch.load(cfg.out / "class_weights.pt")
    assert set(weights) == {"class", "color"} and weights["class"].shape == (3,)


@pytest.mark.slow
def test_checkpoint_round_trips(trained: tuple[Path, TrainConfig], catalog: Path) -> None:
    best, cfg = trained
    loaded = tagger.load_checkpoint(str(best))
    assert [t.name for t in loaded.tasks] == ["class", "color"]
    assert set(loaded.tasks[0].labels) == set(SHAPES) and loaded.preprocess.size == 32
    raw = loaded.raw
    assert raw["backbone"] == "test_efficientnet" and raw["args"]["epochs"] == 8
    assert set(raw["class_weights"]) == {"class", "color"} and "metrics" in raw and "tagger_version" in raw
    # The temperature that calibrates the best epoch's scores on validation, which the exporter applies.
    assert set(raw["temperature"]) == {"class", "color"}
    assert all(0.05 <= v <= 20 and v == raw["metrics"][k]["temperature"] for k, v in raw["temperature"].items())
    from tagger.pipeline.decode import fit_and_pad
    from tagger.train.augment import eval_transform

    x = torch.from_numpy(np.array(fit_and_pad(Image.open(catalog / "images" / "1000.jpg"), loaded.preprocess)))
    x = eval_transform(loaded.preprocess)(x.permute(2, 0, 1)[None])
    ref = torch.load(best, weights_only=True)["model"]
    assert all(torch.equal(ref[k], v) for k, v in loaded.model.state_dict().items())
    with torch.no_grad():
        assert loaded.model(x)["class"].shape == (1, 3)


def _resume_config(root: Path, out: Path, epochs: int, resume: Path | None = None) -> TrainConfig:
    # warmup_epochs=1: epoch 1 runs the same learning rates whether the schedule is 1 or 2 epochs long.
    return TrainConfig(
        data=(root,), out=out, epochs=epochs, batch_size=8, lr=3e-3, image_size=32, backbone="test_efficientnet",
        weights="none", device="cpu", workers=0, val_fraction=0.25, ema_decay=0.9, warmup_epochs=1.0, resume=resume,
    )


def _assert_equal_tensors(a: object, b: object, where: str) -> None:
    """Nested dicts/lists of tensors and plain values, compared exactly."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_equal_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.slow
def test_resume_restores_optimizer_ema_schedule_and_random_state(tmp_path: Path) -> None:
    """Stopped after epoch 1 and resumed, a run ends bit for bit where the uninterrupted run ends.

    The resumed epoch starts from last.pt: had resume skipped the AdamW moments, the EMA weights or its update count,
    the schedule's step or the shuffle/augmentation random state, epoch 2 would run differently and end elsewhere.
    """
    root = make_catalog(tmp_path / "c", per_combo=4)
    fit(_resume_config(root, tmp_path / "whole", epochs=2))
    part = tmp_path / "part"
    fit(_resume_config(root, part, epochs=1))
    saved = torch.load(part / "last.pt", weights_only=True)
    assert saved["epoch"] == 1 and saved["ema_updates"] > 0
    assert all(bool(s["exp_avg"].abs().sum() > 0) for s in saved["optimizer"]["state"].values())
    fit(_resume_config(root, part, epochs=2, resume=part / "last.pt"))

    whole = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    resumed = torch.load(part / "last.pt", weights_only=True)
    assert whole["epoch"] == resumed["epoch"] == 2
    assert saved["scheduler"]["last_epoch"] * 2 == resumed["scheduler"]["last_epoch"]
    for key in ("optimizer", "scheduler", "ema", "ema_updates", "model", "rng", "metrics"):
        _assert_equal_tensors(whole[key], resumed[key], key)
    assert not torch.equal(saved["ema"]["heads.class.weight"], resumed["ema"]["heads.class.weight"])  # it trained on
    epochs = [json.loads(line)["epoch"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (None, ["--data", "{tmp}/missing"], "does not exist"),
        ("no_csv", ["--data", "{tmp}/c"], "styles.csv"),
        ("catalog", ["--data", "{tmp}/c", "--task", "class=nope"], "column 'nope'"),
        ("no_images", ["--data", "{tmp}/c"], "has its image"),
        ("catalog", ["--data", "{tmp}/c", "--min-count", "1000"], "every row was filtered out"),
        ("catalog", ["--data", "{tmp}/c", "--backbone", "not_a_model"], "unknown backbone"),
        ("catalog", ["--data", "{tmp}/c", "--device", "cuda"], "cuda"),
    ],
)
def test_bad_input_gets_one_clear_line(tmp_path: Path, setup: str | None, args: list[str], message: str) -> None:
    if setup is not None:
        root = make_catalog(tmp_path / "c", per_combo=1)
        if setup == "no_csv":
            (root / "styles.csv").unlink()
        if setup == "no_images":
            shutil.rmtree(root / "images")
            (root / "images").mkdir()
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = ["train", "--out", str(tmp_path / "run"), "--weights", "none", "--image-size", "32"]
    argv += [a.format(tmp=tmp_path) for a in args]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output and result.output.count("\n") <= 2


def test_corrupt_training_images_are_skipped(tmp_path: Path) -> None:
    root = make_catalog(tmp_path / "c", per_combo=4)
    (root / "images" / "1000.jpg").write_bytes(b"not a jpeg")
    cfg = TrainConfig(
        data=(root,), out=tmp_path / "run", epochs=1, batch_size=16, image_size=32, backbone="test_efficientnet",
        weights="none", device="cpu", workers=0, val_fraction=0.3,
    )
    fit(cfg)
    split = json.loads((cfg.out / "split.json").read_text())
    assert "1000" not in split["train_ids"] + split["val_ids"]
    assert len(split["train_ids"]) + len(split["val_ids"]) == 35


@pytest.mark.slow
def test_any_number_of_tasks_trains_and_exports(catalog: Path, tmp_path: Path) -> None:
    from tagger.export import export_checkpoint
    from tagger.model.info import read_model_metadata

    tasks = (("color", "baseColour"), ("class", "articleType"), ("season", "season"))
    cfg = TrainConfig(
        data=(catalog,), out=tmp_path / "run", epochs=1, batch_size=16, image_size=32, backbone="test_efficientnet",
        weights="none", device="cpu", workers=0, val_fraction=0.25, tasks=tasks, task_weights=(("season", 0.1),),
    )
    best = fit(cfg)
    assert [t.name for t in tagger.load_checkpoint(str(best)).tasks] == ["color", "class", "season"]
    info = read_model_metadata(export_checkpoint(best, tmp_path / "m.onnx").path)
    assert [t.name for t in info.tasks] == ["color", "class", "season"]
    assert info.tasks[2].labels == ("Summer",)


class _Evil:
    """A pickle that would create a folder when unpickled: the weights loader must never run it."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, ...]:
        import os

        return (os.mkdir, (str(self.target),))


@pytest.mark.parametrize("kind", ["pickle", "garbage", "tensor"])
def test_weights_that_are_not_a_state_dict_are_one_line(catalog: Path, tmp_path: Path, kind: str) -> None:
    evil = tmp_path / "evil.pt"
    if kind == "pickle":
        torch.save({"x": _Evil(tmp_path / "pwned")}, evil)
    elif kind == "garbage":
        evil.write_bytes(b"\x80\x04 not a torch file")
    else:
        torch.save(torch.zeros(3), evil)
    result = CliRunner().invoke(
        main, ["train", "--data", str(catalog), "--out", str(tmp_path / "run"), "--weights", str(evil), "--epochs",
               "1", "--image-size", "32", "--backbone", "test_efficientnet", "--device", "cpu", "--workers", "0"],
    )  # fmt: skip
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output.startswith(f"error: --weights {evil} is not a weights file (") and "Traceback" not in result.output
    assert not (tmp_path / "pwned").exists()
