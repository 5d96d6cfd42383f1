"""write: schema, rows of a batch, row groups, atomic replace, file metadata."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tagger.contract import TaskSpec
from tagger.errors import TaggerError
from tagger.pipeline.batch import Batch
from tagger.pipeline.decode import Failure, Sample
from tagger.pipeline.discover import MISSING_SIZE, ImageRef
from tagger.pipeline.postprocess import postprocess
from tagger.output.schema import output_schema
from tagger.output.writer import ResultWriter
from tagger.output.rows import rows_to_table

TASKS = (TaskSpec("class", ("a", "b", "c")), TaskSpec("color", ("red", "blue")))


def _batch(n_ok: int = 2) -> tuple[Batch, dict[str, np.ndarray]]:
    refs = (
        ImageRef("x/1.jpg", "/c/x/1.jpg", 100, 1.5),
        ImageRef("x/2.jpg", "/c/x/2.jpg", MISSING_SIZE, float("nan")),
        ImageRef("y/3.png", "/c/y/3.png", 300, 3.25),
    )
    img = np.zeros((4, 4, 3), np.uint8)
    results = (Sample(0, img, 40, 30), Failure(1, "FileNotFoundError: No such file or directory"), Sample(2, img, 5, 6))
    probs = {"class": np.array([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2]], np.float32), "color": np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)}
    return Batch(refs, results, np.stack([img, img])), probs


def test_rows_of_a_batch_with_an_error_in_the_middle() -> None:
    batch, probs = _batch()
    table = rows_to_table(batch, postprocess(probs, TASKS, 2), TASKS, top_k=2)
    assert table.schema == output_schema(TASKS, 2)
    assert pa.types.is_dictionary(table.schema.field("class").type)
    rows = table.to_pylist()
    assert [r["path"] for r in rows] == ["x/1.jpg", "x/2.jpg", "y/3.png"]
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
    assert [r["class"] for r in rows] == ["c", None, "a"]
    assert [r["color"] for r in rows] == ["red", None, "blue"]
    assert rows[0]["class_score"] == pytest.approx(0.7) and rows[1]["class_score"] is None
    assert rows[0]["class_topk"] == [{"label": "c", "score": pytest.approx(0.7)}, {"label": "b", "score": pytest.approx(0.2)}]
    assert rows[1]["class_topk"] is None and len(rows[2]["color_topk"]) == 2
    assert rows[1]["error"] == "FileNotFoundError: No such file or directory" and rows[0]["error"] is None
    assert [(r["width"], r["height"]) for r in rows] == [(40, 30), (None, None), (5, 6)]
    assert [r["bytes"] for r in rows] == [100, None, 300]
    assert [r["mtime"] for r in rows] == [1.5, None, 3.25]


def test_writer_writes_row_groups_and_final_metadata(tmp_path: Path) -> None:
    batch, probs = _batch()
    table = rows_to_table(batch, postprocess(probs, TASKS), TASKS)
    out = tmp_path / "tags.parquet"
    with ResultWriter(out, output_schema(TASKS), {"tagger.run.started": "t0"}, row_group_size=5) as writer:
        for _ in range(4):
            writer.write(table)
        assert not out.exists()  # nothing at the destination until commit
        writer.commit({"tagger.run.files": "12"})
    meta = pq.read_metadata(out)
    assert meta.num_rows == 12 and meta.num_row_groups == 2
    assert meta.metadata[b"tagger.run.started"] == b"t0" and meta.metadata[b"tagger.run.files"] == b"12"
    back = pq.read_table(out)
    assert back.column("path").to_pylist() == ["x/1.jpg", "x/2.jpg", "y/3.png"] * 4
    assert pa.types.is_dictionary(back.schema.field("color").type)
    assert [p.name for p in tmp_path.iterdir()] == ["tags.parquet"]  # no temp file left
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_run_leaves_the_previous_output_untouched(tmp_path: Path) -> None:
    out = tmp_path / "tags.parquet"
    out.write_bytes(b"previous results")
    batch, probs = _batch()
    with pytest.raises(RuntimeError):
        with ResultWriter(out, output_schema(TASKS)) as writer:
            writer.write(rows_to_table(batch, postprocess(probs, TASKS), TASKS))
            raise RuntimeError("crash mid-run")
    assert out.read_bytes() == b"previous results"
    assert [p.name for p in tmp_path.iterdir()] == ["tags.parquet"]


def test_unwritable_outputs_are_tagger_errors(tmp_path: Path) -> None:
    with pytest.raises(TaggerError, match="cannot write"):
        ResultWriter(tmp_path / "no-such-dir" / "tags.parquet", output_schema(TASKS))
    with pytest.raises(TaggerError, match="folder"):
        ResultWriter(tmp_path, output_schema(TASKS))
