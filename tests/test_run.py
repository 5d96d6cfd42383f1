"""`tagger run` end to end: real files, a real ONNX Runtime session, Parquet read back; CLI exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import cuda_really_works

import tagger
from tagger.cli import main
from tagger.errors import TaggerError
from tagger import RunConfig, RunSummary, run

REPO = Path(__file__).resolve().parents[1]


def _rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


@pytest.fixture(scope="module")
def tagged(catalog: tuple[Path, dict[str, str]], contract_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[RunSummary, Path]:
    root, _ = catalog
    out = tmp_path_factory.mktemp("run") / "tags.parquet"
    summary = run(RunConfig(root, out, model=contract_onnx, device="cpu", batch_size=4, workers=0, top_k=2))
    return summary, out


def test_one_row_per_file_in_order_with_the_right_status(catalog: tuple[Path, dict[str, str]], tagged: tuple[RunSummary, Path]) -> None:
    root, expected = catalog
    summary, out = tagged
    rows = _rows(out)
    assert [r["path"] for r in rows] == sorted(expected)
    assert {r["path"]: r["status"] for r in rows} == expected
    n_err = sum(s == "error" for s in expected.values())
    assert (summary.files, summary.ok, summary.errors) == (len(expected), len(expected) - n_err, n_err)
    by_path = {r["path"]: r for r in rows}
    assert by_path["broken/bomb.png"]["error"].startswith("DecompressionBombError: ")
    assert by_path["broken/empty.jpg"]["error"].startswith("UnidentifiedImageError: ")
    for r in rows:
        st = os.stat(root / r["path"])
        assert (r["bytes"], r["mtime"]) == (st.st_size, st.st_mtime)
        if r["status"] == "ok":
            assert r["error"] is None and r["class"] is not None and 0 < r["class_score"] <= 1
            assert r["class_topk"][0] == {"label": r["class"], "score": r["class_score"]}
        else:
            assert r["error"] and r["class"] is None and r["width"] is None and r["color_topk"] is None
    assert (by_path["exif/rotated.jpg"]["width"], by_path["exif/rotated.jpg"]["height"]) == (48, 64)


def test_exif_rotated_photo_is_tagged_like_the_upright_one(tagged: tuple[RunSummary, Path]) -> None:
    by_path = {r["path"]: r for r in _rows(tagged[1])}
    up, rot, raw = by_path["exif/upright.jpg"], by_path["exif/rotated.jpg"], by_path["exif/rotated_noexif.jpg"]
    for task in ("class", "color"):
        assert rot[task] == up[task]
        assert rot[f"{task}_score"] == pytest.approx(up[f"{task}_score"], abs=0.02)
    # Without the EXIF tag the same pixels are seen sideways, and the quadrant model notices.
    assert any(
        raw[t] != up[t] or abs(raw[f"{t}_score"] - up[f"{t}_score"]) > 0.05 for t in ("class", "color")
    )


def test_file_metadata_describes_model_and_run(contract_onnx: Path, tagged: tuple[RunSummary, Path]) -> None:
    summary, out = tagged
    meta = {k.decode(): v.decode() for k, v in pq.read_metadata(out).metadata.items()}
    from tagger.storage import sha256_file

    assert meta["tagger.model_sha256"] == sha256_file(contract_onnx)
    assert meta["tagger.run.provider"] == "CPUExecutionProvider" == summary.provider
    assert meta["tagger.run.tool_version"] == tagger.__version__
    assert (meta["tagger.run.files"], meta["tagger.run.ok"], meta["tagger.run.errors"]) == tuple(
        str(x) for x in (summary.files, summary.ok, summary.errors)
    )
    assert meta["tagger.run.started"] <= meta["tagger.run.finished"]
    assert "tagger.tasks" in meta and "tagger.preprocess" in meta


def test_worker_processes_give_identical_results(
    catalog: tuple[Path, dict[str, str]], contract_onnx: Path, tagged: tuple[RunSummary, Path], tmp_path: Path
) -> None:
    root, _ = catalog
    out = tmp_path / "pooled.parquet"
    run(RunConfig(root, out, model=contract_onnx, device="cpu", batch_size=3, workers=2, top_k=2))
    assert pq.read_table(out).equals(pq.read_table(tagged[1]))


def test_run_is_exposed_as_tagger_run() -> None:
    assert tagger.run is run


def test_files_from_tags_listed_files_and_reports_missing_ones(
    catalog: tuple[Path, dict[str, str]], contract_onnx: Path, tmp_path: Path
) -> None:
    root, _ = catalog
    listing = tmp_path / "list.txt"
    listing.write_text("good/photo.png\ngone.jpg\ngood/photo.jpg\n", encoding="utf-8")
    out = tmp_path / "listed.parquet"
    summary = run(RunConfig(root, out, model=contract_onnx, device="cpu", workers=0, files_from=listing))
    rows = _rows(out)
    assert [(r["path"], r["status"]) for r in rows] == [
        ("good/photo.png", "ok"),
        ("gone.jpg", "error"),
        ("good/photo.jpg", "ok"),
    ]
    assert rows[1]["error"].startswith("FileNotFoundError") and rows[1]["bytes"] is None
    assert summary.errors == 1


def test_cli_run_exits_zero_with_error_rows(catalog: tuple[Path, dict[str, str]], contract_onnx: Path, tmp_path: Path) -> None:
    root, expected = catalog
    out = tmp_path / "cli.parquet"
    result = CliRunner().invoke(
        main, ["run", str(root), "--out", str(out), "--model", str(contract_onnx), "--device", "cpu", "--workers", "0",
               "--ext", "jpg,png"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    paths = [r["path"] for r in _rows(out)]
    assert paths == sorted(p for p in expected if p.lower().endswith((".jpg", ".png")))
    assert f"{len(paths)} files" in result.output


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing-catalog", "does not exist"),
        ("empty-catalog", "no image files"),
        ("bad-model", "cannot load model"),
        ("unwritable-output", "cannot write output"),
        ("cuda", "--device cuda"),
    ],
)
def test_cli_errors_are_one_line_and_nonzero(
    case: str, message: str, catalog: tuple[Path, dict[str, str]], contract_onnx: Path, tmp_path: Path
) -> None:
    root, model, out = catalog[0], contract_onnx, tmp_path / "out.parquet"
    extra: list[str] = []
    if case == "missing-catalog":
        root = tmp_path / "nowhere"
    elif case == "empty-catalog":
        root = tmp_path / "empty"
        (root / "sub").mkdir(parents=True)
        (root / "sub" / "readme.txt").write_text("no photos here")
    elif case == "bad-model":
        model = tmp_path / "bad.onnx"
        model.write_bytes(b"\x00not an onnx model\xff" * 8)
    elif case == "unwritable-output":
        out = tmp_path / "no-such-dir" / "out.parquet"
    else:
        if cuda_really_works(contract_onnx):
            pytest.skip("CUDA works on this machine")
        extra = ["--device", "cuda"]
    result = CliRunner().invoke(main, ["run", str(root), "--out", str(out), "--model", str(model), "--workers", "0", *extra])
    assert result.exit_code == TaggerError.exit_code
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_cli_run_never_imports_torch(catalog: tuple[Path, dict[str, str]], contract_onnx: Path, tmp_path: Path) -> None:
    root, _ = catalog
    out = tmp_path / "notorch.parquet"
    code = (
        "import sys\n"
        "from tagger.cli import main\n"
        f"args = ['-q', 'run', {str(root)!r}, '--out', {str(out)!r}, '--model', {str(contract_onnx)!r}, '--workers', '2']\n"
        "try:\n"
        "    main(args)\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "assert 'torch' not in sys.modules, 'tagger run imported torch'\n"
        "print('NO-TORCH-OK')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "NO-TORCH-OK" in proc.stdout, proc.stderr[-2000:]
    assert out.is_file()


def test_rows_match_direct_predictions_of_an_exported_model(
    catalog: tuple[Path, dict[str, str]], tiny_onnx: Path, tmp_path: Path
) -> None:
    """With a real exported graph, every row carries the prediction of its own image (no shift across batches)."""
    import numpy as np

    from tagger.pipeline.decode import Sample, decode_one
    from tagger.pipeline.session import open_session

    root, expected = catalog
    out = tmp_path / "tiny.parquet"
    run(RunConfig(root, out, model=tiny_onnx, device="cpu", batch_size=3, workers=2))
    session = open_session(tiny_onnx, "cpu", threads=1)
    rows = _rows(out)
    assert {r["path"]: r["status"] for r in rows} == expected
    oks = [r for r in rows if r["status"] == "ok"]
    decoded = [decode_one(root / r["path"], session.spec) for r in oks]
    assert all(isinstance(d, Sample) for d in decoded)
    probs = session.predict(np.stack([d.array for d in decoded]))  # type: ignore[union-attr]
    labels = {t.name: t.labels for t in session.tasks}
    for i, r in enumerate(oks):
        for task, p in probs.items():
            assert r[task] == labels[task][int(np.argmax(p[i]))]
            assert r[f"{task}_score"] == pytest.approx(float(p[i].max()), abs=1e-5)
    assert len({r["class"] for r in oks}) > 1  # the check means something only if predictions differ
