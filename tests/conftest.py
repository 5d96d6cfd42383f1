"""Shared fixtures: small contract-conforming ONNX models and generated image files."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pytest

from tagger.contract import (
    FORMAT_VERSION,
    EMBEDDING_OUTPUT,
    INPUT_NAME,
    META_FORMAT,
    META_MODEL,
    META_PREPROCESS,
    META_TASKS,
    META_VERSION,
    PreprocessSpec,
    output_name,
)

CONTRACT_TASKS: Mapping[str, Sequence[str]] = {
    "class": ("Tshirts", "Shirts", "Watches", "Jeans", "Sandals"),
    "color": ("Black", "White", "Blue", "Red", "Green", "Navy Blue"),
}


CONTRACT_EMBEDDING_DIM = 12


def make_contract_onnx(
    path: Path,
    size: int = 32,
    tasks: Mapping[str, Sequence[str]] = CONTRACT_TASKS,
    seed: int = 0,
    embedding: bool = True,
) -> Path:
    """Write a tiny model that follows the tagger ONNX contract, built with onnx.helper (no torch).

    uint8 [N, S, S, 3] -> mean colour of each image quadrant [N, 12] -> MatMul -> Softmax per task. Quadrant means
    make the output depend on the image's content and orientation (a rotation permutes the quadrants).
    embedding: also output those 12 features, L2-normalised, as `embedding` [N, 12] (the optional output).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    assert size % 2 == 0
    rng = np.random.default_rng(seed)
    h = size // 2
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["x", "quad_shape"], ["quads"]),  # [N, 2, S/2, 2, S/2, 3]
        helper.make_node("ReduceMean", ["quads", "quad_axes"], ["means"], keepdims=0),  # [N, 2, 2, 3]
        helper.make_node("Reshape", ["means", "flat_shape"], ["flat"]),  # [N, 12]
        helper.make_node("Div", ["flat", "c255"], ["features"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([-1, 2, h, 2, h, 3], np.int64), "quad_shape"),
        numpy_helper.from_array(np.array([2, 4], np.int64), "quad_axes"),
        numpy_helper.from_array(np.array([-1, 12], np.int64), "flat_shape"),
        numpy_helper.from_array(np.array(255.0, np.float32), "c255"),
    ]
    outputs = []
    for name, labels in tasks.items():
        weights = rng.normal(0.0, 6.0, (12, len(labels))).astype(np.float32)
        inits.append(numpy_helper.from_array(weights, f"w_{name}"))
        nodes.append(helper.make_node("MatMul", ["features", f"w_{name}"], [f"logits_{name}"]))
        nodes.append(helper.make_node("Softmax", [f"logits_{name}"], [output_name(name)], axis=1))
        outputs.append(helper.make_tensor_value_info(output_name(name), TensorProto.FLOAT, ["N", len(labels)]))
    if embedding:
        nodes.append(helper.make_node("LpNormalization", ["features"], [EMBEDDING_OUTPUT], axis=1, p=2))
        outputs.append(
            helper.make_tensor_value_info(EMBEDDING_OUTPUT, TensorProto.FLOAT, ["N", CONTRACT_EMBEDDING_DIM])
        )
    graph = helper.make_graph(
        nodes,
        "contract",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["N", size, size, 3])],
        outputs,
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    metadata = {
        META_TASKS: json.dumps({name: list(labels) for name, labels in tasks.items()}),
        META_PREPROCESS: json.dumps(PreprocessSpec(size=size).to_dict()),
        META_MODEL: json.dumps({"backbone": "quadrant-means", "precision": "fp32"}),
        META_VERSION: json.dumps("0.0.0"),
        META_FORMAT: json.dumps(FORMAT_VERSION),
    }
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def cuda_really_works(model: Path) -> bool:
    """Whether ONNX Runtime can run `model` on CUDA here (the GPU build lists CUDA even without a GPU)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    ort.set_default_logger_severity(4)
    try:
        sess = ort.InferenceSession(str(model), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        return sess.get_providers()[0] == "CUDAExecutionProvider"
    finally:
        ort.set_default_logger_severity(3)


@pytest.fixture(scope="session")
def contract_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny contract-conforming model: 32x32 input, tasks class (5 labels) and color (6 labels), and a
    12-dimensional `embedding` output."""
    return make_contract_onnx(tmp_path_factory.mktemp("contract") / "contract.onnx")


@pytest.fixture(scope="session")
def contract_onnx_without_embedding(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`contract_onnx` without the optional `embedding` output (a model exported before it existed)."""
    return make_contract_onnx(tmp_path_factory.mktemp("contract") / "no-embedding.onnx", embedding=False)


QUADRANT_COLORS = ((200, 30, 30), (30, 200, 30), (30, 30, 200), (230, 220, 40))


def quadrant_image(w: int, h: int, colors: Sequence[tuple[int, int, int]] = QUADRANT_COLORS) -> "Image.Image":
    """An RGB image of four flat quadrants: its content changes under rotation, unlike a flat colour."""
    from PIL import Image

    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2], a[: h // 2, w // 2 :], a[h // 2 :, : w // 2], a[h // 2 :, w // 2 :] = colors
    return Image.fromarray(a)


def png_header(width: int, height: int) -> bytes:
    """A PNG signature + IHDR claiming width x height RGB, then IEND: no pixel data at all."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def make_catalog(root: Path) -> dict[str, str]:
    """Write a folder of good, odd and broken images; return {relative path: expected status} of the taggable ones.

    Also writes files that must NOT be tagged: hidden files and folders, a non-image extension, a symlink loop.
    """
    from PIL import Image

    expected: dict[str, str] = {}

    def put(rel: str, status: str) -> Path:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        expected[rel] = status
        return path

    quadrant_image(64, 48).save(put("good/photo.jpg", "ok"), quality=95)
    quadrant_image(40, 60).save(put("good/photo.png", "ok"))
    quadrant_image(50, 50, QUADRANT_COLORS[::-1]).save(put("good/UPPER.JPG", "ok"), quality=95)
    quadrant_image(30, 20).save(put("résumé/日本語 フォルダ/café.jpg", "ok"), quality=95)

    put("broken/empty.jpg", "error").write_bytes(b"")
    put("broken/text.jpg", "error").write_text("this is not an image\n")
    good = root / "good/photo.jpg"
    put("broken/truncated.jpg", "error").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    put("broken/bomb.png", "error").write_bytes(png_header(100_000, 100_000))

    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(put("modes/cmyk.jpg", "ok"), quality=95)
    Image.fromarray(np.full((20, 30), 0x8080, np.uint16)).save(put("modes/gray16.png", "ok"))
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[:, 15:] = (0, 0, 255, 255)  # left half fully transparent
    Image.fromarray(rgba, "RGBA").save(put("modes/rgba.png", "ok"))
    pal = Image.new("P", (30, 20), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (15, 0, 30, 20))
    pal.save(put("modes/palette.gif", "ok"), transparency=0)
    frames = [Image.new("RGB", (30, 20), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(put("modes/animated.gif", "ok"), save_all=True, append_images=frames[1:], duration=100, loop=0)

    upright = quadrant_image(48, 64)
    upright.save(put("exif/upright.jpg", "ok"), quality=95, subsampling=0)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera held sideways stores
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    stored.save(put("exif/rotated.jpg", "ok"), quality=95, subsampling=0, exif=exif.tobytes())
    stored.save(put("exif/rotated_noexif.jpg", "ok"), quality=95, subsampling=0)

    (root / ".hidden.jpg").write_bytes(good.read_bytes())
    (root / ".cache").mkdir()
    (root / ".cache/thumb.jpg").write_bytes(good.read_bytes())
    (root / "good/notes.txt").write_text("not an image\n")
    (root / "good/loop").symlink_to(root, target_is_directory=True)
    return expected


@pytest.fixture(scope="session")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """(catalog folder, {relative path: expected status}); treat as read-only."""
    root = tmp_path_factory.mktemp("catalog")
    return root, make_catalog(root)


if typing.TYPE_CHECKING:
    from PIL import Image

    from tagger.export import ExportReport

TINY_TASKS: Mapping[str, Sequence[str]] = {"class": ("Tshirts", "Shirts", "Watches"), "color": ("Black", "White", "Blue", "Red")}
TINY_SIZE = 32


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trainer checkpoint of a tiny timm net (test_efficientnet, 32 px): class (3 labels), color (4 labels).

    Random weights, but each head is rescaled to read centred, standardised features, so predictions differ
    between images like a trained model's do instead of collapsing onto one class.
    """
    torch = pytest.importorskip("torch")
    from tagger.contract import TaskSpec
    from tagger.train.checkpoint import save_checkpoint
    from tagger.train.model import MultiTaskNet

    torch.manual_seed(0)
    tasks = tuple(TaskSpec(name, tuple(labels)) for name, labels in TINY_TASKS.items())
    model = MultiTaskNet("test_efficientnet", tasks, weights="none").eval()
    with torch.no_grad():
        x = torch.rand(32, 3, TINY_SIZE, TINY_SIZE) * 2 - 1  # roughly the normalised input range
        features = model.backbone(x)  # [32, F]
        mu, sd = features.mean(0), features.std(0) + 1e-6
        for head in model.heads.values():
            w = torch.randn_like(head.weight) * 3 / features.shape[1] ** 0.5 / sd
            head.weight.copy_(w)
            head.bias.copy_(-(w @ mu))
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    save_checkpoint(
        path,
        model,
        PreprocessSpec(size=TINY_SIZE),
        tasks,
        class_weights={name: [1.0] * len(labels) for name, labels in TINY_TASKS.items()},
        metrics={"val_acc_class": 0.5, "val_acc_color": 0.25},
        epoch=3,
        args={
            "backbone": "test_efficientnet", "image_size": TINY_SIZE,
            "tasks": [["class", "articleType"], ["color", "baseColour"]],
        },
        data={"root": "fashion-tiny", "n_train": 10, "n_val": 4},
    )
    return path


@pytest.fixture(scope="session")
def tiny_export(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> ExportReport:
    """The fp32 export report of `tiny_checkpoint` (a few seconds, once per session)."""
    from tagger.export import export_checkpoint

    return export_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("tiny_onnx") / "tiny.onnx")


@pytest.fixture(scope="session")
def tiny_onnx(tiny_export: ExportReport) -> Path:
    """`tiny_checkpoint` exported by `tagger export`: a real EfficientNet-style graph, 32 px input; read-only."""
    return tiny_export.path


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> typing.Iterator["S3Server"]:
    """A moto_server for the session, with AWS_* pointing at it (and at nothing else) for this process and its
    subprocesses; stopped at the end."""
    from s3server import S3Server, apply_env, restore_env

    server = S3Server(tmp_path_factory.mktemp("aws"))
    saved = apply_env(server.env())
    try:
        yield server
    finally:
        restore_env(saved)
        server.stop()


@pytest.fixture
def bucket(s3_server: "S3Server", request: pytest.FixtureRequest) -> str:
    """A fresh, empty bucket on the test S3 server; its s3:// URI."""
    import re

    import pyarrow.fs as pafs

    name = "t-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-") + f"-{len(request.node.name)}"
    fs, _ = pafs.FileSystem.from_uri("s3://x/?allow_bucket_creation=true&allow_delayed_open=true")
    fs.create_dir(name)
    return f"s3://{name}"


if typing.TYPE_CHECKING:
    from s3server import S3Server
