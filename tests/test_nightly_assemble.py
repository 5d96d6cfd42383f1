"""The incremental assembler on its own: which files it sends to tagging, which rows it reuses, in which order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tagger.contract import FORMAT_VERSION, META_FORMAT, META_TASKS, TaskSpec, tasks_to_json
from tagger.nightly.assemble import Assembler, load_previous
from tagger.output.reader import RowIndex, RowReader
from tagger.output.schema import STATUS_ERROR, STATUS_OK, RunIdentity, output_schema
from tagger.output.writer import ResultWriter
from tagger.pipeline.discover import MISSING_SIZE, ImageRef

TASKS = (TaskSpec("class", ("Tshirts", "Watches")),)
IDENTITY = RunIdentity("a" * 64, "/catalog", 0, 1000, ("jpg",), None)


def _ref(path: str, size: int = 10, mtime: float = 1.0) -> ImageRef:
    return ImageRef(path, f"/catalog/{path}", size, mtime)


def _table(refs: Sequence[ImageRef], label: int, errors: Sequence[str] = ()) -> pa.Table:
    """Output rows for refs, every ok row labelled `label`; paths in `errors` are error rows."""
    bad = [r.path in errors for r in refs]
    labels = pa.array(TASKS[0].labels, pa.string())
    return pa.Table.from_pydict(
        {
            "path": [r.path for r in refs],
            "class": pa.DictionaryArray.from_arrays(pa.array([label] * len(refs), pa.int32(), mask=pa.array(bad)), labels),
            "class_score": pa.array([0.5] * len(refs), pa.float32(), mask=pa.array(bad)),
            "status": [STATUS_ERROR if b else STATUS_OK for b in bad],
            "error": ["OSError: broken" if b else None for b in bad],
            "width": pa.array([None if b else 4 for b in bad], pa.int32()),
            "height": pa.array([None if b else 3 for b in bad], pa.int32()),
            "bytes": pa.array([None if r.size == MISSING_SIZE else r.size for r in refs], pa.int64()),
            "mtime": pa.array([r.mtime for r in refs], pa.float64()),
            "sha256": pa.array([None if r.size == MISSING_SIZE else f"{i:064x}" for i, r in enumerate(refs)], pa.string()),
        },
        schema=output_schema(TASKS),
    )


def _metadata(identity: RunIdentity) -> dict[str, str]:
    return {META_FORMAT: json.dumps(FORMAT_VERSION), META_TASKS: tasks_to_json(TASKS), **identity.metadata()}


def _write(out: Path, table: pa.Table, identity: RunIdentity = IDENTITY) -> None:
    with ResultWriter(out, output_schema(TASKS), _metadata(identity)) as writer:
        writer.write(table)
        writer.commit()


def _assemble(
    out: Path, refs: Sequence[ImageRef], previous_out: Path | None, identity: RunIdentity = IDENTITY, **kw: bool
) -> tuple[list[str], Assembler, pa.Table]:
    """Run the assembler over refs, tagging what it asks for with label 1; return what it asked, it, the output."""
    previous = load_previous(previous_out, identity, TASKS) if previous_out is not None else None
    try:
        with ResultWriter(out, output_schema(TASKS), _metadata(identity)) as writer:
            assembler = Assembler(writer, previous, None, incremental=previous_out is not None, **kw)
            to_tag = list(assembler.plan(refs))
            for i in range(0, len(to_tag), 2):  # batches of two, as inference hands them back
                assembler.write_tagged(_table(to_tag[i : i + 2], label=1))
            assembler.finish()
            writer.commit()
    finally:
        if previous is not None:
            previous.close()
    return [r.path for r in to_tag], assembler, pq.read_table(out)


def test_only_new_and_changed_files_are_tagged_and_rows_keep_discovery_order(tmp_path: Path) -> None:
    old = [_ref("a.jpg"), _ref("b.jpg"), _ref("c.jpg"), _ref("d.jpg"), _ref("gone.jpg")]
    _write(tmp_path / "old.parquet", _table(old, label=0))
    now = [_ref("a.jpg"), _ref("b.jpg", size=11), _ref("b2.jpg"), _ref("c.jpg"), _ref("d.jpg", mtime=2.0)]
    tagged, assembler, out = _assemble(tmp_path / "new.parquet", now, tmp_path / "old.parquet")
    assert tagged == ["b.jpg", "b2.jpg", "d.jpg"]
    assert out.column("path").to_pylist() == [r.path for r in now]
    # Reused rows keep the old label 0, tagged ones carry the new label 1.
    assert out.column("class").to_pylist() == ["Tshirts", "Watches", "Watches", "Tshirts", "Watches"]
    ch = assembler.changes
    assert ch is not None
    assert (ch.new, ch.changed, ch.unchanged, ch.retagged, ch.removed, ch.retried) == (1, 2, 2, 0, 1, 0)
    assert (assembler.files, assembler.tagged, assembler.reused, assembler.errors) == (5, 3, 2, 0)


def test_error_rows_are_kept_unless_retried(tmp_path: Path) -> None:
    refs = [_ref("a.jpg"), _ref("bad.jpg"), _ref("c.jpg")]
    _write(tmp_path / "old.parquet", _table(refs, label=0, errors=["bad.jpg"]))
    tagged, assembler, out = _assemble(tmp_path / "kept.parquet", refs, tmp_path / "old.parquet")
    assert tagged == [] and out.column("status").to_pylist() == [STATUS_OK, STATUS_ERROR, STATUS_OK]
    assert assembler.errors == 1

    tagged, assembler, out = _assemble(tmp_path / "retried.parquet", refs, tmp_path / "old.parquet", retry_errors=True)
    assert tagged == ["bad.jpg"] and out.column("status").to_pylist() == [STATUS_OK] * 3
    assert assembler.changes is not None and (assembler.changes.retried, assembler.changes.unchanged) == (1, 2)


def test_another_model_retags_unchanged_files_and_counts_them_as_retagged(tmp_path: Path) -> None:
    refs = [_ref("a.jpg"), _ref("b.jpg")]
    _write(tmp_path / "old.parquet", _table(refs, label=0))
    other = RunIdentity("b" * 64, "/catalog", 0, 1000, ("jpg",), None)
    tagged, assembler, _ = _assemble(tmp_path / "new.parquet", refs, tmp_path / "old.parquet", identity=other)
    assert tagged == ["a.jpg", "b.jpg"] and assembler.reused == 0
    assert assembler.changes is not None and (assembler.changes.unchanged, assembler.changes.retagged) == (0, 2)


def test_a_missing_file_never_matches_its_old_row(tmp_path: Path) -> None:
    _write(tmp_path / "old.parquet", _table([_ref("a.jpg", size=MISSING_SIZE)], label=0, errors=["a.jpg"]))
    tagged, assembler, _ = _assemble(tmp_path / "new.parquet", [_ref("a.jpg", size=MISSING_SIZE)], tmp_path / "old.parquet")
    assert tagged == ["a.jpg"] and assembler.changes is not None and assembler.changes.changed == 1


def test_committed_parts_are_resumed_before_anything_is_tagged(tmp_path: Path) -> None:
    refs = [_ref("a.jpg"), _ref("b.jpg"), _ref("c.jpg")]
    _write(tmp_path / "part.parquet", _table(refs[:2], label=0))
    with RowReader([tmp_path / "part.parquet"], TASKS, 0) as reader:
        parts = (reader, RowIndex(reader))
        with ResultWriter(tmp_path / "out.parquet", output_schema(TASKS), _metadata(IDENTITY)) as writer:
            assembler = Assembler(writer, None, parts)
            to_tag = list(assembler.plan(refs))
            assembler.write_tagged(_table(to_tag, label=1))
            assembler.finish()
            writer.commit()
    assert [r.path for r in to_tag] == ["c.jpg"] and (assembler.resumed, assembler.tagged) == (2, 1)
    assert pq.read_table(tmp_path / "out.parquet").column("class").to_pylist() == ["Tshirts", "Tshirts", "Watches"]


def test_finish_refuses_a_planned_file_that_never_came_back(tmp_path: Path) -> None:
    with ResultWriter(tmp_path / "out.parquet", output_schema(TASKS), _metadata(IDENTITY)) as writer:
        assembler = Assembler(writer)
        list(assembler.plan([_ref("a.jpg")]))
        with pytest.raises(RuntimeError, match="never came back"):
            assembler.finish()
