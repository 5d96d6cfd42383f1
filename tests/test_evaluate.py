"""`tagger eval` end to end: a generated styles.csv + images/ folder, real ONNX Runtime sessions, real HTML reports."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import CONTRACT_TASKS, quadrant_image

from tagger.cli import main
from tagger.errors import TaggerError, UsageError
from tagger.evaluate import EvalConfig, EvalResult, evaluate
from tagger.metrics import calibration_error
from tagger import RunConfig, run
from tagger.report import write_report

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "export" / "tagger-default.onnx"
N_IMAGES = 24
FIRST_ID = 100
CORRUPT_ID, MISSING_ID, EMPTY_LABEL_ID = "900", "901", str(FIRST_ID + 5)

Labelled = tuple[Path, dict[str, dict[str, str]]]  # (data folder, {id: {task: the model's prediction}})


def _class_label(i: int, pred: str) -> str:
    """Rows by i % 4: 0 unknown to the model, 1 and 3 right, 2 a wrong known label."""
    known = CONTRACT_TASKS["class"]
    if i % 4 == 0:
        return "Kurtas" if i % 8 == 0 else "Sarees"
    if i % 4 == 2:
        return known[(known.index(pred) + 1) % len(known)]
    return pred


def _color_label(i: int, pred: str) -> str:
    """Rows by i % 3: 0 right, 1 a wrong known label, 2 unknown to the model."""
    known = CONTRACT_TASKS["color"]
    return (pred, known[(known.index(pred) + 2) % len(known)], "Teal")[i % 3]


@pytest.fixture(scope="module")
def labelled(contract_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Labelled:
    """(folder, {id: the model's predictions per task, from `tagger run`}); labels are built from those predictions.

    styles.csv also lists a corrupt image, a row without an image file and a row with an empty class label; its last
    column holds unquoted commas, as in the original dataset.
    """
    root = tmp_path_factory.mktemp("labelled")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(N_IMAGES):
        colors = [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(4)]
        w, h = (int(x) for x in rng.integers(30, 90, 2))
        quadrant_image(w, h, colors).save(images / f"{FIRST_ID + i}.jpg", quality=95)
    out = root.parent / "preds.parquet"
    run(RunConfig(images, out, model=contract_onnx, device="cpu", workers=0))
    tagged = pq.read_table(out).to_pylist()
    preds = {r["path"].removesuffix(".jpg"): {"class": r["class"], "color": r["color"]} for r in tagged}
    (images / f"{CORRUPT_ID}.jpg").write_text("not a jpeg\n")
    lines = ["id,articleType,baseColour,productDisplayName"]
    for i in range(N_IMAGES):
        row_id = str(FIRST_ID + i)
        cls = "" if row_id == EMPTY_LABEL_ID else _class_label(i, preds[row_id]["class"])
        lines.append(f"{row_id},{cls},{_color_label(i, preds[row_id]['color'])},Brand Men Blue, Slim, Shirt")
    lines += [f"{CORRUPT_ID},Tshirts,Black,Broken", f"{MISSING_ID},Shirts,White,Gone"]
    (root / "styles.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root, {k: v for k, v in preds.items() if k != CORRUPT_ID}


@pytest.fixture(scope="module")
def result(labelled: Labelled, contract_onnx: Path) -> EvalResult:
    return evaluate(EvalConfig(labelled[0], model=contract_onnx, device="cpu", workers=0, batch_size=5))


def _truth(root: Path, column: str) -> dict[str, str]:
    lines = (root / "styles.csv").read_text(encoding="utf-8").splitlines()
    col = lines[0].split(",").index(column)
    return {ln.split(",")[0]: ln.split(",")[col] for ln in lines[1:]}


def _hand_metrics(pairs: list[tuple[str, str]]) -> tuple[float, float]:
    """(macro-F1 over classes seen in truth or predictions, mean recall over classes in truth), in plain Python."""
    classes = {t for t, _ in pairs} | {p for _, p in pairs}
    f1s, recalls = [], []
    for c in classes:
        tp = sum(t == c and p == c for t, p in pairs)
        support = sum(t == c for t, _ in pairs)
        predicted = sum(p == c for _, p in pairs)
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
        if support:
            recalls.append(recall)
    return sum(f1s) / len(f1s), sum(recalls) / len(recalls)


def test_counts_and_metrics_match_a_hand_computation_from_tagger_run(
    labelled: Labelled, result: EvalResult
) -> None:
    root, preds = labelled
    assert (result.rows, result.missing, result.decode_errors, result.decoded) == (N_IMAGES + 2, 1, 1, N_IMAGES)
    assert result.missing_ids == (MISSING_ID,)
    assert [i for i, _ in result.error_examples] == [CORRUPT_ID]
    assert result.error_examples[0][1].startswith("UnidentifiedImageError")
    assert result.provider == "CPUExecutionProvider"
    for task, column in (("class", "articleType"), ("color", "baseColour")):
        t = result.task(task)
        truth = _truth(root, column)
        labels = set(CONTRACT_TASKS[task])
        rows = [(truth[i], preds[i][task]) for i in preds if truth[i]]  # decoded rows with a label
        known = [(y, p) for y, p in rows if y in labels]
        correct = sum(y == p for y, p in known)
        assert t.column == column
        assert (t.labelled, t.scored, t.unknown, t.correct) == (len(rows), len(known), len(rows) - len(known), correct)
        assert t.unlabelled == sum(not truth[i] for i in preds)
        assert t.top1_all == pytest.approx(correct / len(rows))
        assert t.top1_known == pytest.approx(correct / len(known))
        macro_f1, balanced = _hand_metrics(known)
        assert t.macro_f1 == pytest.approx(macro_f1)
        assert t.balanced_acc == pytest.approx(balanced)
        assert t.unknown_labels == dict(Counter(y for y, _ in rows if y not in labels))
        assert int(t.confusion.sum()) == len(known)
        wrong = Counter((y, p) for y, p in known if y != p)
        assert t.top_confusions(100) == sorted(
            ((y, p, n) for (y, p), n in wrong.items()),
            key=lambda x: (-x[2], t.labels.index(x[0]), t.labels.index(x[1])),
        )
        assert len(t.mistakes) == len(known) - correct
        scores = [m.score for m in t.mistakes]
        assert scores == sorted(scores, reverse=True)
        for m in t.mistakes:
            assert m.true != m.predicted == preds[m.id][task] and truth[m.id] == m.true
            assert m.path == root / "images" / f"{m.id}.jpg"
    # By construction of the labels (see _class_label / _color_label).
    cls, color = result.task("class"), result.task("color")
    assert (cls.unknown, cls.unlabelled, cls.unknown_labels) == (6, 1, {"Kurtas": 3, "Sarees": 3})
    assert (cls.correct, cls.scored) == (11, 17)
    assert (color.unknown, color.correct, color.scored, color.unlabelled) == (8, 8, 16, 0)


def test_calibration_error_by_hand() -> None:
    conf = np.array([0.95, 0.9, 0.55, 0.52, 0.1, 1.0])
    hit = np.array([True, True, False, True, False, True])
    # 10 bins: [0.9, 1.0] holds 0.95, 0.9, 1.0 (all right, mean 0.95); [0.5, 0.6) holds 0.55, 0.52 (half right,
    # mean 0.535); [0.1, 0.2) holds 0.1 (wrong).
    expected = (3 * 0.05 + 2 * 0.035 + 1 * 0.1) / 6
    assert calibration_error(conf, hit, bins=10) == pytest.approx(expected)
    assert calibration_error(np.full(4, 0.75), np.array([True, True, True, False])) == pytest.approx(0.0)
    assert np.isnan(calibration_error(np.zeros(0), np.zeros(0, bool)))


def test_eval_reports_the_calibration_of_the_top1_score(labelled: Labelled, result: EvalResult) -> None:
    root, _ = labelled
    tagged = {r["path"].removesuffix(".jpg"): r for r in pq.read_table(root.parent / "preds.parquet").to_pylist()}
    for task, column in (("class", "articleType"), ("color", "baseColour")):
        truth = _truth(root, column)
        known = [i for i in tagged if truth[i] in CONTRACT_TASKS[task]]
        scores = np.array([tagged[i][f"{task}_score"] for i in known])
        hits = np.array([tagged[i][task] == truth[i] for i in known])
        t = result.task(task)
        assert t.calibration_error == pytest.approx(calibration_error(scores, hits), abs=1e-6)
        assert t.mean_score == pytest.approx(scores.mean(), abs=1e-6)
        assert f"calibration error {t.calibration_error:.3f}" in t.line()
        for threshold, coverage, accuracy in t.by_threshold:
            above = scores >= threshold
            assert coverage == pytest.approx(above.mean())
            assert accuracy == pytest.approx(hits[above].mean()) if above.any() else np.isnan(accuracy)


def test_decode_workers_and_batch_size_do_not_change_the_result(
    labelled: Labelled, contract_onnx: Path, result: EvalResult
) -> None:
    pooled = evaluate(EvalConfig(labelled[0], model=contract_onnx, device="cpu", workers=2, batch_size=3))
    assert pooled.lines(5)[1:] == result.lines(5)[1:]  # the first line carries the elapsed time
    for a, b in zip(pooled.tasks, result.tasks):
        assert np.array_equal(a.confusion, b.confusion)
        assert a.mistakes == b.mistakes


def test_task_override_scores_another_column(labelled: Labelled, contract_onnx: Path) -> None:
    # Colours checked against the articleType column: every label is unknown to the colour head.
    r = evaluate(
        EvalConfig(labelled[0], model=contract_onnx, device="cpu", workers=0, tasks=(("color", "articleType"),))
    )
    t = r.task("color")
    assert t.column == "articleType"
    assert (t.scored, t.correct, t.unknown) == (0, 0, t.labelled)
    assert t.labelled == N_IMAGES - 1 and np.isnan(t.top1_known) and t.top1_all == 0.0
    assert "n/a known labels (0/0)" in t.line()


def _data_uris(page: str, kind: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(rf'src="data:image/{kind};base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_is_one_self_contained_page(result: EvalResult, tmp_path: Path) -> None:
    from PIL import Image

    path = write_report(result, tmp_path / "report.html")
    page = path.read_text(encoding="utf-8")
    srcs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    # Only inlined images and links within the page (the task table to each task's section).
    assert srcs and all(s.startswith("data:image/") or s in {f"#task-{t.name}" for t in result.tasks} for s in srcs)
    assert "<link" not in page and "<script" not in page and "url(" not in page
    pngs = _data_uris(page, "png")
    assert len(pngs) == len(result.tasks)  # one confusion matrix per task
    for png in pngs:
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG" and im.width > 200
    thumbs = _data_uris(page, "jpeg")
    assert len(thumbs) == sum(len(t.mistakes) for t in result.tasks) > 0
    for thumb in thumbs:
        with Image.open(io.BytesIO(thumb)) as im:
            assert im.format == "JPEG" and max(im.size) <= 160
    cls = result.task("class")
    pc = cls.per_class()
    for i in np.flatnonzero(pc["support"] > 0):  # a table row per class present, with its scores
        assert re.search(
            rf"<tr><td>{cls.labels[i]}</td><td>{pc['precision'][i]:.3f}</td><td>{pc['recall'][i]:.3f}</td>", page
        )
    assert "Kurtas (3)" in page and "Sarees (3)" in page  # unknown labels
    assert f"{CORRUPT_ID}: UnidentifiedImageError" in page and MISSING_ID in page
    m = cls.mistakes[0]
    assert f"predicted: {m.predicted} ({m.score:.2f})" in page
    threshold, coverage, accuracy = cls.by_threshold[0]
    assert f"<tr><td>&ge; {threshold:.2f}</td><td>{coverage:.3f}</td><td>{accuracy:.3f}</td></tr>" in page
    assert "All " in page and "most frequent" not in page


def test_report_confusion_matrix_keeps_the_most_frequent_classes(result: EvalResult, tmp_path: Path) -> None:
    page = write_report(result, tmp_path / "top.html", max_classes=3).read_text(encoding="utf-8")
    present = [int(((c.confusion.sum(0) > 0) | (c.confusion.sum(1) > 0)).sum()) for c in result.tasks]
    for n in present:
        assert f"The 3 most frequent of the {n} classes present" in page
    assert len(_data_uris(page, "png")) == len(result.tasks)


def test_cli_prints_counts_and_one_line_per_task(
    labelled: Labelled, contract_onnx: Path, result: EvalResult, tmp_path: Path
) -> None:
    report = tmp_path / "cli.html"
    res = CliRunner().invoke(
        main,
        ["-q", "eval", "--data", str(labelled[0]), "--model", str(contract_onnx), "--device", "cpu", "--workers", "0",
         "--show-confusions", "2", "--report", str(report)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith(f"{N_IMAGES + 2} rows: {N_IMAGES} decoded, 1 decode errors, 1 without an image file; ")
    cls = next(ln for ln in lines if ln.startswith("class (articleType): "))
    assert "top-1 0.478 all (11/23), 0.647 known labels (11/17)" in cls and "unknown labels 6, unlabelled 1" in cls
    assert any(ln.startswith("color (baseColour): top-1 0.333 all (8/24)") for ln in lines)
    assert "  unknown labels: Kurtas (3), Sarees (3)" in lines
    for task in result.tasks:
        for true, pred, n in task.top_confusions(2):
            assert f"  {true} -> {pred}: {n}" in lines
    assert lines[-1] == f"report: {report}" and report.is_file()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing-folder", "does not exist"),
        ("no-styles", "styles.csv not found"),
        ("no-images", "has its image"),
        ("unknown-task", "the model has no task 'bogus'"),
        ("unknown-column", "no column 'nope'"),
    ],
)
def test_cli_errors_are_one_line(
    case: str, message: str, labelled: Labelled, contract_onnx: Path, tmp_path: Path
) -> None:
    data, extra = labelled[0], []
    if case == "missing-folder":
        data = tmp_path / "nowhere"
    elif case == "no-styles":
        data = tmp_path
    elif case == "no-images":
        data = tmp_path
        (tmp_path / "styles.csv").write_text("id,articleType,baseColour\n1,Tshirts,Black\n")
    elif case == "unknown-task":
        extra = ["--task", "bogus=articleType"]
    else:
        extra = ["--task", "color=nope"]
    args = ["eval", "--data", str(data), "--model", str(contract_onnx), "--workers", "0", *extra]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == TaggerError.exit_code
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], res.output
    assert "Traceback" not in res.output


def _cli_in_subprocess(args: list[str], prelude: str = "") -> subprocess.CompletedProcess[str]:
    code = (
        "import sys\n"
        f"{prelude}"
        "from tagger.cli import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit as e:\n"
        "    print('EXIT', e.code)\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_eval_with_report_never_imports_torch(
    labelled: Labelled, contract_onnx: Path, tmp_path: Path
) -> None:
    report = tmp_path / "notorch.html"
    proc = _cli_in_subprocess(
        ["-q", "eval", "--data", str(labelled[0]), "--model", str(contract_onnx), "--workers", "2",
         "--report", str(report)]  # fmt: skip
    )
    assert "TORCH False" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "EXIT 0" in proc.stdout or "EXIT None" in proc.stdout, proc.stderr[-2000:]
    assert report.is_file()


def test_report_without_matplotlib_says_how_to_install_it(
    labelled: Labelled, contract_onnx: Path, tmp_path: Path
) -> None:
    report = tmp_path / "never.html"
    proc = _cli_in_subprocess(
        ["eval", "--data", str(labelled[0]), "--model", str(contract_onnx), "--workers", "0", "--report", str(report)],
        prelude="sys.modules['matplotlib'] = None  # what an environment without the report extra sees\n",
    )
    assert f"EXIT {TaggerError.exit_code}" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == 'error: the HTML report needs matplotlib: pip install "tagger[report]"'
    assert not report.exists()


@pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason="the shipped default model is not in export/")
def test_default_model_on_the_sample_photos(tmp_path: Path) -> None:
    # 20 real catalogue photos from the validation split; measured on CPU: class 16/20, colour 12/20 (the two-task
    # model's head), gender 16/20, category 20/20, subcategory 19/20, usage 16/20.
    r = evaluate(EvalConfig(REPO / "sample_images", device="cpu", workers=0))
    assert (r.rows, r.decoded, r.missing, r.decode_errors) == (20, 20, 0, 0)
    # Every task is scored without --task, by the column the model records.
    assert [(t.name, t.column) for t in r.tasks] == [
        ("class", "articleType"), ("color", "baseColour"), ("gender", "gender"), ("category", "masterCategory"),
        ("subcategory", "subCategory"), ("usage", "usage"),
    ]
    assert all(t.scored == 20 for t in r.tasks)
    assert r.task("class").top1_known >= 0.7
    assert r.task("color").top1_known >= 0.45
    assert r.task("category").top1_known >= 0.9 and r.task("subcategory").top1_known >= 0.85
    page = write_report(r, tmp_path / "sample.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == len(r.tasks)  # one confusion matrix per task
    assert all(f'href="#task-{t.name}"' in page for t in r.tasks)


def test_report_never_overwrites_an_input_and_a_bad_seed_is_a_usage_error(
    labelled: Labelled, contract_onnx: Path
) -> None:
    """--report onto the model, styles.csv or a photo of the folder is refused before the run; --seed -1 exits 2."""
    root = labelled[0]
    photo = sorted((root / "images").glob("*.jpg"))[0]
    inputs = {p: p.read_bytes() for p in (contract_onnx, root / "styles.csv", photo)}
    base = ["eval", "--data", str(root), "--model", str(contract_onnx), "--workers", "0"]
    for target, message in ((contract_onnx, "is the model itself"), (root / "styles.csv", "is the labels file itself"),
                            (photo, "is a file of the labelled folder")):
        res = CliRunner().invoke(main, [*base, "--report", str(target)])
        errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
        assert res.exit_code == TaggerError.exit_code and len(errors) == 1 and message in errors[0], res.output
    assert {p: p.read_bytes() for p in inputs} == inputs
    res = CliRunner().invoke(main, [*base, "--limit", "2", "--seed", "-1"])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output


def test_a_negative_mistakes_count_is_a_usage_error(labelled: Labelled, contract_onnx: Path) -> None:
    """From Python a UsageError (exit 2 through the CLI's own handling), from the command line exit 2 and one line."""
    with pytest.raises(UsageError, match="--mistakes must be >= 0, got -1") as caught:
        EvalConfig(data=labelled[0], model=contract_onnx, mistakes=-1)
    assert caught.value.exit_code == 2
    res = CliRunner().invoke(main, ["eval", "--data", str(labelled[0]), "--model", str(contract_onnx), "--mistakes", "-1"])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
