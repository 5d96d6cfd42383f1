"""`tagger calibrate`: scores rescaled inside the graph, fitted on labelled photos, with every top-1 label kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import CONTRACT_TASKS, quadrant_image

from tagger.cli import main
from tagger.contract import META_MODEL, PreprocessSpec
from tagger.errors import TaggerError
from tagger.pipeline.decode import decode_many
from tagger.pipeline.discover import discover
from tagger.pipeline.session import open_session
from tagger.temperature import UNDERFLOW, fit_temperature, rescale

onnx = pytest.importorskip("onnx")
from tagger.calibrate import MIN_IMAGES, calibrate_model  # noqa: E402

N_IMAGES = 90
SAMPLES = Path(__file__).resolve().parents[1] / "sample_images"


@pytest.fixture(scope="module")
def labelled(contract_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """styles.csv + images/: the contract model's own top-1 as the label for 2 rows in 3, another label otherwise.

    The contract model is confident (its weights are large), so on these labels it is overconfident.
    """
    root = tmp_path_factory.mktemp("labelled")
    (root / "images").mkdir()
    rng = np.random.default_rng(3)
    for i in range(N_IMAGES):
        colors = [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(4)]
        quadrant_image(48, 64, colors).save(root / "images" / f"{i}.jpg", quality=95)
    refs = list(discover(root / "images"))
    preds = open_session(contract_onnx, "cpu").predict(decode_many(refs, PreprocessSpec(size=32)).images)
    lines = ["id,articleType,baseColour"]
    for k, ref in enumerate(refs):
        labels = []
        for task in ("class", "color"):
            known = CONTRACT_TASKS[task]
            top = int(preds[f"{task}"][k].argmax())
            labels.append(known[top] if k % 3 else known[(top + 1 + k % 2) % len(known)])
        lines.append(f"{Path(ref.path).stem},{labels[0]},{labels[1]}")
    (root / "styles.csv").write_text("\n".join(lines) + "\n")
    return root


def _photos(root: Path) -> np.ndarray:
    return decode_many(list(discover(root / "images")), PreprocessSpec(size=32)).images


def _temperature_nodes(path: Path) -> list[str]:
    return [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Div" and "temperature" in n.name]


def test_rescaled_model_keeps_every_label_and_is_better_calibrated(
    contract_onnx: Path, labelled: Path, tmp_path: Path
) -> None:
    out = tmp_path / "calibrated.onnx"
    report = calibrate_model(contract_onnx, labelled, out, device="cpu", workers=0)
    assert report.path == out and [t.task for t in report.tasks] == ["class", "color"]
    images = _photos(labelled)
    old, new = open_session(contract_onnx, "cpu").predict(images), open_session(out, "cpu").predict(images)
    for fit in report.tasks:
        assert fit.images == N_IMAGES
        assert fit.temperature > 1  # overconfident on these labels: scores come down
        assert fit.error_after < fit.error_before and fit.nll_after <= fit.nll_before
        np.testing.assert_array_equal(new[fit.task].argmax(1), old[fit.task].argmax(1))
        exact = (old[fit.task] >= UNDERFLOW).all(1)  # rows whose log-probabilities survive float32
        assert exact.sum() >= N_IMAGES // 2
        np.testing.assert_allclose(new[fit.task][exact], rescale(old[fit.task][exact], fit.temperature), atol=1e-5)
        assert new[fit.task].max(1).mean() < old[fit.task].max(1).mean()
    model = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}[META_MODEL])
    assert model["temperature"] == pytest.approx({t.task: t.temperature for t in report.tasks})
    assert model["calibration"]["data"] == labelled.name
    assert sorted(_temperature_nodes(out)) == ["tagger_temperature_class_div", "tagger_temperature_color_div"]


def test_a_second_fit_updates_the_temperature_in_place(contract_onnx: Path, labelled: Path, tmp_path: Path) -> None:
    first = calibrate_model(contract_onnx, labelled, tmp_path / "once.onnx", device="cpu", workers=0)
    second = calibrate_model(tmp_path / "once.onnx", labelled, tmp_path / "twice.onnx", device="cpu", workers=0)
    assert len(_temperature_nodes(tmp_path / "twice.onnx")) == 2
    for fit in second.tasks:
        assert fit.temperature == pytest.approx(1.0, abs=0.02)  # already fitted on the same photos
    images = _photos(labelled)
    old = open_session(contract_onnx, "cpu").predict(images)
    twice = open_session(tmp_path / "twice.onnx", "cpu").predict(images)
    for a, b in zip(first.tasks, second.tasks):
        exact = (old[a.task] >= UNDERFLOW).all(1)
        expected = rescale(old[a.task][exact], a.temperature * b.temperature)
        np.testing.assert_allclose(twice[a.task][exact], expected, atol=1e-5)


def test_fit_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (20000, 8))
    true_t = 2.0
    p_true = np.exp(logits / true_t) / np.exp(logits / true_t).sum(1, keepdims=True)
    labels = np.array([rng.choice(8, p=row) for row in p_true])
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)  # the model's: too sharp by a factor of 2
    assert fit_temperature(probs, labels) == pytest.approx(true_t, rel=0.05)


def test_cli_errors_are_one_line_and_write_nothing(contract_onnx: Path, labelled: Path, tmp_path: Path) -> None:
    proto = onnx.load(str(contract_onnx))
    for node in proto.graph.node:
        if node.op_type == "Softmax" and node.output[0] == "class_probs":
            node.op_type = "Sigmoid"
            del node.attribute[:]
    sigmoid = tmp_path / "sigmoid.onnx"
    onnx.save(proto, str(sigmoid))
    out = tmp_path / "out.onnx"
    cases = {
        "does not exist": ["calibrate", str(contract_onnx), "--data", str(tmp_path / "missing"), "-o", str(out)],
        f"calibration needs at least {MIN_IMAGES}": ["calibrate", str(contract_onnx), "--data", str(SAMPLES), "-o", str(out)],
        "does not come from a Softmax": ["calibrate", str(sigmoid), "--data", str(labelled), "-o", str(out)],
        "is the model itself": ["calibrate", str(contract_onnx), "--data", str(labelled), "-o", str(contract_onnx)],
    }
    for message, args in cases.items():
        result = CliRunner().invoke(main, [*args, "--device", "cpu", "--workers", "0"])
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sigmoid.onnx"]


def test_a_refit_on_unknown_task_is_refused(contract_onnx: Path, labelled: Path, tmp_path: Path) -> None:
    with pytest.raises(TaggerError, match="no task 'size'"):
        calibrate_model(contract_onnx, labelled, tmp_path / "x.onnx", task_columns=[("size", "x")], device="cpu")
