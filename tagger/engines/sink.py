"""The one output sink of every engine: tagged tables in discovery order -> assembler, work folder, file or parts.

It lives in engines/, not output/: it joins nightly's Assembler and WorkDir with output's writers, and nightly already
imports output, so output importing nightly would close a cycle between the parts.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from types import TracebackType
from typing import Iterable, Iterator, Mapping

import pyarrow as pa

from tagger._version import __version__
from tagger.engines.plan import ModelFacts, RunPlan, RunSummary
from tagger.nightly.assemble import Assembler, Previous, load_previous
from tagger.nightly.workdir import WorkDir
from tagger.output.schema import META_TOOL_VERSION, closing_metadata
from tagger.output.writer import OutputWriter, PartsWriter, ResultWriter, writes_folder
from tagger.pipeline.discover import ImageRef
from tagger.storage import redact

log = logging.getLogger(__name__)


class OutputSink:
    """Everything one run writes, whichever engine tags: the previous output read for reuse (--incremental), the
    work folder OUT.work/ (commits, lock, --resume) and the writer of one file or a folder of parts, joined by the
    Assembler, which puts reused, resumed and freshly tagged rows in discovery order.

    An engine enters it once it knows the model's facts, tags the refs that refs_to_tag() yields, hands each tagged
    table to write() in the order of those refs, and calls finish(). Leaving the block without finish() keeps the
    previous output as it was and the committed work parts for --resume.
    """

    def __init__(self, plan: RunPlan, facts: ModelFacts, rows_per_part: int | None = None) -> None:
        """rows_per_part: an output not named .parquet is a folder of parts of this many rows (writes_folder);
        None: the output is one file, whatever its name."""
        self.plan, self.facts, self.rows_per_part = plan, facts, rows_per_part
        self._stack = contextlib.ExitStack()
        self._previous: Previous | None = None

    def __enter__(self) -> OutputSink:
        config, facts = self.plan.config, self.facts
        identity = self.plan.identity(facts)
        with contextlib.ExitStack() as stack:
            if config.incremental:
                self._previous = load_previous(
                    config.out, identity, facts.tasks, config.keep_stale_model, config.checksum,
                    config.allow_other_catalog,
                )  # fmt: skip
                if self._previous is not None:
                    stack.callback(self._previous.close)
            self._work = stack.enter_context(
                WorkDir(
                    config.out, {**identity.metadata(), META_TOOL_VERSION: __version__}, facts.tasks, config.top_k,
                    resume=config.resume or config.incremental, embedding_dim=facts.embedding_dim,
                    commit_every=config.commit_every, commit_seconds=config.commit_seconds,
                )  # fmt: skip
            )
            metadata = self.plan.metadata(facts)
            writer: PartsWriter | ResultWriter = (
                PartsWriter(Path(config.out), self.schema, metadata, self.rows_per_part)  # a URI folder is refused
                if self.rows_per_part is not None and writes_folder(config.out)
                else ResultWriter(config.out, self.schema, metadata, tmp_dir=self._work.path)
            )
            stack.enter_context(writer)
            self._writer: OutputWriter = writer
            work = self._work
            parts = (work.rows, work.index) if work.rows is not None and work.index is not None else None
            self.assembler = Assembler(
                self._writer, self._previous, parts, config.retry_errors, incremental=config.incremental,
                checksum=config.checksum, shard=config.shard,
            )  # fmt: skip
            self._stack = stack.pop_all()
        return self

    @property
    def schema(self) -> pa.Schema:
        """The output's columns (without metadata): what every table handed to write() is."""
        return self._work.schema

    @property
    def tagged(self) -> int:
        return self.assembler.tagged

    @property
    def errors(self) -> int:
        return self.assembler.errors

    def refs_to_tag(self, refs: Iterable[ImageRef]) -> Iterator[ImageRef]:
        """The refs whose rows are neither reused nor resumed, in order; every decision is queued as it is made."""
        return self.assembler.plan(refs)

    def write(self, table: pa.Table) -> None:
        """Freshly tagged rows of the next refs_to_tag() refs: committed to the work folder, written in order."""
        self._work.add(table)
        self.assembler.write_tagged(table)

    def finish(self) -> None:
        """Write the rows after the last tagged one, check --max-errors, publish the output, drop the work folder."""
        a = self.assembler
        a.finish()
        if self._previous is not None:
            self._previous.close()  # before its file is replaced
        self.plan.check_errors(a.files, a.errors)
        changes = a.changes.as_dict() if a.changes else None
        self._writer.commit(
            closing_metadata(a.files, a.files - a.errors, a.tagged, a.reused, a.resumed, changes, a.unlistable)
        )
        self._work.finish()

    def summary(self, stage_seconds: Mapping[str, float] | None = None) -> RunSummary:
        a = self.assembler
        if self._previous is not None and self._previous.stale_model:
            log.warning("%d rows of %s come from another model (--keep-stale-model)", a.reused, redact(self.plan.config.out))
        return self.plan.summary(
            self.facts.provider, a.files, a.files - a.errors, stage_seconds, tagged=a.tagged, reused=a.reused,
            resumed=a.resumed, changes=a.changes, unlistable=a.unlistable,
        )  # fmt: skip

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        return self._stack.__exit__(exc_type, exc, tb)


__all__ = ["OutputSink"]
