"""Crash-safe resume: OUT.work/ beside the output keeps the rows tagged so far, committed in checksummed parts.

OUT.work/ is a folder, or a key prefix in the bucket of an output in an object store.
"""

from __future__ import annotations

import json
import logging
import re
import time
from types import TracebackType
from typing import Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from tagger.contract import TaskSpec
from tagger.errors import TaggerError, one_line
from tagger.output.reader import RowIndex, RowReader
from tagger.output.schema import output_schema
from tagger.storage import (
    CLEANUP_SECONDS,
    Location,
    Lock,
    aborting,
    as_location,
    hurry,
    join,
    list_entries,
    list_names,
    make_folder,
    name_of,
    publish_bytes,
    read_file,
    redact,
    remove,
    remove_tree,
    sha256_hex,
    with_suffix_name,
)

log = logging.getLogger(__name__)

WORK_SUFFIX = ".work"
DEFAULT_COMMIT_EVERY = 10_000  # images; a part of 10k rows is ~1.5 MB and a few ms to write
DEFAULT_COMMIT_SECONDS = 60.0
IDENTITY_FILE = "identity.json"
# Written first into a work folder tagger makes: a folder without it (or a link) is not tagger's, and is never used.
MARKER_FILE = "tagger-work.json"
# part-<sequence>-<first 16 hex digits of the file's sha256>.parquet: the name carries the checksum, so a part and
# its checksum appear together in one atomic rename and no manifest can disagree with the parts.
_PART = re.compile(r"part-(\d{6})-([0-9a-f]{16})\.parquet")


def work_dir_of(out: Location) -> Location:
    return with_suffix_name(out, WORK_SUFFIX)


def _sequence_of(part: Location) -> int:
    m = _PART.fullmatch(name_of(part))
    return int(m[1]) if m else 0


class WorkDir:
    """The sidecar folder of one output: a lock, the identity of the run it belongs to, committed parts.

    Parts hold freshly tagged rows (reused rows are still in the previous output, which nothing touches before the
    new one is complete). Each part is written to a temp file, fsynced and renamed; its name carries its checksum,
    so a torn or corrupt part is detected, dropped and its rows tagged again. The output's temp file lives here too,
    so a killed run leaves nothing beside the output but this folder. finish() removes the folder. In a bucket each
    part is one PUT of the whole object under its checksum name (written once, never overwritten), and the output's
    temp file lives in the local temp folder instead.

    Two runs on one output are kept apart by a storage.Lock on this folder: a flock locally, a best-effort lock
    object in a bucket (see Lock: not atomic, pyarrow.fs has no conditional put).

    identity: what the rows depend on (model sha256, catalog, options, tool version); parts of another identity are
    discarded, as are all parts when `resume` is false.
    """

    def __init__(
        self,
        out: Location,
        identity: Mapping[str, str],
        tasks: Sequence[TaskSpec],
        top_k: int,
        resume: bool,
        commit_every: int = DEFAULT_COMMIT_EVERY,
        commit_seconds: float = DEFAULT_COMMIT_SECONDS,
        embedding_dim: int = 0,
    ) -> None:
        self.out = as_location(out)
        self.path = work_dir_of(self.out)
        self.identity = dict(identity)
        self.schema = output_schema(tasks, top_k, embedding_dim)
        self.commit_every = commit_every  # 0: no commits by count
        self.commit_seconds = commit_seconds  # 0: no commits by time
        self.committed = 0  # rows committed by this run
        self.rows: RowReader | None = None  # the valid parts found on start (resume)
        self.index: RowIndex | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._last_commit = time.monotonic()
        self._finished = False
        self._claim()
        self._lock = Lock(self.path, redact(self.out))
        try:
            self._clear_temp_files()
            parts = self._usable_parts(resume)
            self._write_identity()
            if parts:
                self.rows = RowReader(parts, tasks, top_k, embedding_dim)
                self.index = RowIndex(self.rows)
                log.info("resuming: %d rows already tagged in %s", self.rows.num_rows, redact(self.path))
            self._sequence = 1 + max((_sequence_of(p) for p in parts), default=0)
        except BaseException:
            self._unlock()
            raise

    def _claim(self) -> None:
        """Make the work folder, or check that the one there is tagger's (a real folder holding MARKER_FILE, or an
        empty one); TaggerError otherwise, before anything in it is touched: a link is never followed, a folder of
        other files never cleared."""
        shown = redact(self.path)
        entries = list_entries(self.path)
        if entries is None:
            raise TaggerError(
                f"{shown} is not a folder tagger made (a link or a file); move it away: it was left untouched"
            )
        if entries and MARKER_FILE not in entries:
            raise TaggerError(
                f"{shown} holds files tagger did not put there (no {MARKER_FILE}); move it away or choose another "
                "--out: it was left untouched"
            )
        if MARKER_FILE in entries:
            return
        try:
            make_folder(self.path)
        except OSError as e:
            raise TaggerError(f"cannot write output {redact(self.out)}: {one_line(e)}") from None
        try:
            publish_bytes(join(self.path, MARKER_FILE), json.dumps({"output": name_of(self.out)}).encode())
        except TaggerError:
            remove_tree(self.path)  # empty or absent before: nothing of anyone's is lost
            raise

    def _unlock(self) -> None:
        self._lock.release()

    def _clear_temp_files(self) -> None:
        # Left by a killed run: a half-written part or output. Nobody else writes here: we hold the lock.
        for name in list_names(self.path):
            if name.startswith(".") and name.endswith(".tmp"):
                log.debug("removing leftover temp file %s", name)
                remove(join(self.path, name))

    def _parts(self) -> list[Location]:
        return [join(self.path, n) for n in list_names(self.path) if n.startswith("part-") and n.endswith(".parquet")]

    def _read_identity(self) -> dict[str, str] | None:
        try:
            data = json.loads(read_file(join(self.path, IDENTITY_FILE)).decode("utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _usable_parts(self, resume: bool) -> list[Location]:
        parts = self._parts()
        if not parts:
            return []
        old = self._read_identity()
        if old != self.identity:
            theirs = old or {}
            differs = sorted(k for k in self.identity.keys() | theirs.keys() if theirs.get(k) != self.identity.get(k))
            log.warning(
                "discarding %d parts in %s: they belong to another run (%s)", len(parts), redact(self.path),
                f"{', '.join(differs)} differ" if old is not None else "no readable identity",
            )  # fmt: skip
            self._remove(parts)
            return []
        if not resume:
            log.info(
                "discarding %d parts of an interrupted run in %s (--resume reuses them)", len(parts), redact(self.path)
            )
            self._remove(parts)
            return []
        return [p for p in parts if self._check_part(p)]

    def _check_part(self, part: Location) -> bool:
        m = _PART.fullmatch(name_of(part))
        reason = None
        if m is None:
            reason = "unexpected name"
        else:
            try:
                data = read_file(part)
                if sha256_hex(data)[:16] != m[2]:
                    reason = "checksum mismatch: torn or corrupt"
                elif not pq.read_schema(pa.BufferReader(data)).equals(self.schema, check_metadata=False):
                    reason = "unexpected columns"
            except (OSError, pa.ArrowException) as e:
                reason = one_line(e)
        if reason is None:
            return True
        log.warning("work part %s is unusable (%s); its rows will be tagged again", redact(part), reason)
        self._remove([part])
        return False

    def _remove(self, paths: Sequence[Location]) -> None:
        for p in paths:
            remove(p)

    def _write_identity(self) -> None:
        publish_bytes(join(self.path, IDENTITY_FILE), json.dumps(self.identity, indent=1, sort_keys=True).encode())

    def add(self, table: pa.Table) -> None:
        """Buffer freshly tagged rows; commit them when commit_every rows or commit_seconds have gone by."""
        if not (self.commit_every or self.commit_seconds):
            return
        self._pending.append(table)
        self._pending_rows += table.num_rows
        due_rows = self.commit_every and self._pending_rows >= self.commit_every
        due_time = self.commit_seconds and time.monotonic() - self._last_commit >= self.commit_seconds
        if due_rows or due_time:
            self.commit()
        elif self._lock.refresh_due():
            self._lock.refresh()

    def commit(self) -> None:
        """Write the buffered rows as one part: temp file, fsync, rename to a name carrying its checksum."""
        self._last_commit = time.monotonic()
        if not self._pending:
            return
        table = pa.concat_tables(self._pending)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        name = f"part-{self._sequence:06d}-{sha256_hex(data)[:16]}.parquet"
        publish_bytes(join(self.path, name), data)
        self._lock.refresh()
        self._sequence += 1
        self.committed += table.num_rows
        self._pending, self._pending_rows = [], 0
        log.debug("committed %d rows to %s", table.num_rows, name)

    def _close_rows(self) -> None:
        if self.rows is not None:
            self.rows.close()

    def finish(self) -> None:
        """The output is in place: the work folder has served its purpose."""
        self._finished = True
        self._close_rows()
        remove_tree(self.path)  # before unlocking: no other run can be using the folder yet
        self._unlock()

    def abandon(self) -> None:
        """The run failed: commit what is buffered, so a resumed run need not tag it again; keep the folder only
        when it holds parts."""
        self._close_rows()
        try:  # called while another error propagates: never replace it
            try:
                self.commit()
            except TaggerError as e:
                log.warning("%s", e)
            if self._parts():
                log.warning("%s keeps the rows tagged so far; rerun with --resume to continue", redact(self.path))
            else:
                remove_tree(self.path)
        except TaggerError as e:
            log.warning("%s", e)
        finally:
            self._unlock()

    def __enter__(self) -> WorkDir:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._finished:
            return
        if aborting(exc_type):  # SIGTERM, Ctrl-C or a store that stopped answering: clean up within seconds
            with hurry(CLEANUP_SECONDS):
                self.abandon()
        else:
            self.abandon()


__all__ = ["DEFAULT_COMMIT_EVERY", "DEFAULT_COMMIT_SECONDS", "MARKER_FILE", "WORK_SUFFIX", "WorkDir", "work_dir_of"]
