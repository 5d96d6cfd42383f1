"""The local engine: one machine executes the run plan, decode in worker processes, inference in this one."""

from __future__ import annotations

import contextlib
import logging
import sys
import time

from tqdm import tqdm

from tagger import __version__
from tagger.engines.plan import ModelFacts, RunConfig, RunPlan, RunSummary
from tagger.nightly.assemble import Assembler, load_previous
from tagger.nightly.workdir import WorkDir
from tagger.output.schema import META_TOOL_VERSION, closing_metadata, output_schema
from tagger.output.writer import ResultWriter
from tagger.pipeline.compose import StageTimer, decoded_batches, tag_batches
from tagger.pipeline.decode import default_workers
from tagger.pipeline.session import default_batch_size, default_inflight, default_threads, open_session
from tagger.storage import redact

log = logging.getLogger(__name__)

LOG_EVERY_S = 30.0


def run(config: RunConfig) -> RunSummary:
    """Tag every image of config.catalog into config.out (Parquet); one row per file, errors included.

    The previous config.out is replaced only when the new output is complete; whatever fails (model, disk, a
    crash), it stays as it was. Freshly tagged rows are also committed to OUT.work/ as the run goes, so that
    config.resume (or config.incremental) after a crash tags only the rest.
    """
    plan = RunPlan(config)
    workers = default_workers() if config.workers is None else config.workers
    threads = config.threads if config.threads is not None else default_threads()
    session = open_session(config.model, config.device, threads)
    facts = ModelFacts.of(session)
    batch_size = config.batch_size or default_batch_size(session.provider)
    tasks, top_k = session.tasks, config.top_k
    identity = plan.identity(facts)
    log.info(
        "tagging %s%s with %s on %s: batch %d, %d decode workers, %d threads",
        redact(config.catalog), f" (shard {config.shard})" if config.shard else "", session.path.name,
        session.provider, batch_size, workers, threads,
    )  # fmt: skip
    timer = StageTimer()
    show_bar = config.progress if config.progress is not None else sys.stderr.isatty()
    with contextlib.ExitStack() as stack:
        previous = (
            load_previous(
                config.out, identity, tasks, config.keep_stale_model, config.checksum, config.allow_other_catalog
            )
            if config.incremental
            else None
        )
        if previous is not None:
            stack.callback(previous.close)
        work = stack.enter_context(
            WorkDir(
                config.out,
                {**identity.metadata(), META_TOOL_VERSION: __version__},
                tasks,
                top_k,
                resume=config.resume or config.incremental,
                commit_every=config.commit_every,
                commit_seconds=config.commit_seconds,
            )
        )
        writer = stack.enter_context(
            ResultWriter(config.out, output_schema(tasks, top_k), plan.metadata(facts), tmp_dir=work.path)
        )
        parts = (work.rows, work.index) if work.rows is not None and work.index is not None else None
        assembler = Assembler(
            writer, previous, parts, config.retry_errors, incremental=config.incremental, checksum=config.checksum,
            shard=config.shard,
        )
        batches = stack.enter_context(
            contextlib.closing(
                decoded_batches(
                    assembler.plan(plan.refs), session.spec, batch_size, workers, config.max_pixels,
                    config.decode_memory, config.io_threads,
                )  # fmt: skip
            )
        )
        bar = stack.enter_context(tqdm(unit="img", disable=not show_bar, dynamic_ncols=True, file=sys.stderr))
        last_log = time.perf_counter()
        inflight = config.inflight or default_inflight(session.provider)
        for batch, table in tag_batches(batches, session, top_k, timer, inflight):
            t0 = time.perf_counter()
            work.add(table)
            assembler.write_tagged(table)
            timer.add("write", time.perf_counter() - t0)
            bar.update(len(batch))
            if not show_bar and time.perf_counter() - last_log >= LOG_EVERY_S:
                last_log = time.perf_counter()
                log.info(
                    "%d files tagged, %d written (%d errors), %.1f img/s",
                    assembler.tagged, assembler.files, assembler.errors, assembler.tagged / (last_log - plan.t_start),
                )  # fmt: skip
        t0 = time.perf_counter()
        assembler.finish()
        if previous is not None:
            previous.close()  # before its file is replaced
        a, changes = assembler, assembler.changes
        plan.check_errors(a.files, a.errors)
        ok = a.files - a.errors
        writer.commit(
            closing_metadata(
                a.files, ok, a.tagged, a.reused, a.resumed, changes.as_dict() if changes else None, a.unlistable
            )
        )
        work.finish()
        timer.add("write", time.perf_counter() - t0)
    if previous is not None and previous.stale_model:
        log.warning("%d rows of %s come from another model (--keep-stale-model)", a.reused, redact(config.out))
    return plan.summary(
        session.provider, a.files, ok, timer.seconds, tagged=a.tagged, reused=a.reused, resumed=a.resumed,
        changes=changes, unlistable=a.unlistable,
    )  # fmt: skip


__all__ = ["run"]
