"""Smoke test of benchmarks/throughput.py on a few generated images: it runs, and its JSON report is complete."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from click.testing import CliRunner
from conftest import quadrant_image

from tagger.pipeline.discover import discover

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "throughput.py"
N_IMAGES = 6


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("throughput", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is being executed
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load_script()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small image folder like sample_images: styles.csv beside images/, sizes from thumbnail to photo."""
    root = tmp_path_factory.mktemp("bench_images")
    (root / "images").mkdir()
    (root / "styles.csv").write_text("id,articleType,baseColour\n")
    for i, (w, h) in enumerate([(60, 80), (64, 48), (300, 400), (90, 120), (120, 90)]):
        quadrant_image(w, h).save(root / "images" / f"{i}.jpg", quality=90)
    quadrant_image(40, 60).save(root / "images" / "5.png")
    return root


def test_catalog_copies_are_all_discovered(bench: ModuleType, images: Path, tmp_path: Path) -> None:
    sources = bench.source_images(images, limit=None)
    assert len(sources) == N_IMAGES
    assert len(bench.source_images(images, limit=4)) == 4
    how = bench.build_catalog(sources, tmp_path / "cat", 3)
    assert how in ("hardlink", "symlink")
    found = [r.path for r in discover(tmp_path / "cat")]
    assert len(found) == 3 * N_IMAGES
    assert found[:N_IMAGES] == [f"copy0000/{r.path}" for r in sources]


def test_inference_batches_cycle_the_decoded_images(bench: ModuleType) -> None:
    import numpy as np

    images = np.arange(3, dtype=np.uint8).reshape(3, 1, 1, 1)  # [3, S=1, S=1, 1]
    batches = list(bench.inference_batches(images, total=8, batch_size=3))
    assert [b.ravel().tolist() for b in batches] == [[0, 1, 2], [0, 1, 2], [0, 1]]


@pytest.mark.slow
def test_full_run_writes_every_field(images: Path, tiny_onnx: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable, str(SCRIPT), "--images", str(images), "--model", str(tiny_onnx),
        "--checkpoint", str(tiny_checkpoint), "--repeat", "1", "--batch-size", "4", "--workers", "2",
        "--threads", "1", "--json", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())

    assert set(report) >= {"config", "machine", "provider", "model", "images", "results", "ratios", "rss", "notes"}
    cfg = report["config"]
    assert (cfg["batch_size"], cfg["workers"], cfg["threads"], cfg["repeat"]) == (4, 2, 1, 1)
    machine = report["machine"]
    assert machine["cpu_count"] >= 1 and machine["cpu_model"] and machine["onnxruntime"]
    assert report["provider"] == "CPUExecutionProvider"
    model = report["model"]
    assert model["path"] == str(tiny_onnx) and len(model["sha256"]) == 64
    assert (model["backbone"], model["input_size"]) == ("test_efficientnet", 32)
    assert report["images"]["distinct"] == report["images"]["total"] == N_IMAGES

    results = report["results"]
    assert set(results) == {"tagger", "baseline", "decode", "inference"}
    for name, m in results.items():
        assert m["images"] == N_IMAGES, name
        assert m["seconds"] > 0 and m["img_per_s"] == pytest.approx(N_IMAGES / m["seconds"]), name
        assert m["cpu_seconds"] > 0, name
    assert results["tagger"]["errors"] == 0
    assert set(results["tagger"]["stage_seconds"]) >= {"decode", "infer", "write"}
    assert results["baseline"]["weights"] == "checkpoint"

    r = report["ratios"]
    t, d, i, b = (results[k]["img_per_s"] for k in ("tagger", "decode", "inference", "baseline"))
    assert r["combined_limit_img_per_s"] == pytest.approx(1 / (1 / d + 1 / i))
    assert r["tagger_over_baseline"] == pytest.approx(t / b)
    assert r["tagger_over_min_stage"] == pytest.approx(t / min(d, i))
    assert r["tagger_over_combined_limit"] == pytest.approx(t / r["combined_limit_img_per_s"])

    assert set(report["rss"]) == {"1x", "10x"}
    assert (report["rss"]["1x"]["images"], report["rss"]["10x"]["images"]) == (N_IMAGES, 10 * N_IMAGES)
    for m in report["rss"].values():
        assert m["peak_tree_rss_mb"] >= m["peak_process_rss_mb"] > 10
    assert any("still ramping up" in n for n in report["notes"])  # 6 images are under 10 batches of 4

    # The table comes last, on stdout; progress goes to stderr.
    assert "tagger / combined limit" in proc.stdout and "peak RSS" in proc.stdout
    assert "round 1/1" in proc.stderr and "round 1/1" not in proc.stdout


def test_model_without_torch_equivalent_skips_the_baseline_with_a_note(
    bench: ModuleType, images: Path, contract_onnx: Path, tmp_path: Path
) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "r.json"
    args = ["--images", str(images), "--model", str(contract_onnx), "--repeat", "2", "--limit", "3", "--workers", "0"]
    result = CliRunner().invoke(bench.main, [*args, "--skip-rss", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert (report["images"]["distinct"], report["images"]["total"]) == (3, 6)
    assert report["results"]["tagger"]["images"] == report["results"]["inference"]["images"] == 6
    assert "baseline" not in report["results"]
    assert report["ratios"]["tagger_over_baseline"] is None
    assert report["rss"] == {}
    assert any(n.startswith("baseline skipped: unknown backbone 'quadrant-means'") for n in report["notes"])
    assert "RSS skipped (--skip-rss)" in report["notes"]
    assert "tagger / baseline              n/a" in result.output


def test_embeddings_row_times_tagger_run_with_the_column(
    bench: ModuleType, images: Path, contract_onnx: Path, tmp_path: Path
) -> None:
    out = tmp_path / "r.json"
    args = ["--images", str(images), "--model", str(contract_onnx), "--repeat", "2", "--workers", "0", "--embeddings"]
    result = CliRunner().invoke(bench.main, [*args, "--skip-rss", "--skip-baseline", "--json", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())["results"]
    plain, emb = results["tagger"], results[bench.EMBEDDINGS_ROW]
    assert plain["images"] == emb["images"] == 2 * N_IMAGES and emb["errors"] == 0
    assert emb["parquet_bytes_per_row"] > plain["parquet_bytes_per_row"]  # 12 float16 values a row, and more metadata
    assert f"{bench.EMBEDDINGS_ROW} / tagger" in result.output and "bytes/row" in result.output


def test_empty_folder_is_one_clear_error(bench: ModuleType, contract_onnx: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(bench.main, ["--images", str(tmp_path), "--model", str(contract_onnx)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == f"error: no image files in {tmp_path}"


def test_object_store_serves_the_uploaded_files_and_the_proxy_delays_every_request(
    bench: ModuleType, images: Path, tmp_path: Path
) -> None:
    """--object-store's parts: moto on 127.0.0.1 holds the files byte for byte; through the proxy each request of a
    kept-alive connection waits the added latency once, and the server and proxy stop with the context."""
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("moto.server", reason="needs moto's server: pip install 'moto[server]'")
    import time

    import pyarrow.fs as pafs
    from s3server import environment

    delay, requests = 0.05, 4
    with bench.object_store(tmp_path / "aws", delay * 1000) as store:
        uri = bench.upload(images, store.endpoint, "cat")
        assert uri == f"s3://{bench.STORE_BUCKET}/cat"
        with environment(store.env(store.endpoint)):
            fs, root = pafs.FileSystem.from_uri(uri)
            with fs.open_input_stream(f"{root}/images/2.jpg") as f:
                assert f.read() == (images / "images" / "2.jpg").read_bytes()
        s3 = boto3.client("s3", endpoint_url=store.delayed, **bench.boto_credentials())
        s3.head_bucket(Bucket=bench.STORE_BUCKET)  # connect first: only the requests are timed
        for _ in range(requests):  # one GET each, on the kept-alive connection
            t0 = time.perf_counter()
            body = s3.get_object(Bucket=bench.STORE_BUCKET, Key="cat/images/0.jpg")["Body"].read()
            # A lower bound only: load can slow a request down, never make the delay shorter.
            assert time.perf_counter() - t0 >= delay
            assert body == (images / "images" / "0.jpg").read_bytes()
        pids = store.pids
        assert store.cpu_seconds() > 0  # the server's own CPU time, reported apart from tagger's
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
