"""Heads-only training on generated catalogs: new tasks in `tagger run`, the feature cache, graph parity, clean errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from test_train import make_catalog

import tagger
from tagger.cli import main
from tagger.contract import EMBEDDING_OUTPUT
from tagger.labelled import load_labelled_folder
from tagger.model.edit import Head, features_tensor, linear_head, with_features_output, with_heads
from tagger.model.info import read_model_metadata, task_columns
from tagger.pipeline.session import open_session
from tagger.train.features import embed, file_digests
from tagger.train.heads import HeadsConfig, train_heads

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Coloured shapes; the `usage` column is a new task: the colour's warmth (Red warm, Green/Blue cool)."""
    root = make_catalog(tmp_path_factory.mktemp("shapes"), per_combo=10)
    lines = (root / "styles.csv").read_text().splitlines(keepends=True)
    out = [lines[0]]
    for line in lines[1:]:
        fields = line.split(",")
        fields[8] = "Warm" if fields[5] == "Red" else "Cool"
        out.append(",".join(fields))
    (root / "styles.csv").write_text("".join(out))
    return root


@pytest.fixture(scope="module")
def heads_run(shapes: Path, tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, HeadsConfig]:
    cfg = HeadsConfig(
        base=str(tiny_onnx), data=(shapes,), tasks=(("tone", "usage"),), out=tmp_path_factory.mktemp("run"),
        epochs=60, batch_size=32, val_fraction=0.3, cache=tmp_path_factory.mktemp("cache"), workers=0, threads=1,
    )
    return train_heads(cfg), cfg


@pytest.mark.slow
def test_a_new_task_appears_in_tagger_run(heads_run: tuple[Path, HeadsConfig], shapes: Path, tmp_path: Path) -> None:
    model, cfg = heads_run
    info = read_model_metadata(model)
    assert [t.name for t in info.tasks] == ["class", "color", "tone"]
    assert info.tasks[2].labels == ("Cool", "Warm")
    assert task_columns(info) == {"class": "articleType", "color": "baseColour", "tone": "usage"}
    assert info.model["heads"]["base_sha256"] == read_model_metadata(cfg.base).sha256
    assert info.model["metrics"]["tone"]["column"] == "usage"
    split = json.loads((cfg.out / "split.json").read_text())
    assert split["folders"][str(shapes)]["val_ids"]
    out = tmp_path / "tags.parquet"
    tagger.run(tagger.RunConfig(catalog=str(shapes / "images"), out=str(out), model=model, workers=0))
    table = pq.read_table(out)
    assert {"class", "color", "tone", "tone_score"} <= set(table.column_names)
    truth = {r["id"]: r["usage"] for r in load_labelled_folder(shapes).rows}
    got = [truth[Path(p).stem] == t for p, t in zip(table["path"].to_pylist(), table["tone"].to_pylist())]
    assert np.mean(got) > 0.8  # the tiny random backbone still separates red from the rest


@pytest.mark.slow
def test_the_written_graph_equals_the_fitted_heads(heads_run: tuple[Path, HeadsConfig], tiny_onnx: Path) -> None:
    model, cfg = heads_run
    folder = load_labelled_folder(cfg.data[0])
    features, ok, _ = embed(folder.refs[:12], file_digests(folder.refs[:12]), tiny_onnx, cfg.cache, workers=0)
    assert ok.all()
    proto = onnx.load(str(model))
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    head = Head(
        read_model_metadata(model).tasks[2],
        ((weights["tagger_head_tone_0_weight"], weights["tagger_head_tone_0_bias"]),),
        float(weights["tagger_temperature_tone"]),
    )
    from tagger.compose import decoded_batches

    session = open_session(model, "cpu")
    (batch,) = list(decoded_batches(folder.refs[:12], session.spec, 12, 0))
    got = session.predict(batch.images)
    assert np.abs(got["tone"] - head.probs(features)).max() < 1e-5
    (embedding,) = session.outputs(batch.images, [EMBEDDING_OUTPUT])
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    assert np.abs(np.linalg.norm(embedding, axis=1) - 1).max() < 1e-5
    assert (np.sum(embedding * unit, axis=1) >= 0.999).all()
    # the kept heads are the base model's, untouched
    base = open_session(tiny_onnx, "cpu").predict(batch.images)
    for t in ("class", "color"):
        assert np.abs(got[t] - base[t]).max() < 1e-6


@pytest.mark.slow
def test_the_cache_is_reused_and_keyed_by_the_base_model(heads_run: tuple[Path, HeadsConfig], tmp_path: Path) -> None:
    model, cfg = heads_run
    folder = load_labelled_folder(cfg.data[0])
    digests = file_digests(folder.refs)
    _, _, counts = embed(folder.refs, digests, Path(cfg.base), cfg.cache, workers=0)
    assert counts == {"cached": len(set(digests)), "embedded": 0, "failed": 0}
    # The written model is another base: nothing of the first one's cache applies.
    _, _, counts = embed(folder.refs[:5], digests[:5], model, cfg.cache, workers=0)
    assert counts == {"cached": 0, "embedded": 5, "failed": 0}


@pytest.mark.slow
def test_refit_a_base_head_and_drop_another(heads_run: tuple[Path, HeadsConfig], shapes: Path, tmp_path: Path) -> None:
    model, cfg = heads_run
    out = train_heads(
        HeadsConfig(base=str(model), data=(shapes,), tasks=(("color", "baseColour"),), out=tmp_path / "r2",
                    drop=("class",), epochs=5, val_fraction=0.3, cache=cfg.cache, workers=0, threads=1)
    )
    info = read_model_metadata(out)
    assert [t.name for t in info.tasks] == ["color", "tone"]  # the refit colour keeps its place before tone
    assert info.tasks[0].labels == ("Blue", "Green", "Red")  # refit on this folder's colours
    proto = onnx.load(str(out))
    assert [o.name for o in proto.graph.output] == ["color_probs", "tone_probs", EMBEDDING_OUTPUT]
    assert not any(i.name.startswith("heads.") for i in proto.graph.initializer)  # the old heads are gone


def test_the_embedding_output_of_an_export_and_its_features(tiny_onnx: Path) -> None:
    proto = onnx.load(str(tiny_onnx))
    name = features_tensor(proto)
    assert any(name in n.input for n in proto.graph.node if n.op_type == "Gemm")
    exposed = with_features_output(proto)
    assert exposed.graph.output[-1].name == "tagger_features"
    edited = with_heads(proto, [], ["class", "color"])
    assert features_tensor(edited) == name  # found again through the embedding output


def test_every_base_head_refit(tiny_onnx: Path, tmp_path: Path) -> None:
    """Nothing of the base's heads kept: the backbone up to the features must survive the pruning."""
    from tagger.contract import TaskSpec

    proto = onnx.load(str(tiny_onnx))
    w, b = linear_head(proto, "class")
    head = Head(TaskSpec("shape", ("a", "b", "c")), ((w * 2, b),), 1.5)
    path = tmp_path / "m.onnx"
    onnx.save(with_heads(proto, [head], []), str(path))
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    session = open_session(path, "cpu")
    got = session.predict(images)["shape"]
    (embedding,) = session.outputs(images, [EMBEDDING_OUTPUT])
    raw = onnx.load(str(tiny_onnx))
    exposed = tmp_path / "f.onnx"
    onnx.save(with_features_output(raw), str(exposed))
    (x,) = open_session(exposed, "cpu").outputs(images, ["tagger_features"])
    assert np.abs(got - head.probs(x)).max() < 1e-5
    assert np.abs(embedding - x / np.linalg.norm(x, axis=1, keepdims=True)).max() < 1e-5


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "tone=nosuchcolumn"], "no column 'nosuchcolumn'"),
        (["--task", "status=usage"], "--task"),
        (["--drop", "nosuchtask", "--task", "tone=usage"], "--drop nosuchtask"),
        (["--task", "tone=usage", "--backbone", "resnet50"], "--backbone does not apply to --heads-only"),
        (["--task", "tone=usage", "--task-hidden", "color=64"], "'color' is not a --task of this run"),
        (["--task", "tone=usage", "--task-epochs", "tone=0"], "tone=0: must be at least 1"),
        (["--task", "similarity=usage"], "--task"),  # a column of tagger dupes and similar
        *((["--task", "tone=usage", "--data-weight", f"DATA={w}"], "a weight must be a positive number")
          for w in ("nan", "0", "-1", "inf")),
    ],
)
def test_bad_options_are_one_line_and_exit_2(
    shapes: Path, tiny_onnx: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    args = [a.replace("DATA=", f"{shapes}=") for a in args]  # a weight of the --data folder
    result = CliRunner().invoke(
        main,
        ["train", "--heads-only", "--base", str(tiny_onnx), "--data", str(shapes), "--out", str(tmp_path / "r"),
         "--cache", str(tmp_path / "c"), *args],
    )
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert message in result.output and len([x for x in lines if x.startswith("error") or "Error" in x]) == 1
    assert not (tmp_path / "r" / "model.onnx").exists()


def test_a_run_of_few_steps_and_an_out_that_is_a_file(shapes: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    """The default 10 epochs of one batch (a small folder) train; --out onto a file is one line, the file kept."""
    common = ["train", "--heads-only", "--base", str(tiny_onnx), "--data", str(shapes), "--cache", str(tmp_path / "c"),
              "--threads", "1", "--workers", "0", "--task", "tone=usage"]
    result = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "model.onnx").is_file()
    taken = tmp_path / "taken.txt"
    taken.write_text("hello")
    result = CliRunner().invoke(main, [*common, "--out", str(taken)])
    assert result.exit_code == 1 and "cannot make the run folder" in result.output, result.output
    assert "Traceback" not in result.output and taken.read_text() == "hello"


@pytest.mark.slow
def test_task_hidden_and_task_epochs_shape_one_head(shapes: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    """--task-hidden gives one task an MLP while the other stays linear (and warm-started); both are recorded."""
    out = tmp_path / "r"
    result = CliRunner().invoke(
        main,
        ["train", "--heads-only", "--base", str(tiny_onnx), "--data", str(shapes), "--out", str(out),
         "--cache", str(tmp_path / "c"), "--threads", "1", "--workers", "0", "--batch-size", "32",
         "--task", "tone=usage", "--task", "color=baseColour", "--task-hidden", "tone=8",
         "--task-epochs", "tone=40", "--epochs", "2"],
    )
    assert result.exit_code == 0, result.output
    proto = onnx.load(str(out / "model.onnx"))
    assert linear_head(proto, "tone") is None  # two Gemms: Linear + ReLU + Linear
    assert linear_head(proto, "color") is not None
    meta = read_model_metadata(out / "model.onnx").model["heads"]
    assert meta["head"] == {"tone": "mlp 8", "color": "linear"}
    assert meta["epochs"] == {"tone": 40, "color": 2}
    gemms = [sum(n.op_type == "Gemm" for n in m.graph.node) for m in (onnx.load(str(tiny_onnx)), proto)]
    assert gemms[1] == gemms[0] + 2  # class kept (1), color refit (1), tone (2), against class and color


def test_an_id_in_an_earlier_folder_keeps_its_side(shapes: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    """A second folder with the same ids at another size: each image lands on its first folder's side."""
    big = tmp_path / "big"
    shutil.copytree(shapes, big)
    from PIL import Image

    for p in (big / "images").iterdir():
        Image.open(p).resize((96, 128)).save(p, quality=90)
    cfg = HeadsConfig(base=str(tiny_onnx), data=(shapes, big), tasks=(("tone", "usage"),), out=tmp_path / "r",
                      data_weights=((big, 3.0),), epochs=3, val_fraction=0.3, cache=tmp_path / "c", workers=0, threads=1)
    train_heads(cfg)
    split = json.loads((cfg.out / "split.json").read_text())["folders"]
    assert split[str(shapes)]["val_ids"] == split[str(big)]["val_ids"]
    meta = read_model_metadata(cfg.out / "model.onnx").model["heads"]
    assert [d["weight"] for d in meta["data"]] == [1.0, 3.0]


@pytest.mark.slow
def test_eval_scores_a_task_by_the_column_recorded_in_the_model(heads_run: tuple[Path, HeadsConfig], shapes: Path) -> None:
    from tagger.evaluate import EvalConfig, evaluate

    model, _ = heads_run
    result = evaluate(EvalConfig(data=shapes, model=model, workers=0))
    assert [(t.name, t.column) for t in result.tasks] == [("class", "articleType"), ("color", "baseColour"), ("tone", "usage")]
    tone = result.task("tone")
    assert tone.labelled == len(load_labelled_folder(shapes).refs) and tone.top1_all > 0.8


@pytest.mark.slow
def test_the_embedding_of_heads_only_training_is_tagger_runs(heads_run: tuple[Path, HeadsConfig], tmp_path: Path) -> None:
    model, cfg = heads_run
    folder = load_labelled_folder(cfg.data[0])
    out = tmp_path / "tags.parquet"
    tagger.run(tagger.RunConfig(catalog=str(cfg.data[0]), out=str(out), model=model, workers=0, embeddings=True))
    table = pq.read_table(out)
    by_path = dict(zip(table["path"].to_pylist(), table["embedding"].to_pylist()))
    refs = folder.refs[:20]
    features, ok, counts = embed(refs, file_digests(refs), Path(cfg.base), cfg.cache, workers=0)
    assert ok.all() and counts["embedded"] == 0  # heads-only training cached them
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    got = np.array([by_path[r.path] for r in refs], np.float32)  # float16 in the table
    assert got.shape == unit.shape and (np.sum(got * unit, axis=1) >= 0.999).all()
    assert read_model_metadata(model).embedding_dim == features.shape[1]
