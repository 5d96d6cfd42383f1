"""Guards before a run starts: an output never overwrites an input, a model's identity covers its external data, and
task names that would collide with output columns are refused by every loader."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import onnx
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import CONTRACT_TASKS, make_contract_onnx, quadrant_image

from tagger import RunConfig, run
from tagger.cli import main
from tagger.contract import RESERVED_COLUMNS, TaskSpec, check_task_names
from tagger.engines.plan import check_out_is_no_input
from tagger.errors import TaggerError
from tagger.model.external import external_data_files, model_sha256
from tagger.model.info import read_model_metadata
from tagger.model.registry import resolve_model
from tagger.nightly.shard import Shard, merge_shards
from tagger.output.schema import META_MODEL_SHA256, output_schema
from tagger.storage import sha256_file


def _catalog(root: Path, n: int = 3) -> Path:
    for i in range(n):
        (root / "sub").mkdir(parents=True, exist_ok=True)
        quadrant_image(40 + 8 * i, 32).save(root / "sub" / f"p{i}.jpg", quality=90)
    return root


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (links as their target's bytes) by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli(*args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, list(args))
    assert "Traceback" not in result.output and not isinstance(result.exception, (KeyError, AssertionError))
    return result.exit_code, [ln for ln in result.output.splitlines() if ln.startswith("error:")]


# --- an output never overwrites an input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, message",
    [
        ("photo", "that the run tags"),
        ("photo-through-link", "that the run tags"),
        ("new-photo-name", "that the run tags"),
        ("model", "is the model itself"),
        ("model-through-link", "is the model itself"),
        ("files-from", "is the --files-from list itself"),
        ("listed", "is listed in"),
    ],
)
def test_an_output_that_is_an_input_is_refused_and_nothing_is_touched(
    case: str, message: str, contract_onnx: Path, tmp_path: Path
) -> None:
    root = _catalog(tmp_path / "cat")
    model = tmp_path / "m.onnx"
    model.write_bytes(contract_onnx.read_bytes())
    listing = tmp_path / "list.txt"
    listing.write_text("sub/p0.jpg\nsub/p1.jpg\n../other.parquet\n")
    (tmp_path / "other.parquet").write_bytes(b"not yet an output")
    extra: list[str] = []
    out = {
        "photo": root / "sub/p1.jpg",
        "photo-through-link": tmp_path / "link.jpg",
        "new-photo-name": root / "sub/new.JPG",  # the next walk would tag it
        "model": model,
        "model-through-link": tmp_path / "model-link.onnx",
        "files-from": listing,
        "listed": tmp_path / "other.parquet",
    }[case]
    (tmp_path / "link.jpg").symlink_to(root / "sub/p1.jpg")
    (tmp_path / "model-link.onnx").symlink_to(model)
    if case in ("files-from", "listed"):
        extra = ["--files-from", str(listing)]
    before = _snapshot(tmp_path)
    code, errors = _cli("run", str(root), "--out", str(out), "--model", str(model), "--workers", "0", *extra)
    assert code == TaggerError.exit_code and len(errors) == 1 and message in errors[0], errors
    assert _snapshot(tmp_path) == before  # byte-identical, and no temp file or OUT.work/ left


def _entries(folder: Path) -> list[str]:
    """Every name under `folder`, folders included (an OUT.work/ left behind shows here)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize(
    "case, workers",
    [("real-name", "0"), ("real-name", "2"), ("through-link", "0"), ("new-through-link", "0"), ("listed-run", "0")],
)
def test_an_output_reached_through_a_folder_linked_into_the_catalog_is_refused(
    case: str, workers: str, contract_onnx: Path, tmp_path: Path
) -> None:
    root, ext = tmp_path / "c7", tmp_path / "ext7"
    _catalog(root, n=4)
    _catalog(ext, n=2)
    quadrant_image(48, 40).save(ext / "a.jpg", quality=90)
    (root / "linked").symlink_to(ext)
    listing = tmp_path / "list.txt"
    listing.write_text("sub/p0.jpg\n")
    out = {
        "real-name": ext / "a.jpg",  # the walk tags it as linked/a.jpg
        "through-link": root / "linked/a.jpg",
        "new-through-link": root / "linked/NEW.JPG",  # the next walk would tag it
        "listed-run": root / "linked/a.jpg",  # not listed, but a photo of the catalog's walk
    }[case]
    extra = ["--files-from", str(listing)] if case == "listed-run" else []
    before, names = _snapshot(tmp_path), _entries(tmp_path)
    code, errors = _cli("run", str(root), "--out", str(out), "--model", str(contract_onnx), "--workers", workers, *extra)
    assert code == TaggerError.exit_code and len(errors) == 1 and "is a file of the catalog" in errors[0], errors
    if case == "real-name":
        assert "linked/a.jpg" in errors[0]
    assert _snapshot(tmp_path) == before and _entries(tmp_path) == names  # byte-identical, no OUT.work/ left


def test_outputs_inside_the_catalog_that_are_not_inputs_are_fine(contract_onnx: Path, tmp_path: Path) -> None:
    root = _catalog(tmp_path / "cat")
    for out in (root / "tags.parquet", root / ".hidden" / "tags.jpg"):
        out.parent.mkdir(exist_ok=True)
        for _ in range(2):  # the second run walks the catalog with the first output in it
            summary = run(RunConfig(root, out, model=contract_onnx, device="cpu", workers=0))
            assert summary.files == 3 and summary.errors == 0
        assert pq.read_table(out).column("path").to_pylist() == ["sub/p0.jpg", "sub/p1.jpg", "sub/p2.jpg"]
    listing = tmp_path / "list.txt"
    listing.write_text("sub/p0.jpg\n")
    summary = run(RunConfig(root, root / "sub/tags.parquet", model=contract_onnx, files_from=listing, workers=0))
    assert summary.files == 1


def test_a_listed_run_refuses_an_out_that_is_a_catalog_photo_not_in_the_list(
    contract_onnx: Path, tmp_path: Path
) -> None:
    root = _catalog(tmp_path / "cat")
    listing = tmp_path / "list.txt"
    listing.write_text("sub/p0.jpg\n")
    before, names = _snapshot(tmp_path), _entries(tmp_path)
    for out in (root / "sub/p1.jpg", root / "sub/new.png"):  # a photo of the catalog's walk, and a name it would tag
        code, errors = _cli(
            "run", str(root), "--out", str(out), "--model", str(contract_onnx), "--workers", "0",
            "--files-from", str(listing),
        )  # fmt: skip
        assert code == TaggerError.exit_code and len(errors) == 1 and "that the run tags" in errors[0], errors
    assert _snapshot(tmp_path) == before and _entries(tmp_path) == names


def test_the_shipped_default_model_is_no_output() -> None:
    try:
        shipped = resolve_model(None)
    except TaggerError:
        pytest.skip("the shipped default model is not installed here")
    with pytest.raises(TaggerError, match="is the model itself"):
        check_out_is_no_input(RunConfig(Path("."), shipped))  # checks only: nothing is written
    with pytest.raises(TaggerError, match="is the model itself"):
        check_out_is_no_input(RunConfig(Path("."), shipped, model=Path("default")))


def test_merge_refuses_an_out_that_is_one_of_its_inputs(contract_onnx: Path, tmp_path: Path) -> None:
    root = _catalog(tmp_path / "cat", n=6)
    shards = [tmp_path / f"s{i}.parquet" for i in range(2)]
    for i, s in enumerate(shards):
        run(RunConfig(root, s, model=contract_onnx, workers=0, shard=Shard(i, 2)))
    (tmp_path / "link.parquet").symlink_to(shards[1])
    before = _snapshot(tmp_path)
    for out in (shards[0], tmp_path / "link.parquet"):
        with pytest.raises(TaggerError, match="is one of the shards to merge"):
            merge_shards(out, shards)
        code, errors = _cli("merge", str(out), *map(str, shards))
        assert code == TaggerError.exit_code and len(errors) == 1 and "one of the shards" in errors[0]
    assert _snapshot(tmp_path) == before


def test_merge_refuses_an_out_that_the_shards_catalog_walk_lists(contract_onnx: Path, tmp_path: Path) -> None:
    root = _catalog(tmp_path / "cat", n=6)
    shards = [tmp_path / f"s{i}.parquet" for i in range(2)]
    for i, s in enumerate(shards):
        run(RunConfig(root, s, model=contract_onnx, workers=0, shard=Shard(i, 2)))
    before, names = _snapshot(tmp_path), _entries(tmp_path)
    for out in (root / "sub/p3.jpg", root / "sub/new.jpeg"):  # a photo, a name the next walk would tag
        code, errors = _cli("merge", str(out), *map(str, shards))
        assert code == TaggerError.exit_code and len(errors) == 1 and "is a file of the catalog" in errors[0], errors
    assert _snapshot(tmp_path) == before and _entries(tmp_path) == names
    merged = root / "sub/merged.parquet"  # inside the catalog, but no photo: fine
    assert merge_shards(merged, shards).files == 6


# --- the model's identity covers its external data ----------------------------------------------------------------


def _with_external_data(model: Path, out: Path, one_file: bool = True) -> Path:
    """`model` saved with its weight matrices (not the small shape constants ORT needs inline) in external files."""
    proto = onnx.load(str(model))
    onnx.save_model(
        proto, str(out), save_as_external_data=True, all_tensors_to_one_file=one_file,
        location="weights.bin" if one_file else None, size_threshold=100,
    )  # fmt: skip
    return out


def test_the_wire_format_field_numbers_are_onnx_s() -> None:
    fields = {
        onnx.ModelProto: {"graph": 7, "functions": 25},
        onnx.GraphProto: {"node": 1, "initializer": 5, "sparse_initializer": 15},
        onnx.FunctionProto: {"node": 7},
        onnx.NodeProto: {"attribute": 5},
        onnx.AttributeProto: {"t": 5, "g": 6, "tensors": 10, "graphs": 11, "sparse_tensor": 22, "sparse_tensors": 23},
        onnx.SparseTensorProto: {"values": 1, "indices": 2},
        onnx.TensorProto: {"external_data": 13, "data_location": 14},
        onnx.StringStringEntryProto: {"key": 1, "value": 2},
    }
    for message, numbers in fields.items():
        assert {f: message.DESCRIPTOR.fields_by_name[f].number for f in numbers} == numbers
    assert onnx.TensorProto.EXTERNAL == 1


def test_external_data_files_are_found_and_hashed(contract_onnx: Path, tmp_path: Path) -> None:
    assert external_data_files(contract_onnx) == ()
    assert model_sha256(contract_onnx) == sha256_file(contract_onnx)  # single-file identities stay as they were
    one = _with_external_data(contract_onnx, tmp_path / "one.onnx")
    assert external_data_files(one) == ("weights.bin",)
    (tmp_path / "many").mkdir()
    many = _with_external_data(contract_onnx, tmp_path / "many" / "many.onnx", one_file=False)
    assert external_data_files(many) == ("w_class", "w_color")
    before = read_model_metadata(many).sha256
    data = tmp_path / "many" / "w_color"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 1  # a low mantissa bit of one weight: same size, still a valid model
    data.write_bytes(bytes(raw))
    assert read_model_metadata(many).sha256 != before
    data.unlink()
    with pytest.raises(TaggerError, match="w_color"):
        model_sha256(many)


def test_editing_external_data_tags_everything_again_incrementally(contract_onnx: Path, tmp_path: Path) -> None:
    root = _catalog(tmp_path / "cat")
    (tmp_path / "model").mkdir()
    model = _with_external_data(contract_onnx, tmp_path / "model" / "m.onnx")
    out = tmp_path / "tags.parquet"
    first = run(RunConfig(root, out, model=model, workers=0))
    sha = pq.read_metadata(out).metadata[META_MODEL_SHA256.encode()]
    assert run(RunConfig(root, out, model=model, workers=0, incremental=True)).reused == 3
    weights = tmp_path / "model" / "weights.bin"
    size = weights.stat().st_size
    raw = bytearray(weights.read_bytes())
    raw[size - 2] ^= 1  # inside the last weight matrix, same size
    weights.write_bytes(bytes(raw))
    again = run(RunConfig(root, out, model=model, workers=0, incremental=True))
    assert (first.files, again.tagged, again.reused) == (3, 3, 0)
    assert weights.stat().st_size == size and pq.read_metadata(out).metadata[META_MODEL_SHA256.encode()] != sha


# --- task names that would collide with output columns -----------------------------------------------------------


def test_reserved_columns_are_every_column_that_is_not_a_task_s() -> None:
    fixed = set(output_schema([TaskSpec("t", ("x",))], top_k=1).names) - {"t", "t_score", "t_topk"}
    assert fixed <= RESERVED_COLUMNS and "sha256" in RESERVED_COLUMNS
    check_task_names(["class", "color", "class_top", "scores"])
    for bad in (["status"], ["a", "a_score"], ["a_topk", "a"], ["x", ""], ["sha256"]):
        with pytest.raises(ValueError):
            check_task_names(bad)


@pytest.mark.parametrize(
    "tasks, message",
    [
        ({"status": CONTRACT_TASKS["class"], "color": CONTRACT_TASKS["color"]}, "task 'status' has the name"),
        ({"mtime": CONTRACT_TASKS["class"], "color": CONTRACT_TASKS["color"]}, "task 'mtime' has the name"),
        ({"class": CONTRACT_TASKS["class"], "class_score": CONTRACT_TASKS["color"]}, "output column 'class_score'"),
    ],
)
def test_a_model_whose_task_collides_with_an_output_column_is_refused(
    tasks: Mapping[str, Sequence[str]], message: str, tmp_path: Path
) -> None:
    root = _catalog(tmp_path / "cat")
    model = make_contract_onnx(tmp_path / "m.onnx", tasks=tasks)  # otherwise a valid model: graph matches metadata
    code, errors = _cli("info", str(model))
    assert code == TaggerError.exit_code and len(errors) == 1 and message in errors[0], errors
    out = tmp_path / "out" / "tags.parquet"
    out.parent.mkdir()
    code, errors = _cli("run", str(root), "--out", str(out), "--model", str(model), "--workers", "0")
    assert code == TaggerError.exit_code and len(errors) == 1 and message in errors[0], errors
    assert os.listdir(out.parent) == []  # no output, no OUT.work/


def test_the_guard_refuses_exactly_what_the_walk_lists(tmp_path: Path) -> None:
    """One visible-image predicate: every name the walk lists is refused as an output, every other name is not."""
    from tagger.guards import walk_would_list
    from tagger.pipeline.discover import DEFAULT_EXTENSIONS, discover

    root = tmp_path / "cat"
    names = ["a.jpg", "b.PNG", ".hidden.jpg", ".dot/c.jpg", "notes.txt", "sub/d.webp", "sub/.e.jpg", "sub/noext"]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    walked = {r.path for r in discover(root)}
    assert walked == {"a.jpg", "b.PNG", "sub/d.webp"}
    for name in [*names, "new.jpeg", "sub/new.txt", ".new/x.jpg"]:
        assert walk_would_list(root, root / name, DEFAULT_EXTENSIONS) == (name in walked or name == "new.jpeg"), name
    assert not walk_would_list(root, "s3://bucket/cat/a.jpg", DEFAULT_EXTENSIONS)  # another store: never its walk
    assert walk_would_list("s3://k:s@bucket/cat", "s3://bucket/cat/sub/a.jpg?region=x", DEFAULT_EXTENSIONS)
    assert not walk_would_list("s3://bucket/cat", "s3://bucket/cat/.h/a.jpg", DEFAULT_EXTENSIONS)
