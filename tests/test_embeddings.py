"""`tagger run --embeddings`: the `embedding` column, its values, and how reruns carry it."""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import CONTRACT_EMBEDDING_DIM, quadrant_image
from gated import Gate, gate_photo
from PIL import Image

from tagger import RunConfig, run
from tagger.cli import main
from tagger.contract import EMBEDDING_OUTPUT, INPUT_NAME, PreprocessSpec
from tagger.errors import TaggerError
from tagger.nightly.workdir import work_dir_of
from tagger.output.schema import META_OPTIONS, STATUS_OK
from tagger.pipeline.decode import Sample, decode_one
from tagger.pipeline.session import open_session

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_images" / "images"
RESUME_FILES = 120


def _embeddings(out: Path) -> dict[str, np.ndarray | None]:
    """path -> its embedding as float32 [D], None on a null."""
    table = pq.read_table(out, columns=["path", "embedding"])
    return {
        p: None if e is None else np.asarray(e, np.float32)
        for p, e in zip(table.column("path").to_pylist(), table.column("embedding").to_pylist())
    }


def test_column_has_the_model_s_dimension_float16_and_unit_norm(
    catalog: tuple[Path, dict[str, str]], contract_onnx: Path, tmp_path: Path
) -> None:
    root, expected = catalog
    out = tmp_path / "tags.parquet"
    run(RunConfig(root, out, model=contract_onnx, workers=0, embeddings=True))
    table = pq.read_table(out)
    field = table.schema.field("embedding")
    assert field.type == pa.list_(pa.float16(), CONTRACT_EMBEDDING_DIM)
    assert json.loads(table.schema.metadata[META_OPTIONS.encode()])["embedding_dim"] == CONTRACT_EMBEDDING_DIM
    status = dict(zip(table.column("path").to_pylist(), table.column("status").to_pylist()))
    embeddings = _embeddings(out)
    assert status == expected and "error" in status.values()
    for path, e in embeddings.items():
        if status[path] == STATUS_OK:
            assert e is not None and e.shape == (CONTRACT_EMBEDDING_DIM,)
            assert abs(float(np.linalg.norm(e)) - 1.0) < 2e-3  # float16 keeps ~3 decimals
        else:
            assert e is None
    # The values are the model's own output for the decoded image (up to float16 rounding).
    sess = ort.InferenceSession(str(contract_onnx), providers=["CPUExecutionProvider"])
    sample = decode_one(root / "good/photo.jpg", PreprocessSpec(size=32))
    assert isinstance(sample, Sample)
    (want,) = sess.run([EMBEDDING_OUTPUT], {INPUT_NAME: sample.array[None]})
    got = embeddings["good/photo.jpg"]
    assert got is not None
    np.testing.assert_allclose(got, want[0], atol=1e-3)


def test_without_the_option_nothing_changes(
    catalog: tuple[Path, dict[str, str]], contract_onnx: Path, tmp_path: Path
) -> None:
    root, _ = catalog
    out = tmp_path / "tags.parquet"
    run(RunConfig(root, out, model=contract_onnx, workers=0))
    assert "embedding" not in pq.read_schema(out).names
    session = open_session(contract_onnx, "cpu")
    images = np.zeros((2, 32, 32, 3), np.uint8)
    assert set(session.predict(images)) == {"class", "color"} and session.embedding_dim == 0
    with_embedding = open_session(contract_onnx, "cpu", embeddings=True).predict(images)
    assert with_embedding[EMBEDDING_OUTPUT].shape == (2, CONTRACT_EMBEDDING_DIM)


def test_a_model_without_the_output_is_a_one_line_error(
    catalog: tuple[Path, dict[str, str]], contract_onnx_without_embedding: Path, tmp_path: Path
) -> None:
    root, _ = catalog
    out = tmp_path / "out" / "tags.parquet"
    out.parent.mkdir()
    model = str(contract_onnx_without_embedding)
    result = CliRunner().invoke(main, ["run", str(root), "--out", str(out), "--model", model, "--workers", "0", "--embeddings"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == TaggerError.exit_code == 1, result.output
    assert len(lines) == 1 and "no 'embedding' output" in lines[0] and "--embeddings" in lines[0], result.output
    assert list(out.parent.iterdir()) == []  # no output, no OUT.work/
    info = CliRunner().invoke(main, ["info", model])
    assert info.exit_code == 0 and "embedding   none" in info.output
    # The same model without the option tags as before.
    assert run(RunConfig(root, out, model=model, workers=0)).ok > 0


def test_same_photo_same_embedding_across_runs_and_paths(tiny_onnx: Path, tmp_path: Path) -> None:
    root = tmp_path / "cat"
    root.mkdir()
    for p in sorted(SAMPLES.iterdir())[:4]:
        shutil.copy(p, root / p.name)
    first = sorted(SAMPLES.iterdir())[0]
    shutil.copy(first, root / f"copy-{first.name}")
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    run(RunConfig(root, a, model=tiny_onnx, workers=0, embeddings=True))
    run(RunConfig(root, b, model=tiny_onnx, workers=2, batch_size=3, embeddings=True))
    ea, eb = _embeddings(a), _embeddings(b)
    assert ea.keys() == eb.keys() and len(ea) == 5
    for path in ea:
        assert ea[path] is not None
        np.testing.assert_array_equal(ea[path], eb[path])  # batch size and workers do not matter
    np.testing.assert_array_equal(ea[first.name], ea[f"copy-{first.name}"])


def _near_copies(src: Path, folder: Path) -> list[Path]:
    """The photo resized to 70%, and re-encoded as JPEG at quality 60."""
    with Image.open(src) as img:
        img = img.convert("RGB")
        small = img.resize((max(1, img.width * 7 // 10), max(1, img.height * 7 // 10)), Image.Resampling.BICUBIC)
        resized, recoded = folder / f"resized-{src.stem}.png", folder / f"recoded-{src.stem}.jpg"
        small.save(resized)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=60)
        recoded.write_bytes(buf.getvalue())
    return [resized, recoded]


def test_near_copies_score_far_above_other_products(tiny_onnx: Path, tmp_path: Path) -> None:
    """Even the random-weight test backbone maps a photo's near-copies close to it and other products further away;
    a trained model only separates products better."""
    root = tmp_path / "cat"
    root.mkdir()
    photos = sorted(SAMPLES.iterdir())[:8]
    for p in photos:
        shutil.copy(p, root / p.name)
        _near_copies(p, root)
    out = tmp_path / "tags.parquet"
    run(RunConfig(root, out, model=tiny_onnx, workers=0, embeddings=True))
    e = _embeddings(out)
    near, other = [], []
    for p in photos:
        original = e[p.name]
        assert original is not None
        for name in (f"resized-{p.stem}.png", f"recoded-{p.stem}.jpg"):
            copy = e[name]
            assert copy is not None
            near.append(float(original @ copy))
        other += [float(original @ e[q.name]) for q in photos if q != p]  # type: ignore[operator]
    assert min(near) > 0.98, near
    # Measured: near-copies >= 0.996, other products <= 0.91 and 0.49 on average.
    assert min(near) - max(other) > 0.05 and np.mean(near) - np.mean(other) > 0.3, (near, other)


def test_incremental_and_resume_carry_the_column(
    catalog: tuple[Path, dict[str, str]], contract_onnx: Path, tmp_path: Path
) -> None:
    root, _ = catalog
    out = tmp_path / "tags.parquet"
    first = run(RunConfig(root, out, model=contract_onnx, workers=0, embeddings=True))
    before = _embeddings(out)
    again = run(RunConfig(root, out, model=contract_onnx, workers=0, embeddings=True, incremental=True))
    assert (again.tagged, again.reused) == (0, first.files)
    after = _embeddings(out)
    assert after.keys() == before.keys()
    for path, e in before.items():
        assert (e is None and after[path] is None) or np.array_equal(e, after[path])  # type: ignore[arg-type]

    # Without --embeddings the old rows do not fit: everything is tagged again, and the column goes.
    plain = run(RunConfig(root, out, model=contract_onnx, workers=0, incremental=True))
    assert (plain.tagged, plain.reused) == (first.files, 0)
    assert "embedding" not in pq.read_schema(out).names
    # ... and back: rows without an embedding are not reused for a run that wants one.
    back = run(RunConfig(root, out, model=contract_onnx, workers=0, embeddings=True, incremental=True))
    assert (back.tagged, back.reused) == (first.files, 0)
    assert _embeddings(out).keys() == before.keys()


@pytest.mark.slow
def test_resume_reuses_committed_parts_only_with_the_same_option(contract_onnx: Path, tmp_path: Path) -> None:
    root = tmp_path / "cat"
    root.mkdir()
    rng = np.random.default_rng(3)
    for i in range(RESUME_FILES):
        colors = [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(4)]
        quadrant_image(640, 480, colors).save(root / f"p{i:03d}.png")
    gate_photo(root / "p060.png")  # the run waits there: it is still running when signalled
    gate = Gate(tmp_path / "gate")
    reference = tmp_path / "reference.parquet"
    run(RunConfig(root, reference, model=contract_onnx, workers=0, embeddings=True))
    out = tmp_path / "run" / "tags.parquet"
    out.parent.mkdir()
    args = [sys.executable, str(gate.script()), "run", str(root), "--out", str(out), "--model", str(contract_onnx),
            "--workers", "0", "--batch-size", "1", "--threads", "1", "--commit-every", "5", "--embeddings"]  # fmt: skip
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=gate.env)
    work = work_dir_of(out)
    deadline = time.monotonic() + 60
    while not list(work.glob("part-*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    gate.open()  # a decode waiting there ends, so the unwinding need not wait for it
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    committed = sum(pq.read_metadata(p).num_rows for p in work.glob("part-*.parquet"))
    assert 0 < committed < RESUME_FILES
    shutil.copytree(out.parent, tmp_path / "copy")

    resumed = run(RunConfig(root, out, model=contract_onnx, workers=0, embeddings=True, resume=True))
    assert (resumed.resumed, resumed.tagged) == (committed, RESUME_FILES - committed)
    want, got = _embeddings(reference), _embeddings(out)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)  # type: ignore[arg-type]

    # Parts with embeddings do not fit a run without them: they are discarded, everything is tagged.
    plain = run(RunConfig(root, tmp_path / "copy" / out.name, model=contract_onnx, workers=0, resume=True))
    assert (plain.resumed, plain.tagged) == (0, RESUME_FILES)
