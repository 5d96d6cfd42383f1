"""tagger dupes and tagger similar on tables in the layout of `tagger run --embeddings`, with real photo files."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from tagger.cli import main
from tagger.contract import META_TASKS
from tagger.errors import TaggerError, UsageError
from tagger.output import schema as s
from tagger.report import write_dupes_report
from tagger.embeddings import EMBEDDING_COLUMN, VectorIndex, load_table
from tagger.similar import dupes, similar

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_images"
DIM = 64
COS_STEP = 0.97  # cosine of neighbours in the chain c1 - c2 - c3 (c1 and c3: 0.88, under the threshold)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def write_table(
    path: Path, rows: list[dict[str, Any]], catalog: Path | None = None, model_sha256: str = "0" * 64
) -> Path:
    """A table as `tagger run --embeddings` writes it: output columns, embedding as float16 fixed-size lists."""
    tasks = {"class": sorted({r["class"] for r in rows if r.get("class")}),
             "color": sorted({r["color"] for r in rows if r.get("color")})}  # fmt: skip
    emb = [None if r.get("vector") is None else np.asarray(r["vector"], np.float16).tolist() for r in rows]
    table = pa.table(
        {
            "path": pa.array([r["path"] for r in rows], pa.string()),
            "class": pa.array([r.get("class") for r in rows], pa.string()).dictionary_encode(),
            "class_score": pa.array([0.9] * len(rows), pa.float32()),
            "color": pa.array([r.get("color") for r in rows], pa.string()).dictionary_encode(),
            "color_score": pa.array([0.8] * len(rows), pa.float32()),
            "status": pa.array([r.get("status", s.STATUS_OK) for r in rows], pa.string()),
            "error": pa.array([r.get("error") for r in rows], pa.string()),
            "sha256": pa.array([r.get("sha256") for r in rows], pa.string()),
            EMBEDDING_COLUMN: pa.array(emb, pa.list_(pa.float16(), DIM)),
        }
    )
    meta = {META_TASKS: json.dumps(tasks), s.META_MODEL_SHA256: model_sha256}
    if catalog is not None:
        meta[s.META_CATALOG] = str(catalog)
    pq.write_table(table.replace_schema_metadata(meta), path)
    return path


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Real photos (copies of the sample images) and a table of them with planted exact, near and chained copies."""
    root = tmp_path_factory.mktemp("dupes")
    photos = sorted((SAMPLES / "images").glob("*.jpg"))
    rng = np.random.default_rng(0)
    e1, e2 = _unit(rng.standard_normal((2, DIM)))
    e2 = _unit(e2 - (e2 @ e1) * e1)
    step = np.arccos(COS_STEP)
    chain = [np.cos(i * step) * e1 + np.sin(i * step) * e2 for i in range(3)]
    v_a, v_b = _unit(rng.standard_normal((2, DIM)))
    b_near = _unit(v_b + 0.1 * _unit(rng.standard_normal(DIM)))  # cosine ~0.995
    rows = [
        {"path": "a.jpg", "sha256": "A", "class": "Tshirts", "color": "Black", "vector": v_a},
        {"path": "a_copy.jpg", "sha256": "A", "class": "Tshirts", "color": "Black", "vector": v_a},
        {"path": "b.jpg", "sha256": "B", "class": "Watches", "color": "Black", "vector": v_b},
        {"path": "b_near.jpg", "sha256": "B2", "class": "Watches", "color": "White", "vector": b_near},
        {"path": "c1.jpg", "sha256": "C1", "class": "Jeans", "color": "Blue", "vector": chain[0]},
        {"path": "c2.jpg", "sha256": "C2", "class": "Jeans", "color": "Blue", "vector": chain[1]},
        {"path": "c3.jpg", "sha256": "C3", "class": "Jeans", "color": "Blue", "vector": chain[2]},
        {"path": "c3_copy.jpg", "sha256": "C3", "class": "Jeans", "color": "Blue", "vector": chain[2]},
        # Left out: an error row with the sha256 of a.jpg, and an ok row without an embedding.
        {"path": "broken.jpg", "sha256": "A", "status": s.STATUS_ERROR, "error": "UnidentifiedImageError"},
        {"path": "noemb.jpg", "sha256": "A", "class": "Tshirts", "color": "Black"},
    ]
    for i, v in enumerate(_unit(rng.standard_normal((12, DIM)))):
        rows.append({"path": f"d{i:02d}.jpg", "sha256": f"D{i}", "class": "Sandals", "color": "Red", "vector": v})
    for i, r in enumerate(rows):
        shutil.copyfile(photos[i % len(photos)], root / r["path"])
    return root, write_table(root.parent / f"{root.name}-tags.parquet", rows, catalog=root)


def _groups(table: pa.Table) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for r in table.to_pylist():
        out.setdefault(r["group"], []).append(r)
    return out


def test_dupes_groups_exact_near_and_chained_copies(catalog: tuple[Path, Path]) -> None:
    result = dupes(catalog[1], threshold=0.95)
    groups = _groups(result.groups)
    paths = {g: [r["path"] for r in rows] for g, rows in groups.items()}
    assert paths == {0: ["a.jpg", "a_copy.jpg"], 1: ["b.jpg", "b_near.jpg"],
                     2: ["c1.jpg", "c2.jpg", "c3.jpg", "c3_copy.jpg"]}  # fmt: skip
    assert [groups[g][0]["kind"] for g in range(3)] == ["exact", "near", "both"]
    assert [groups[g][0]["disagree"] for g in range(3)] == [False, True, False]  # b_near is White
    sims = [r["similarity"] for r in groups[2]]
    assert sims[0] == pytest.approx(1, abs=1e-3) and sims[1] == pytest.approx(COS_STEP, abs=2e-3)
    assert sims[2] < 0.95 and sims[2] == pytest.approx(np.cos(2 * np.arccos(COS_STEP)), abs=2e-3)  # by the chain
    assert groups[1][1]["color"] == "White" and groups[1][1]["class"] == "Watches"
    assert (result.rows, result.left_out) == (22, 2)
    line = result.line()
    assert "3 groups (1 exact, 1 near, 1 both), 8 photos in groups, 1 groups whose tags disagree" in line
    assert "22 rows, 2 left out" in line
    # A higher threshold breaks the chain and the near pair; byte-identical copies stay grouped.
    strict = _groups(dupes(catalog[1], threshold=0.999).groups)
    assert sorted(tuple(r["path"] for r in rows) for rows in strict.values()) == [
        ("a.jpg", "a_copy.jpg"), ("c3.jpg", "c3_copy.jpg")]  # fmt: skip


def test_ivf_index_agrees_with_exact_search() -> None:
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((100, DIM)).astype(np.float32)
    vectors = _unit(centers[rng.integers(0, 100, 4000)] + rng.standard_normal((4000, DIM)).astype(np.float32))
    vectors[1::40] = _unit(vectors[0::40] + 0.02 * rng.standard_normal((100, DIM)))  # near-copies, cosine ~0.99
    vectors = vectors.astype(np.float16)
    ivf, flat = VectorIndex(vectors, exact=False), VectorIndex(vectors, exact=True)
    assert not ivf.exact and flat.exact and len(ivf) == len(flat) == 4000
    _, got = ivf.search(vectors[:100], 10)
    _, want = flat.search(vectors[:100], 10)
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got.tolist(), want.tolist())])
    assert recall >= 0.9
    pairs = set(zip(*[a.tolist() for a in ivf.pairs(vectors, 0.95)[:2]]))
    assert pairs == set(zip(*[a.tolist() for a in flat.pairs(vectors, 0.95)[:2]]))
    assert {(i, i + 1) for i in range(0, 4000, 40)} <= pairs


def test_approximate_index_is_kept_beside_the_table_under_its_identity(
    catalog: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tagger.embeddings as emb

    monkeypatch.setattr(emb, "EXACT_LIMIT", 5)  # 20 rows: approximate, so kept
    table = tmp_path / "tags.parquet"
    shutil.copyfile(catalog[1], table)
    cache = Path(f"{table}{emb.INDEX_SUFFIX}")
    first = similar(table, ["b.jpg"], k=1)[0].neighbours[0]
    assert cache.is_file() and first.path == "b_near.jpg"
    header, stamp = cache.read_bytes().split(b"\n", 1)[0], cache.stat().st_mtime_ns
    assert dupes(table, threshold=0.95).n_groups == 3 and cache.stat().st_mtime_ns == stamp  # reused
    # Another table under the same name (b_near gone): a new index, never the stale one.
    kept = [r for r in pq.read_table(table).to_pylist() if r["path"] != "b_near.jpg"]
    pq.write_table(pa.Table.from_pylist(kept, schema=pq.read_schema(table)), table)
    assert similar(table, ["b.jpg"], k=1)[0].neighbours[0].path != "b_near.jpg"
    assert cache.read_bytes().split(b"\n", 1)[0] != header
    cache.write_bytes(cache.read_bytes()[:200])  # a torn index: built again
    assert similar(table, ["c1.jpg"], k=1)[0].neighbours[0].path == "c2.jpg"


def test_similar_to_a_path_of_the_table(catalog: tuple[Path, Path]) -> None:
    [res] = similar(catalog[1], ["c2.jpg"], k=3)
    assert res.source == "table"
    assert [n.path for n in res.neighbours][:1] in (["c1.jpg"], ["c3.jpg"], ["c3_copy.jpg"])
    assert {n.path for n in res.neighbours} == {"c1.jpg", "c3.jpg", "c3_copy.jpg"}  # not itself
    assert all(n.similarity == pytest.approx(COS_STEP, abs=2e-3) for n in res.neighbours)
    assert res.neighbours[0].tags == {"class": "Jeans", "color": "Blue"}
    sims = [n.similarity for n in similar(catalog[1], ["a.jpg"], k=10)[0].neighbours]
    assert len(sims) == 10 and sims == sorted(sims, reverse=True) and sims[0] == pytest.approx(1, abs=1e-3)


def test_cli_dupes_writes_groups_and_the_summary(catalog: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "groups.parquet"
    res = CliRunner().invoke(main, ["dupes", str(catalog[1]), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "3 groups (1 exact, 1 near, 1 both), 8 photos in groups, 1 groups whose tags disagree" in res.output
    groups = pq.read_table(out)
    assert groups.column_names == ["group", "kind", "disagree", "path", "sha256", "similarity", "class", "color"]
    assert groups.num_rows == 8 and groups.column("path").to_pylist()[:2] == ["a.jpg", "a_copy.jpg"]


def test_cli_similar_prints_and_gives_json(catalog: tuple[Path, Path]) -> None:
    res = CliRunner().invoke(main, ["similar", str(catalog[1]), "b.jpg", "-k", "2"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == "b.jpg (in the table):" and len(lines) == 3
    assert re.fullmatch(r"  0\.99\d\d  b_near\.jpg  class=Watches color=White", lines[1]), lines[1]
    res = CliRunner().invoke(main, ["similar", str(catalog[1]), "b.jpg", "a.jpg", "-k", "1", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert [d["query"] for d in data] == ["b.jpg", "a.jpg"]
    assert data[1]["neighbours"] == [
        {"path": "a_copy.jpg", "similarity": pytest.approx(1, abs=1e-3), "sha256": "A", "class": "Tshirts",
         "color": "Black"}]  # fmt: skip


def _one_error_line(res: Any, code: int, text: str) -> None:
    assert res.exit_code == code, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:") or ln.startswith("Error:")]
    assert len(errors) == 1 and text in errors[0], res.output
    assert "Traceback" not in res.output


def test_bad_input_is_one_line_with_its_exit_code(catalog: tuple[Path, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    plain = tmp_path / "plain.parquet"  # a table tagged without --embeddings
    pq.write_table(pq.read_table(catalog[1]).drop_columns([EMBEDDING_COLUMN]), plain)
    out = str(tmp_path / "g.parquet")
    for args in (["dupes", str(plain), "-o", out], ["similar", str(plain), "a.jpg"]):
        _one_error_line(runner.invoke(main, args), TaggerError.exit_code, "tagger run --embeddings")
    empty = write_table(tmp_path / "empty.parquet", [])
    _one_error_line(runner.invoke(main, ["dupes", str(empty), "-o", out]), TaggerError.exit_code, "has no rows")
    errors_only = write_table(tmp_path / "errors.parquet", [{"path": "x.jpg", "status": s.STATUS_ERROR}])
    _one_error_line(
        runner.invoke(main, ["similar", str(errors_only), "x.jpg"]), TaggerError.exit_code, "no rows with an embedding"
    )
    _one_error_line(
        runner.invoke(main, ["similar", str(catalog[1]), "nope.jpg"]),
        UsageError.exit_code,
        "query nope.jpg is neither a path in",
    )
    not_parquet = tmp_path / "x.parquet"
    not_parquet.write_text("hello")
    _one_error_line(runner.invoke(main, ["dupes", str(not_parquet), "-o", out]), 1, "not a readable Parquet file")
    _one_error_line(runner.invoke(main, ["dupes", str(catalog[1]), "-o", str(catalog[1])]), 1, "is the table itself")
    _one_error_line(runner.invoke(main, ["dupes", str(catalog[1]), "-o", out, "--threshold", "0"]), 2, "--threshold")
    _one_error_line(runner.invoke(main, ["similar", str(catalog[1]), "a.jpg", "-k", "0"]), 2, "-k")
    for name in ("g.csv", "g.parquet.gz"):
        _one_error_line(runner.invoke(main, ["dupes", str(catalog[1]), "-o", str(tmp_path / name)]), 2, "Parquet only")
        assert not (tmp_path / name).exists()
    assert not Path(out).exists()


def test_dupes_outputs_never_overwrite_an_input(catalog: tuple[Path, Path], tmp_path: Path) -> None:
    """Neither the groups file nor the report goes over the table, over each other, or over a catalog photo."""
    runner = CliRunner()
    table = tmp_path / "tags.parquet"
    shutil.copyfile(catalog[1], table)
    before = {p: p.read_bytes() for p in (table, catalog[0] / "a.jpg")}
    out = tmp_path / "g.parquet"
    for args, code, text in (
        (["-o", str(out), "--report", str(table)], 1, "is the table itself"),
        (["-o", str(out), "--report", str(out)], 2, "is the groups file"),
        (["-o", str(catalog[0] / "a.jpg")], 1, "is a file of the catalog"),
        (["-o", str(out), "--report", str(catalog[0] / "a.jpg")], 1, "is a file of the catalog"),
    ):
        _one_error_line(runner.invoke(main, ["dupes", str(table), *args]), code, text)
    assert {p: p.read_bytes() for p in before} == before and not out.exists()


def test_query_image_with_another_model_is_refused(
    catalog: tuple[Path, Path], contract_onnx: Path, tmp_path: Path
) -> None:
    image = catalog[0] / "a.jpg"  # a file: embedded on the fly, but the table was made by another model
    res = CliRunner().invoke(main, ["similar", str(catalog[1]), str(image), "--model", str(contract_onnx)])
    _one_error_line(res, TaggerError.exit_code, f"model {contract_onnx.name} is not the one")
    res = CliRunner().invoke(main, ["similar", str(catalog[1]), str(image)])
    _one_error_line(res, TaggerError.exit_code, "a model that is not shipped")


def test_query_image_is_embedded_with_the_tables_model(contract_onnx: Path, tmp_path: Path) -> None:
    from PIL import Image

    from tagger import RunConfig, run

    table = tmp_path / "tags.parquet"
    run(RunConfig(catalog=SAMPLES, out=table, model=contract_onnx, workers=0, progress=False, embeddings=True))
    photo = sorted((SAMPLES / "images").glob("*.jpg"))[3]
    query = tmp_path / "query.png"  # the same photo, half the size, another format
    with Image.open(photo) as im:
        im.resize((im.width // 2, im.height // 2)).save(query)
    [res] = similar(table, [query], k=3, model=contract_onnx)
    assert res.source == "image" and res.neighbours[0].path == f"images/{photo.name}"
    assert res.neighbours[0].similarity > 0.99 and res.neighbours[0].similarity > res.neighbours[1].similarity
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a photo")
    with pytest.raises(UsageError, match="query .*broken.jpg cannot be embedded"):
        similar(table, [broken], model=contract_onnx)
    # The table's own rows group as dupes do on any table: a real output of tagger run --embeddings.
    assert dupes(table).rows == len(list((SAMPLES / "images").glob("*.jpg")))


def _data_uris(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_is_self_contained_with_disagreeing_groups_first(catalog: tuple[Path, Path], tmp_path: Path) -> None:
    from PIL import Image

    page = write_dupes_report(dupes(catalog[1], threshold=0.95), tmp_path / "dupes.html").read_text("utf-8")
    srcs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert srcs and all(u.startswith("data:image/") for u in srcs)
    assert "<link" not in page and "<script" not in page and "url(" not in page
    thumbs = _data_uris(page)
    assert len(thumbs) == 8  # every photo of every group
    for thumb in thumbs:
        with Image.open(io.BytesIO(thumb)) as im:
            assert im.format == "JPEG" and max(im.size) <= 160
    order = [int(g) for g in re.findall(r"<h2>group (\d+)", page)]
    assert order == [1, 0, 2]  # group 1 (b.jpg, b_near.jpg) disagrees on colour
    assert "similarity 0.99" in page and "color: White" in page and "tags disagree" in page


def _chromium() -> str | None:
    names = ("chromium", "chromium-headless-shell", "chromium-browser", "google-chrome", "chrome")
    return next(filter(None, map(shutil.which, names)), None)


@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium on this machine")
def test_report_renders_in_headless_chromium(catalog: tuple[Path, Path], tmp_path: Path) -> None:
    page = write_dupes_report(dupes(catalog[1], threshold=0.95), tmp_path / "dupes.html")
    browser = _chromium()
    assert browser is not None
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("<img") == 8 and "group 1" in proc.stdout
    shot = tmp_path / "shot.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}", "--window-size=1200,900",
         page.as_uri()], capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    from PIL import Image

    with Image.open(shot) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 1000  # thumbnails drawn, not a blank page


def test_missing_faiss_says_how_to_install_it(catalog: tuple[Path, Path], tmp_path: Path) -> None:
    code = (
        "import sys\nsys.modules['faiss'] = None\nfrom tagger.cli import main\n"
        f"main(['dupes', {str(catalog[1])!r}, '-o', {str(tmp_path / 'g.parquet')!r}])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == TaggerError.exit_code
    assert proc.stderr.strip().splitlines() == ['error: dupes and similar need faiss: pip install "tagger[similar]"']


def test_load_table_keeps_rows_with_an_embedding(catalog: tuple[Path, Path]) -> None:
    et = load_table(catalog[1])
    assert len(et) == 20 and et.left_out == 2 and "broken.jpg" not in et.paths and "noemb.jpg" not in et.paths
    assert et.vectors.dtype == np.float16 and et.vectors.shape == (20, DIM)
    assert np.allclose(np.linalg.norm(et.vectors.astype(np.float32), axis=1), 1, atol=1e-3)
