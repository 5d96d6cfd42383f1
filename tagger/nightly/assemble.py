"""Incremental runs: per file, reuse an earlier row or tag it again; write every row in discovery order."""

from __future__ import annotations

import bisect
import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tagger.contract import TaskSpec
from tagger.errors import TaggerError
from tagger.nightly.shard import Shard
from tagger.output.reader import RowIndex, RowReader, read_output_info
from tagger.output.schema import META_RESUMED, META_REUSED, META_TAGGED, ROW_GROUP_SIZE, RunIdentity, count_ok
from tagger.output.writer import OutputWriter
from tagger.pipeline.discover import ImageRef
from tagger.storage import Location, exists, file_sha256, redact

log = logging.getLogger(__name__)

READ_ROWS = ROW_GROUP_SIZE  # reused rows are copied in slices of at most this many, so memory stays bounded

_TAG, _PREVIOUS, _PARTS = 0, 1, 2  # where a row comes from


@dataclass
class Changes:
    """What an incremental run found, file by file: each file is exactly one of new, changed, unchanged, retried,
    retagged, unreadable.

    changed: another size or mtime, or (--checksum) the same ones but other bytes than the previous row's sha256.
    unchanged files keep their row; retagged: unchanged, but tagged again because another model or other options
    wrote the previous output. removed: rows of the previous output whose file is gone. failed: error rows among
    the files tagged this time (a folder that could not be listed included). unreadable: rows of the previous
    output beneath a folder that could not be listed this time; they are kept as they were.
    """

    new: int = 0
    changed: int = 0
    unchanged: int = 0
    retagged: int = 0
    removed: int = 0
    retried: int = 0
    failed: int = 0
    unreadable: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))

    def line(self) -> str:
        """Every count; unreadable only when there are any (a folder failed to list)."""
        return ", ".join(f"{k} {v}" for k, v in self.as_dict().items() if v or k != "unreadable")


@dataclass
class Previous:
    """The output an incremental run replaces, opened for reading."""

    reader: RowReader
    index: RowIndex
    reuse: bool  # False: another model or other options wrote it; it only tells what changed
    stale_model: bool  # rows of another model are reused (--keep-stale-model)

    def close(self) -> None:
        self.reader.close()


def load_previous(
    out: Location,
    identity: RunIdentity,
    tasks: Sequence[TaskSpec],
    keep_stale_model: bool = False,
    checksums: bool = False,
    other_catalog: bool = False,
) -> Previous | None:
    """Open the output of the previous run for reuse, or None when there is none; checksums: index its sha256 too.

    An output that is not a tagger output of this format is refused (TaggerError) and left untouched, as is one of
    another catalog unless other_catalog (a catalog moved: rows of the same path, size and mtime are reused). One
    written by another model is only used to count changes (everything is tagged again), unless keep_stale_model.
    """
    shown = redact(out)
    if not exists(out):
        log.info("no previous output %s: tagging everything", shown)
        return None
    try:
        info = read_output_info(out)
    except TaggerError as e:
        raise TaggerError(
            f"--incremental: {e}; left untouched (move it away, or run once without --incremental)"
        ) from None
    old = info.identity
    if old.catalog != identity.catalog and not other_catalog:
        raise TaggerError(
            f"--incremental: {shown} is the output of another catalog ({old.catalog}, not {identity.catalog}); "
            "left untouched (--allow-other-catalog reuses its rows of files with the same path, size and mtime)"
        )
    reuse, stale = True, False
    if not old.same_options(identity):
        log.warning(
            "%s was written with top_k %d, max_pixels %d and embedding dim %d, this run uses %d, %d and %d: tagging "
            "everything again", shown, old.top_k, old.max_pixels, old.embedding_dim, identity.top_k,
            identity.max_pixels, identity.embedding_dim,
        )  # fmt: skip
        reuse = False
    elif not old.same_values(identity):  # another model
        if identity.embedding_dim and keep_stale_model:
            # Embeddings of two models live in different spaces: mixed in one column, their cosines mean nothing.
            raise TaggerError(
                f"--keep-stale-model: {shown} was tagged by another model; its embeddings cannot be mixed with this "
                "model's (run without --keep-stale-model, or without --embeddings)"
            )
        if not keep_stale_model:
            log.warning(
                "%s was tagged by another model (sha256 %.12s, this one is %.12s): tagging everything again "
                "(--keep-stale-model would keep its rows)", shown, old.model_sha256, identity.model_sha256,
            )  # fmt: skip
            reuse = False
        elif tuple(info.tasks) != tuple(tasks):
            raise TaggerError(
                f"--keep-stale-model: {shown} has other tasks or labels than the model; its rows cannot be mixed in"
            )
        else:
            log.warning(
                "%s was tagged by another model (sha256 %.12s, this one is %.12s); --keep-stale-model: keeping its "
                "rows of unchanged files", shown, old.model_sha256, identity.model_sha256,
            )  # fmt: skip
            stale = True
    if reuse and old.catalog != identity.catalog:
        log.info("%s was written from %s; reusing rows of files with the same path, size and mtime", shown, old.catalog)
    reader = RowReader([out], info.tasks, old.top_k, old.embedding_dim)
    try:
        index = RowIndex(reader, checksums)
    except BaseException:
        reader.close()
        raise
    log.info("previous output %s: %d rows", shown, index.num_rows)
    return Previous(reader, index, reuse, stale)


class Assembler:
    """Writes one output from three sources, in discovery order: the previous output, the committed parts of an
    interrupted run, and freshly tagged rows.

    plan() runs in the decode thread: it decides per file, queues the decision, and yields the files to tag.
    write_tagged() and finish() run in the main thread: they replay the queue, writing reused rows (in runs of
    consecutive rows, read a row group at a time) between the tagged ones. Every decision is queued before its
    file can reach inference, so the queue always holds what precedes a tagged batch.
    """

    def __init__(
        self,
        writer: OutputWriter,
        previous: Previous | None = None,
        parts: tuple[RowReader, RowIndex] | None = None,
        retry_errors: bool = False,
        incremental: bool = False,
        checksum: bool = False,
        shard: Shard | None = None,
    ) -> None:
        self._writer = writer
        self._shard = shard  # the run's shard: a folder it does not own only keeps this shard's rows beneath it
        self._previous = previous
        self._parts = parts
        self._retry = retry_errors
        self._checksum = checksum  # read and hash files whose size and mtime match (previous built with checksums)
        self.changes = Changes() if incremental else None
        self._matched = np.zeros(previous.index.num_rows if previous else 0, bool)  # [rows of the previous output]
        self._queue: deque[tuple[int, int, int]] = deque()  # (source, first row, count); tags count 1 each
        self._planned = threading.Event()
        self.files = self.errors = self.tagged = self.reused = self.resumed = 0
        self.unlistable = 0  # folders that could not be listed
        self._resumed_errors = 0
        self._sorted_paths: tuple[list[str], np.ndarray] | None = None  # previous paths sorted, [n] their rows

    def _decide(self, ref: ImageRef) -> tuple[int, int]:
        prev, ch = self._previous, self.changes
        if ch is not None:
            row = prev.index.find(ref.path) if prev is not None else None
            if prev is None or row is None:
                ch.new += 1
            else:
                self._matched[row] = True
                if not prev.index.same_file(row, ref.size, ref.mtime):
                    ch.changed += 1
                elif (self._retry and not prev.index.ok[row]) or prev.index.transient[row]:
                    ch.retried += 1  # a transient error (timeout, 5xx) is the store's, not the file's: always again
                elif prev.reuse and self._checksum and not self._same_bytes(ref, prev.index.sha256(row)):
                    ch.changed += 1
                elif prev.reuse:
                    ch.unchanged += 1
                    return _PREVIOUS, row
                else:
                    ch.retagged += 1
        if self._parts is not None:
            index = self._parts[1]
            row = index.find(ref.path)
            if row is not None and index.same_file(row, ref.size, ref.mtime) and not index.transient[row]:
                self._resumed_errors += not index.ok[row]
                return _PARTS, row
        return _TAG, 0

    @staticmethod
    def _same_bytes(ref: ImageRef, sha256: str | None) -> bool:
        """Whether the file still has the bytes its row recorded; an unreadable file is tagged again (an error row)."""
        try:
            return sha256 is not None and file_sha256(ref.abspath) == sha256
        except OSError as e:
            log.debug("cannot hash %s: %s", redact(ref.abspath), e)
            return False

    def plan(self, refs: Iterable[ImageRef]) -> Iterator[ImageRef]:
        """Yield the refs that need tagging; queue every decision, reuse runs merged into one entry."""
        run_source, run_start, run_count = _TAG, 0, 0
        for ref in refs:
            if ref.unlistable is not None:
                # Its error row (by the shard that owns its path only, so a merge has it once), then the previous
                # rows beneath it as they were (they sort right after 'sub/').
                if run_count:
                    self._queue.append((run_source, run_start, run_count))
                    run_count = 0
                owned = self._shard is None or self._shard.holds(ref.path)
                if owned:
                    self.unlistable += 1
                    self._queue.append((_TAG, 0, 1))
                self._queue.extend((_PREVIOUS, start, count) for start, count in self._keep_beneath(ref.path))
                if owned:
                    yield ref
                continue
            source, row = self._decide(ref)
            if source != _TAG and source == run_source and row == run_start + run_count:
                run_count += 1
                continue
            if run_count:
                self._queue.append((run_source, run_start, run_count))
                run_count = 0
            if source == _TAG:
                self._queue.append((_TAG, 0, 1))
                yield ref
            else:
                run_source, run_start, run_count = source, row, 1
        if run_count:
            self._queue.append((run_source, run_start, run_count))
        self._planned.set()

    def _keep_beneath(self, folder: str) -> Iterator[tuple[int, int]]:
        """(first row, count): runs of the previous output's rows under `folder` ('sub/'), in path order; they are
        marked kept and counted unreadable. Its own earlier error row ('sub/') is replaced, not kept."""
        prev, ch = self._previous, self.changes
        if prev is None or ch is None:
            return
        if self._sorted_paths is None:  # built once, at the first folder that could not be listed
            paths = prev.reader.keys().column("path")
            order = pc.sort_indices(paths)  # stable: a path listed twice keeps its rows' order
            self._sorted_paths = (paths.take(order).to_pylist(), order.to_numpy())
        paths, order = self._sorted_paths
        lo = bisect.bisect_left(paths, folder)
        hi = bisect.bisect_left(paths, folder[:-1] + "0", lo)  # '0' follows '/': the end of paths under folder
        self._matched[order[lo:hi]] = True
        if lo < hi and paths[lo] == folder:
            lo += 1
        rows = order[lo:hi]
        ch.unreadable += len(rows)
        if not prev.reuse:
            if len(rows):
                log.warning("%d rows under %s come from another model or options: not kept", len(rows), folder)
            return
        start = 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i] != rows[i - 1] + 1:
                yield int(rows[start]), i - start
                start = i

    def write_tagged(self, table: pa.Table) -> None:
        """Write the rows of one tagged batch, after the reused rows that precede each of them."""
        r, n = 0, table.num_rows
        while r < n:
            source, start, count = self._queue.popleft()
            if source != _TAG:
                self._copy(source, start, count)
                continue
            k = 1
            while k < n - r and self._queue[0][0] == _TAG:
                self._queue.popleft()
                k += 1
            self._write(table.slice(r, k), META_TAGGED)
            r += k
        self.tagged += n
        if self.changes is not None:
            self.changes.failed += table.num_rows - count_ok(table)

    def finish(self) -> None:
        """Write the reused rows after the last tagged one; count removed files."""
        if not self._planned.is_set():
            raise RuntimeError("finish() before every file was planned")
        while self._queue:
            source, start, count = self._queue.popleft()
            if source == _TAG:
                raise RuntimeError("a file planned for tagging never came back from inference")
            self._copy(source, start, count)
        if self.changes is not None:
            self.changes.failed += self._resumed_errors
            if self._previous is not None:
                self.changes.removed = int(np.count_nonzero(~self._matched[self._previous.index.first]))

    def _copy(self, source: int, start: int, count: int) -> None:
        reader = self._previous.reader if source == _PREVIOUS else self._parts[0]  # type: ignore[union-attr,index]
        origin = META_REUSED if source == _PREVIOUS else META_RESUMED
        for s in range(start, start + count, READ_ROWS):
            self._write(reader.read(s, min(READ_ROWS, start + count - s)), origin)
        if source == _PREVIOUS:
            self.reused += count
        else:
            self.resumed += count

    def _write(self, table: pa.Table, origin: str) -> None:
        self._writer.write(table, origin)
        self.files += table.num_rows
        self.errors += table.num_rows - count_ok(table)


__all__ = ["Assembler", "Changes", "Previous", "load_previous"]
