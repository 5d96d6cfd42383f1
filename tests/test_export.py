"""`tagger export` / `tagger info`: a checkpoint becomes a verified, self-describing ONNX file the runtime can serve."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image, ImageDraw

from tagger import __version__
from tagger.cli import main
from tagger.contract import (
    EMBEDDING_OUTPUT,
    FORMAT_VERSION,
    INPUT_NAME,
    META_FORMAT,
    META_TASKS,
    PreprocessSpec,
    TaskSpec,
)
from tagger.errors import TaggerError
from tagger.model.info import describe, read_model_metadata

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from tagger.export import ExportReport, default_output_path, export_checkpoint  # noqa: E402
from tagger.pipeline.decode import Sample, decode_one  # noqa: E402
from tagger.train.checkpoint import CHECKPOINT_FORMAT, load_checkpoint  # noqa: E402

TASKS = {"class": ["Tshirts", "Shirts", "Watches"], "color": ["Black", "White", "Blue", "Red"]}


def product_photos(folder: Path, n: int) -> list[Path]:
    """Write n JPEG/PNG product shots (a coloured shape on white, assorted sizes and aspect ratios)."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = [(60, 80), (300, 200), (128, 128), (45, 150)][i % 4]
        img = Image.new("RGB", (w, h), (250, 250, 250))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        box = (w * 0.2, h * 0.15, w * 0.8, h * 0.85)
        draw = ImageDraw.Draw(img)
        (draw.ellipse if i % 2 else draw.rectangle)(box, fill=colour, outline=(40, 40, 40))
        path = folder / f"photo{i}.{'png' if i % 5 == 4 else 'jpg'}"
        img.save(path)
        paths.append(path)
    return paths


def decoded(paths: list[Path], spec: PreprocessSpec) -> np.ndarray:
    """The runtime's decode stage: uint8 [N, S, S, 3]."""
    samples = [decode_one(p, spec) for p in paths]
    assert all(isinstance(s, Sample) for s in samples)
    return np.stack([s.array for s in samples])  # type: ignore[union-attr]


def torch_probs(ckpt_path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    """PyTorch fp32 reference with the contract's preprocessing written out: x / 255, (x - mean) / std, NCHW."""
    ckpt = load_checkpoint(ckpt_path)
    mean = torch.tensor(ckpt.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(ckpt.preprocess.std).view(1, 3, 1, 1)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        logits = ckpt.model(x)
        features = ckpt.model.features(x)
    probs = {name: torch.softmax(v, dim=1).numpy() for name, v in logits.items()}
    return {**probs, EMBEDDING_OUTPUT: torch.nn.functional.normalize(features, dim=1).numpy()}


def run_onnx(path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {INPUT_NAME: images})))


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def assert_one_line_error(result: Result, *fragments: str) -> None:
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit)  # handled, not a crash
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return product_photos(tmp_path_factory.mktemp("photos"), 13)


def test_exported_model_runs_in_onnxruntime(tiny_onnx: Path, photos: list[Path]) -> None:
    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert (inp.name, inp.type, inp.shape[1:]) == (INPUT_NAME, "tensor(uint8)", [32, 32, 3])
    assert isinstance(inp.shape[0], str)  # symbolic batch
    assert [o.name for o in session.get_outputs()] == ["class_probs", "color_probs", EMBEDDING_OUTPUT]
    *out, embedding = session.run(None, {INPUT_NAME: decoded(photos[:5], PreprocessSpec(size=32))})
    for probs, labels in zip(out, TASKS.values()):
        assert probs.dtype == np.float32 and probs.shape == (5, len(labels))
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    dim = read_model_metadata(tiny_onnx).embedding_dim
    assert dim is not None and dim > 1 and embedding.dtype == np.float32 and embedding.shape == (5, dim)
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)


def test_metadata_round_trip(tiny_onnx: Path, tiny_checkpoint: Path, tiny_export: ExportReport) -> None:
    info = read_model_metadata(tiny_onnx)
    assert {t.name: list(t.labels) for t in info.tasks} == TASKS
    assert info.preprocess == PreprocessSpec(size=32)
    assert info.format == FORMAT_VERSION and info.version == __version__
    assert info.sha256 == hashlib.sha256(tiny_onnx.read_bytes()).hexdigest() == tiny_export.sha256
    m = info.model
    assert m["backbone"] == "test_efficientnet" and m["precision"] == "fp32" and info.precision == "fp32"
    assert m["checkpoint_sha256"] == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert m["metrics"] == {"val_acc_class": 0.5, "val_acc_color": 0.25}
    assert m["data"] == {"root": "fashion-tiny", "n_train": 10, "n_val": 4}
    assert m["epoch"] == 3 and m["opset"] == tiny_export.opset
    assert m["columns"] == {"class": "articleType", "color": "baseColour"}  # the trainer's --task pairs
    assert tiny_export.info == info


def test_file_is_single_and_clean(tiny_onnx: Path, tiny_export: ExportReport) -> None:
    model = onnx.load(str(tiny_onnx))
    onnx.checker.check_model(model, full_check=True)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert list(tiny_onnx.parent.iterdir()) == [tiny_onnx]  # no temp or external-data files beside it
    assert tiny_export.size_bytes == tiny_onnx.stat().st_size
    umask = os.umask(0)
    os.umask(umask)
    assert tiny_onnx.stat().st_mode & 0o777 == 0o666 & ~umask  # not the temp file's owner-only mode
    # per-node stack traces would leak the exporting machine's paths
    assert b"stack_trace" not in tiny_onnx.read_bytes()
    cast_from_uint8 = [n for n in model.graph.node if INPUT_NAME in n.input]
    assert [n.op_type for n in cast_from_uint8] in (["Cast"], ["Transpose"])


@pytest.mark.parametrize("n", [1, 7, 13])
def test_dynamic_batch_matches_pytorch(tiny_onnx: Path, tiny_checkpoint: Path, photos: list[Path], n: int) -> None:
    images = decoded(photos[:n], PreprocessSpec(size=32))
    got = run_onnx(tiny_onnx, images)
    want = torch_probs(tiny_checkpoint, images)
    for task in TASKS:
        assert got[f"{task}_probs"].shape == (n, len(TASKS[task]))
        np.testing.assert_allclose(got[f"{task}_probs"], want[task], atol=1e-4, rtol=0)
        np.testing.assert_array_equal(got[f"{task}_probs"].argmax(1), want[task].argmax(1))
    cosine = (got[EMBEDDING_OUTPUT].astype(np.float64) * want[EMBEDDING_OUTPUT]).sum(axis=1)  # [n]
    assert got[EMBEDDING_OUTPUT].shape == want[EMBEDDING_OUTPUT].shape and cosine.min() > 0.9999


def test_predictions_depend_on_the_image(tiny_onnx: Path, photos: list[Path]) -> None:
    # guards the parity tests above against a degenerate model that ignores its input
    got = run_onnx(tiny_onnx, decoded(photos, PreprocessSpec(size=32)))
    assert len(set(got["class_probs"].argmax(1))) > 1 and len(set(got["color_probs"].argmax(1))) > 1


def test_report_describes_the_checks(tiny_export: ExportReport) -> None:
    assert tiny_export.precision == "fp32" and tiny_export.exporter.startswith("torch.onnx.export(dynamo=True")
    assert {1, 7} <= set(tiny_export.batch_sizes) and len(tiny_export.batch_sizes) >= 3
    assert tiny_export.n_check_images >= 100
    assert set(tiny_export.max_abs_diff) == set(TASKS) == set(tiny_export.top1_agreement)
    assert 0.9999 <= tiny_export.embedding_min_cosine <= 1.0 + 1e-9
    assert all(d < 1e-4 for d in tiny_export.max_abs_diff.values())
    assert all(a == 1.0 for a in tiny_export.top1_agreement.values())


@pytest.mark.slow
def test_trainer_temperature_is_applied_inside_the_graph(
    tiny_checkpoint: Path, tiny_onnx: Path, tmp_path: Path, photos: list[Path]
) -> None:
    raw = torch.load(tiny_checkpoint, weights_only=True)
    raw["temperature"] = {"class": 2.0, "color": 0.5}
    calibrated = tmp_path / "calibrated.pt"
    torch.save(raw, calibrated)
    report = export_checkpoint(calibrated, tmp_path / "calibrated.onnx")  # its parity check rescales PyTorch too
    images = decoded(photos, PreprocessSpec(size=32))
    plain, scaled = run_onnx(tiny_onnx, images), run_onnx(report.path, images)
    for task, temperature in raw["temperature"].items():
        logits = np.log(plain[f"{task}_probs"].astype(np.float64))
        expected = np.exp(logits / temperature) / np.exp(logits / temperature).sum(1, keepdims=True)
        np.testing.assert_allclose(scaled[f"{task}_probs"], expected, atol=1e-5)
        np.testing.assert_array_equal(scaled[f"{task}_probs"].argmax(1), plain[f"{task}_probs"].argmax(1))
    assert report.info is not None and report.info.model["temperature"] == raw["temperature"]
    divs = sorted(n.name for n in onnx.load(str(report.path)).graph.node if n.op_type == "Div" and "temperature" in n.name)
    assert divs == ["tagger_temperature_class_div", "tagger_temperature_color_div"]  # where tagger calibrate looks


@pytest.mark.slow
def test_fp16_export_via_cli(tiny_checkpoint: Path, tmp_path: Path, photos: list[Path]) -> None:
    ckpt = shutil.copy(tiny_checkpoint, tmp_path / "model.pt")
    result = invoke("export", str(ckpt), "--fp16", "--opset", "20", "--check-image", str(photos[0]))
    assert result.exit_code == 0, result.output
    out = tmp_path / "model.fp16.onnx"
    assert out == default_output_path(ckpt, fp16=True) and out.is_file()
    assert "fp16" in result.output and str(out) in result.output

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    assert [o.type for o in session.get_outputs()] == ["tensor(float)"] * 3  # class, color, embedding
    model = onnx.load(str(out))
    backbone_weights = {i.data_type for i in model.graph.initializer if i.name.startswith("backbone.")}
    assert backbone_weights == {onnx.TensorProto.FLOAT16}
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [20]
    info = read_model_metadata(out)
    assert info.precision == "fp16" and info.model["opset"] == 20

    images = decoded(photos, PreprocessSpec(size=32))
    got = run_onnx(out, images)
    want = torch_probs(tiny_checkpoint, images)
    for task in TASKS:
        assert got[f"{task}_probs"].dtype == np.float32
        np.testing.assert_allclose(got[f"{task}_probs"], want[task], atol=2e-2, rtol=0)


@pytest.mark.slow
def test_export_into_existing_file_replaces_it(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    out.write_bytes(b"old")
    report = export_checkpoint(tiny_checkpoint, out, check_images=[])
    assert report.path == out and read_model_metadata(out).sha256 == report.sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


# --- bad input: one line, non-zero exit, nothing written ---------------------------------------------------------


def test_not_a_file(tmp_path: Path) -> None:
    assert_one_line_error(invoke("export", str(tmp_path / "missing.pt")), "is not a file")
    assert_one_line_error(invoke("export", str(tmp_path)), "is not a file")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [np.random.default_rng(0).bytes(4096), b"epochs: 3\nthis is text\n"])
def test_not_a_checkpoint(tmp_path: Path, content: bytes) -> None:
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(content)
    assert_one_line_error(invoke("export", str(ckpt)), "not a tagger checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_checkpoint_missing_keys(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model": {}}, ckpt)
    assert_one_line_error(invoke("export", str(ckpt)), "missing checkpoint keys", "backbone", "preprocess", "tasks")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


@pytest.mark.parametrize("where", ["parent_is_file", "missing_dir", "is_dir"])
def test_unwritable_output(tiny_checkpoint: Path, tmp_path: Path, where: str) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    out = {
        "parent_is_file": blocker / "model.onnx",
        "missing_dir": tmp_path / "no" / "such" / "model.onnx",
        "is_dir": tmp_path,
    }[where]
    assert_one_line_error(invoke("export", str(tiny_checkpoint), "-o", str(out)), str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_opset_too_old(tiny_checkpoint: Path, tmp_path: Path) -> None:
    assert_one_line_error(invoke("export", str(tiny_checkpoint), "-o", str(tmp_path / "m.onnx"), "--opset", "17"), "18")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["wrong_label_count", "unknown_backbone"])
def test_failed_export_leaves_nothing_behind(tiny_checkpoint: Path, tmp_path: Path, damage: str) -> None:
    # These fail after the output was reserved: the temp file must go and an existing output must survive.
    raw = torch.load(tiny_checkpoint, weights_only=True)
    if damage == "wrong_label_count":
        raw["tasks"]["class"] = ["a", "b", "c", "d", "e"]  # the head has 3 outputs
    else:
        raw["backbone"] = "no_such_backbone"
    ckpt = tmp_path / "broken.pt"
    torch.save(raw, ckpt)
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous model")
    result = invoke("export", str(ckpt), "-o", str(out))
    assert_one_line_error(result, "class" if damage == "wrong_label_count" else "no_such_backbone")
    assert out.read_bytes() == b"previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pt", "model.onnx"]
    with pytest.raises(TaggerError):
        export_checkpoint(ckpt, tmp_path / "other.onnx")
    assert not (tmp_path / "other.onnx").exists()


# --- tagger info and the metadata reader the runtime shares -------------------------------------------------------


def test_info_prints_the_contract(tiny_onnx: Path, tiny_checkpoint: Path) -> None:
    result = invoke("info", str(tiny_onnx))
    assert result.exit_code == 0, result.output
    text = result.output
    for fragment in ("test_efficientnet", "fp32", "uint8 [N, 32, 32, 3]", "Tshirts, Shirts, Watches",
                     "Black, White, Blue, Red", "epoch 3", "val_acc_class=0.5", "fashion-tiny",
                     hashlib.sha256(tiny_onnx.read_bytes()).hexdigest(),
                     hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()):
        assert fragment in text, fragment
    as_json = json.loads(invoke("info", "--json", str(tiny_onnx)).output)
    assert as_json["tasks"] == TASKS and as_json["format"] == FORMAT_VERSION
    assert as_json["model"]["precision"] == "fp32"
    dim = as_json["embedding_dim"]
    assert dim == load_checkpoint(tiny_checkpoint).model.backbone.num_features and f"embedding: float [N, {dim}]" in text


def test_info_truncates_long_label_lists(tiny_onnx: Path) -> None:
    info = read_model_metadata(tiny_onnx)
    many = replace(info, tasks=(TaskSpec("class", tuple(f"label{i}" for i in range(30))),))
    text = describe(many)
    assert "label11," in text and "label12" not in text and "(+18 more)" in text
    assert "label29" in describe(many, max_labels=0)
    assert "(+" not in invoke("info", "--all-labels", str(tiny_onnx)).output


def _edit_metadata(src: Path, dst: Path, key: str, value: str | None) -> Path:
    model = onnx.load(str(src))
    props = {p.key: p.value for p in model.metadata_props}
    if value is None:
        del props[key]
    else:
        props[key] = value
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(dst))
    return dst


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        (META_FORMAT, "2", "format 2"),
        (META_FORMAT, None, "tagger.format missing"),
        (META_TASKS, None, "tagger.tasks missing"),
        (META_TASKS, "{not json", "not JSON"),
        (META_TASKS, json.dumps({"class": ["a", "b"], "color": TASKS["color"]}), "class_probs"),
    ],
)
def test_reader_rejects_bad_metadata(
    tiny_onnx: Path, tmp_path: Path, key: str, value: str | None, fragment: str
) -> None:
    bad = _edit_metadata(tiny_onnx, tmp_path / "bad.onnx", key, value)
    with pytest.raises(TaggerError, match="bad.onnx"):
        read_model_metadata(bad)
    assert_one_line_error(invoke("info", str(bad)), fragment)


@pytest.mark.parametrize("content", [b"", b"not a model at all\n", np.random.default_rng(1).bytes(2048)])
def test_reader_rejects_non_onnx(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    assert_one_line_error(invoke("info", str(path)), "not a loadable ONNX model")
    assert_one_line_error(invoke("info", str(tmp_path / "missing.onnx")), "is not a file")


def test_reader_rejects_plain_onnx(tmp_path: Path) -> None:
    h = onnx.helper
    graph = h.make_graph([h.make_node("Identity", ["x"], ["y"])], "g",
                         [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    path = tmp_path / "plain.onnx"
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    assert_one_line_error(invoke("info", str(path)), "not a tagger model")


def test_cli_and_reader_do_not_import_torch_or_onnx() -> None:
    code = (
        "import sys, tagger.cli, tagger.model.info; "
        "bad = [m for m in ('torch', 'onnx') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)
