"""Training from a model's weights (--init), several data folders, sample weights, down-and-up scaling, early sizes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from tagger.cli import main
from tagger.contract import TaskSpec
from tagger.errors import TaggerError
from tagger.model.info import read_model_metadata
from tagger.model.registry import default_model_path
from tagger.train.augment import DownUp, eval_transform
from tagger.train.checkpoint import load_checkpoint, save_weights
from tagger.train.data import load_labelled_set
from tagger.train.init import apply_init, calibrate_folded_norms, load_init
from tagger.train.loop import TrainConfig, fit, task_losses
from tagger.train.model import MultiTaskNet

from conftest import quadrant_image
from test_train import make_catalog


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, size, size, 3] of random quadrant colours: inputs whose features differ from image to image."""
    rng = np.random.default_rng(seed)
    colors = rng.integers(0, 256, size=(n, 4, 3))
    return np.stack([np.array(quadrant_image(size, size, [tuple(int(v) for v in c) for c in cs])) for cs in colors])


def _recovered(model_path: Path, images: np.ndarray) -> tuple[MultiTaskNet, torch.Tensor]:
    info = read_model_metadata(model_path)
    init = load_init(str(model_path))
    model = MultiTaskNet(init.backbone, info.tasks, weights="none")
    apply_init(model, info.tasks, init)
    x = eval_transform(info.preprocess)(torch.from_numpy(images).permute(0, 3, 1, 2))  # [N, 3, S, S]
    calibrate_folded_norms(model, init, x)
    return model.eval(), x


def test_init_from_an_exported_model_computes_what_its_graph_computes(tiny_onnx: Path) -> None:
    """The exporter folds every batch norm into its conv; --init FILE.onnx rebuilds them, so the network gives the
    graph's probabilities (after the recorded temperatures), and in training mode its batch statistics start where
    the graph's activations are (not at mean 0, variance 1, which would rescale every layer on the first step)."""
    images = _images(48, 32)
    model, x = _recovered(tiny_onnx, images[:32])
    info = read_model_metadata(tiny_onnx)
    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(None, {"images": images[32:]})
    test_x = eval_transform(info.preprocess)(torch.from_numpy(images[32:]).permute(0, 3, 1, 2))
    with torch.no_grad():
        logits = model(test_x)
        for task in info.tasks:
            t = info.model.get("temperature", {}).get(task.name, 1.0)  # the tiny model has none
            ours = torch.softmax(logits[task.name] / t, 1).numpy()
            assert np.abs(ours - outputs[names.index(task.output)]).max() < 1e-4, task.name
        # Training mode on the calibration images: each norm's batch statistics are the ones it was rebuilt from.
        model.train()
        model.dropout.p = 0.0
        trained_mode = model.features(x)
        model.eval()
        assert torch.allclose(trained_mode, model.features(x), rtol=1e-3, atol=1e-3)


def test_init_copies_heads_by_label_and_leaves_new_ones_fresh(tiny_onnx: Path) -> None:
    """A head row is copied only where task and label exist in the init model, whatever the label order."""
    init = load_init(str(tiny_onnx))
    labels, w, b = init.heads["class"]
    tasks = (TaskSpec("class", ("Watches", "Boots", "Tshirts")), TaskSpec("usage", ("Casual", "Sports")))
    torch.manual_seed(1)
    model = MultiTaskNet(init.backbone, tasks, weights="none")
    fresh_boots = model.heads["class"].weight[1].detach().clone()
    fresh_usage = model.heads["usage"].weight.detach().clone()
    apply_init(model, tasks, init)
    head = model.heads["class"]
    assert torch.equal(head.weight[0], w[labels.index("Watches")]) and head.bias[2] == b[labels.index("Tshirts")]
    assert torch.equal(head.weight[1], fresh_boots)  # a label the init model never had
    assert torch.equal(model.heads["usage"].weight, fresh_usage)  # a task it never had


def test_init_refuses_another_backbone(tiny_onnx: Path) -> None:
    init = load_init(str(tiny_onnx))
    model = MultiTaskNet("tf_efficientnet_lite0", [TaskSpec("class", ("a", "b"))], weights="none")
    with pytest.raises(TaggerError, match="is a test_efficientnet model; this run trains tf_efficientnet_lite0"):
        apply_init(model, [TaskSpec("class", ("a", "b"))], init)


@pytest.mark.slow
def test_train_init_default_starts_from_the_shipped_weights(tmp_path: Path) -> None:
    """A tiny CPU run of `tagger train --init default`: the run starts from the shipped model's weights (with
    a learning rate of ~0 the trained convs still equal the shipped graph's) and its heads' labels."""
    onnx = pytest.importorskip("onnx")
    root = make_catalog(tmp_path / "c", per_combo=3)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "train", "--data", str(root), "--out", str(out), "--init", "default", "--image-size", "64", "--epochs", "1",
        "--batch-size", "8", "--lr", "1e-12", "--workers", "0", "--min-count", "1", "--ema-decay", "0",
        "--task", "class=articleType", "--task", "color=baseColour",
    ])
    assert result.exit_code == 0, result.output
    state = torch.load(out / "image_mtl_best.pt", weights_only=True)["model"]
    shipped = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(default_model_path())).graph.initializer}
    for name in ("backbone.conv_stem.weight", "backbone.blocks.3.0.conv_pw.weight", "backbone.conv_head.weight"):
        assert np.allclose(state[name].numpy(), shipped[name], atol=1e-6), name


def test_several_folders_keep_each_id_on_its_first_side_and_weigh_images(tmp_path: Path) -> None:
    """Photos of the same products in a second folder (other bytes) go to their first image's side."""
    thumbs = make_catalog(tmp_path / "thumbs", per_combo=4)
    photos = tmp_path / "photos"
    (photos / "images").mkdir(parents=True)
    shutil.copy(thumbs / "styles.csv", photos / "styles.csv")
    for jpg in (thumbs / "images").glob("*.jpg"):
        Image.open(jpg).resize((96, 96)).save(photos / "images" / jpg.name, quality=80)  # other bytes, same id
    data = load_labelled_set([thumbs, photos], {"class": "articleType"}, min_count=1, val_fraction=0.4)
    side = {(e.source, e.id): split for split, es in (("train", data.train), ("val", data.val)) for e in es}
    ids = {i for _, i in side}
    assert len(ids) > 20 and {side[(0, i)] for i in ids} == {"train", "val"}
    assert all(side[(0, i)] == side[(1, i)] for i in ids)

    # Each epoch scores every folder's validation images on their own too, from the same predictions.
    cfg = TrainConfig(
        data=(thumbs, photos), out=tmp_path / "two", epochs=1, batch_size=8, image_size=32, backbone="test_efficientnet",
        weights="none", device="cpu", workers=0, min_count=1, val_fraction=0.4, data_weights=((photos, 3.0),),
    )
    fit(cfg)
    val = json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[0])["val"]["class"]
    assert val["thumbs"]["n"] + val["photos"]["n"] == val["n"] == len(data.val)
    assert val["thumbs"]["n"] == val["photos"]["n"]

    bad = CliRunner().invoke(main, [
        "train", "--data", str(thumbs), "--data", str(photos), "--out", str(tmp_path / "run"),
        "--data-weight", f"{tmp_path / 'other'}=2",
    ])
    assert bad.exit_code == 2 and "not a --data folder" in bad.output, bad.output


def test_sample_weights_count_an_image_as_often_as_its_weight() -> None:
    """Weight 1 everywhere is torch's own weighted mean; weight 2 on one image equals that image twice."""
    torch.manual_seed(0)
    cw = torch.rand(4) + 0.5
    crit = nn.CrossEntropyLoss(weight=cw, ignore_index=-100, label_smoothing=0.1, reduction="none")
    logits, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, -100, 1])
    mean = nn.CrossEntropyLoss(weight=cw, ignore_index=-100, label_smoothing=0.1)(logits, y)
    assert torch.allclose(task_losses({"t": logits}, y[:, None], {"t": crit}, torch.ones(6))["t"], mean)
    w = torch.ones(6)
    w[2] = 2.0
    twice = torch.cat([logits, logits[2:3]]), torch.cat([y, y[2:3]])
    expected = nn.CrossEntropyLoss(weight=cw, ignore_index=-100, label_smoothing=0.1)(*twice)
    assert torch.allclose(task_losses({"t": logits}, y[:, None], {"t": crit}, w)["t"], expected)


def test_downup_softens_a_sharp_image_and_keeps_its_shape() -> None:
    sharp = torch.zeros(3, 64, 64, dtype=torch.uint8)
    sharp[:, ::2] = 255  # one-pixel stripes: gone at any scale below 1
    soft = DownUp(1.0, scale=(0.5, 0.5))(sharp)
    assert soft.shape == sharp.shape and soft.dtype == torch.uint8
    assert float(soft.float().std()) < 0.5 * float(sharp.float().std())
    assert torch.equal(DownUp(0.0)(sharp), sharp)


@pytest.mark.slow
def test_early_epochs_train_on_smaller_inputs(tmp_path: Path) -> None:
    root = make_catalog(tmp_path / "c", per_combo=3)
    cfg = TrainConfig(
        data=(root,), out=tmp_path / "run", epochs=2, batch_size=8, image_size=32, backbone="test_efficientnet",
        weights="none", device="cpu", workers=0, min_count=1, early_size=16, early_epochs=1, downscale=0.5,
        lr=3e-4, precision="fp32",  # a tiny net on 21 images: steady steps, so the export below sees finite weights
    )
    fit(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_size"] for r in records] == [16, 32]

    # The run's weights alone, in fp16: no optimiser or random state, and the model rebuilds from them.
    weights = save_weights(tmp_path / "run" / "last.pt", tmp_path / "weights.pt")
    raw = torch.load(weights, weights_only=True)
    assert "optimizer" not in raw and "rng" not in raw and raw["model"]["heads.class.weight"].dtype == torch.float16
    assert weights.stat().st_size < 0.6 * (tmp_path / "run" / "last.pt").stat().st_size
    assert load_checkpoint(weights).tasks == load_checkpoint(tmp_path / "run" / "last.pt").tasks

    # `tagger export --weights-out`: the weights file, and a model exported (and parity-checked) from exactly it.
    runner = CliRunner()
    same = runner.invoke(main, ["export", str(weights), "--weights-out", str(weights)])
    assert same.exit_code == 1 and "is the checkpoint itself" in same.output
    done = runner.invoke(main, [
        "export", str(tmp_path / "run" / "last.pt"), "--weights-out", str(tmp_path / "w.pt"), "-o", str(tmp_path / "m.onnx"),
    ])
    assert done.exit_code == 0, done.output
    assert read_model_metadata(tmp_path / "m.onnx").model["checkpoint"] == "w.pt"


def test_a_loss_that_is_no_longer_finite_stops_the_run(tmp_path: Path) -> None:
    """A diverging run ends with one line instead of writing checkpoints of NaN weights."""
    root = make_catalog(tmp_path / "c", per_combo=3)
    cfg = TrainConfig(
        data=(root,), out=tmp_path / "run", epochs=3, batch_size=4, image_size=32, backbone="test_efficientnet",
        weights="none", device="cpu", workers=0, min_count=1, lr=1e12, warmup_epochs=0.01, precision="fp32",
    )
    with pytest.raises(TaggerError, match=r"the loss is (nan|inf).*lower --lr"):
        fit(cfg)
