"""A new user's first day: install hints for the train extra, training that reports its data and epochs, a
progress bar with a total and an ETA (plain lines off a terminal), --out named like another format, -q, and a
seeded `tagger eval --limit` sample."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import tagger.engines.local as local_engine
from tagger import RunConfig, run
from tagger.cli import main
from tagger.errors import UsageError
from tagger.evaluate import EvalConfig, evaluate
from tagger.labelled import load_labelled_folder

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_images"


def _cli_without(modules: tuple[str, ...], *args: str | Path) -> subprocess.CompletedProcess[str]:
    """The CLI in a fresh process in which importing `modules` fails, as where they are not installed."""
    prelude = "".join(f"sys.modules[{m!r}] = None; " for m in modules)
    script = f"import sys; {prelude}from tagger.cli import main; main()"
    cmd = [sys.executable, "-c", script, *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for p in sorted((SAMPLES / "images").glob("*.jpg"))[:8]:
        shutil.copy(p, root / p.name)
    return root


@pytest.mark.parametrize(
    "missing, args",
    [
        (("torch",), ["train", "--data", "d", "--out", "r"]),
        (("onnx",), ["export", "run/image_mtl_best.pt"]),
        (("torch",), ["export", "run/image_mtl_best.pt"]),
    ],
)
def test_train_and_export_without_the_train_extra_give_an_install_hint(
    missing: tuple[str, ...], args: list[str], tmp_path: Path
) -> None:
    proc = _cli_without(missing, *args)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()], proc.stderr  # one line, no traceback
    assert "pip install 'tagger[train]'" in proc.stderr and f"cannot import {missing[0]}" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_training_prints_its_rows_and_one_line_per_epoch_by_default(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from test_train import make_catalog

    data = make_catalog(tmp_path / "data", per_combo=6)  # 54 rows
    args = ["train", "--data", data, "--out", tmp_path / "run", "--epochs", "2", "--batch-size", "16",
            "--image-size", "32", "--backbone", "test_efficientnet", "--weights", "none", "--device", "cpu",
            "--workers", "0", "--limit", "40", "--val-fraction", "0.25"]  # fmt: skip
    proc = _cli_without((), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert re.search(r"kept \d+ rows: dropped \d+ whose 'class' label has fewer than 8 images", err), err
    assert [int(m) for m in re.findall(r"epoch (\d)/2 \| train acc", err)] == [1, 2], err
    assert re.search(r"only [12] batches an epoch \(\d+ training images at --batch-size 16 \(--limit 40", err), err
    quiet = _cli_without((), "-q", *args[:4], tmp_path / "run2", "--epochs", "1", *args[7:])
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == "", quiet.stderr


def test_the_progress_bar_shows_the_total_and_an_eta(
    photos: Path, contract_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(RunConfig(photos, tmp_path / "t.parquet", model=contract_onnx, batch_size=2, workers=0, progress=True))
    err = capsys.readouterr().err
    # tqdm's last frame: '100%|...| 8/8 [00:01<00:00, 7.50img/s]', elapsed<left.
    assert re.search(r"\b8/8 \[\d\d:\d\d<\d\d:\d\d", err), err


def test_off_a_terminal_a_plain_progress_line_every_few_seconds(
    photos: Path, contract_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(local_engine, "PROGRESS_EVERY_S", 0.0)  # a line after every batch
    run(RunConfig(photos, tmp_path / "t.parquet", model=contract_onnx, batch_size=1, workers=0))
    lines = capsys.readouterr().err.splitlines()
    listing = r"(\d+) files tagged, 0 errors, [\d.]+ img/s; listing: \d+ found so far"
    counted = r"(\d+) of 8 files tagged, 0 errors, [\d.]+ img/s, [\d:]+ left"
    done = []
    for line in lines:
        m = re.fullmatch(listing, line) or re.fullmatch(counted, line)
        assert m, line
        done.append(int(m.group(1)))
    assert done == list(range(1, 8)), lines  # none after the last batch: the summary line follows
    # Which form a line takes depends on how far the listing (a background thread) has got; both forms:
    listed = local_engine._Counted(range(8))  # type: ignore[arg-type]  # counts any items
    pending = iter(listed)
    for _ in range(3):
        next(pending)
    assert local_engine._progress_line(2, listed, 0, 1.0) == "2 files tagged, 0 errors, 2.0 img/s; listing: 3 found so far"
    list(pending)
    assert local_engine._progress_line(2, listed, 1, 1.0) == "2 of 8 files tagged, 1 errors, 2.0 img/s, 00:03 left"


def test_quiet_run_prints_nothing_and_a_default_run_its_summary(photos: Path, contract_onnx: Path, tmp_path: Path) -> None:
    args = ["run", str(photos), "--out", str(tmp_path / "t.parquet"), "--model", str(contract_onnx), "--workers", "0"]
    quiet = _cli_without((), "-q", *args)
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == "", (quiet.stdout, quiet.stderr)
    assert pq.read_table(tmp_path / "t.parquet").num_rows == 8
    loud = _cli_without((), *args)
    assert loud.returncode == 0 and loud.stdout.startswith("8 files, 8 ok, 0 errors"), loud.stdout


@pytest.mark.parametrize(
    "name", ["tags.csv", "tags.JSON", "tags.jsonl", "s3://bucket/tags.csv", "tags.csv.gz", "tags.parquet.GZ"]
)
def test_out_named_like_another_format_is_refused(name: str, photos: Path, contract_onnx: Path, tmp_path: Path) -> None:
    out = name if "://" in name else str(tmp_path / name)
    result = CliRunner().invoke(main, ["run", str(photos), "--out", out, "--model", str(contract_onnx)])
    assert result.exit_code == 2, result.output
    assert result.output.strip().startswith("error: --out") and "Parquet" in result.output, result.output
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UsageError, match="writes Parquet only"):
        RunConfig(photos, out)
    merged = CliRunner().invoke(main, ["merge", out, str(tmp_path / "s0.parquet")])
    assert merged.exit_code == 2 and "Parquet" in merged.output, merged.output


def test_eval_limit_scores_a_seeded_sample(contract_onnx: Path) -> None:
    ids = [[r["id"] for r in load_labelled_folder(SAMPLES, 5, seed).rows] for seed in (1, 1, 2)]
    assert len(ids[0]) == 5 and ids[0] == ids[1] and ids[0] != ids[2]
    all_ids = [r["id"] for r in load_labelled_folder(SAMPLES).rows]
    assert ids[0] == [i for i in all_ids if i in ids[0]]  # in csv order
    result = evaluate(EvalConfig(SAMPLES, model=contract_onnx, device="cpu", workers=0, limit=5, seed=1))
    assert result.rows == 5 and all(t.labelled == 5 for t in result.tasks)
    out = CliRunner().invoke(
        main, ["eval", "--data", str(SAMPLES), "--model", str(contract_onnx), "--workers", "0", "--limit", "5",
               "--seed", "1"],
    )  # fmt: skip
    assert out.exit_code == 0 and out.output.startswith("5 rows: 5 decoded"), out.output
