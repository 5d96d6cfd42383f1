"""The local engine: one machine executes the run plan, decode in worker processes, inference in this one."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Any, Iterable, Iterator, Mapping

from tqdm import tqdm

from tagger.compose import StageTimer, decoded_batches, tag_batches
from tagger.engines.plan import ModelFacts, RunConfig, RunPlan, RunSummary
from tagger.engines.sink import OutputSink
from tagger.errors import UsageError
from tagger.pipeline.decode import default_workers
from tagger.pipeline.discover import ImageRef
from tagger.pipeline.session import default_batch_size, default_inflight, default_threads, open_session
from tagger.storage import CLEANUP_SECONDS, abort_fast, redact

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 5.0  # off a terminal: a plain progress line on stderr this often


class _Counted:
    """The refs to tag, passed through and counted: the progress total once the listing has ended."""

    def __init__(self, refs: Iterable[ImageRef]) -> None:
        self._refs = refs
        self.n = 0
        self.total: int | None = None

    def __iter__(self) -> Iterator[ImageRef]:
        for ref in self._refs:
            self.n += 1
            yield ref
        self.total = self.n


def _progress_line(done: int, listing: _Counted, errors: int, seconds: float) -> str:
    """'1200 of 5000 files tagged, 3 errors, 24.1 img/s, 2:32 left' (no total and time left while still listing)."""
    rate = done / seconds if seconds > 0 else 0.0
    if listing.total is None:
        return f"{done} files tagged, {errors} errors, {rate:.1f} img/s; listing: {listing.n} found so far"
    left = tqdm.format_interval((listing.total - done) / rate) if rate > 0 else "?"
    return f"{done} of {listing.total} files tagged, {errors} errors, {rate:.1f} img/s, {left} left"


def run(config: RunConfig) -> RunSummary:
    """Tag every image of config.catalog into config.out (one Parquet file); one row per file, errors included.

    The previous config.out is replaced only when the new output is complete; whatever fails (model, disk, a
    crash), it stays as it was. Freshly tagged rows are also committed to OUT.work/ as the run goes, so that
    config.resume (or config.incremental) after a crash tags only the rest.
    """
    plan = RunPlan(config)
    workers = default_workers() if config.workers is None else config.workers
    threads = config.threads if config.threads is not None else default_threads()
    session = open_session(config.model, config.device, threads, config.embeddings)
    facts = ModelFacts.of(session)
    batch_size = config.batch_size or default_batch_size(session.provider)
    log.info(
        "tagging %s%s with %s on %s: batch %d, %d decode workers, %d threads",
        redact(config.catalog), f" (shard {config.shard})" if config.shard else "", session.path.name,
        session.provider, batch_size, workers, threads,
    )  # fmt: skip
    timer = StageTimer()
    # progress None: a bar on a terminal, else a plain line every PROGRESS_EVERY_S; True: the bar; False: neither.
    show_bar = config.progress if config.progress is not None else sys.stderr.isatty()
    show_lines = config.progress is None and not show_bar
    with abort_fast(CLEANUP_SECONDS) as on_abort, contextlib.ExitStack() as stack:
        sink = stack.enter_context(OutputSink(plan, facts))
        to_tag = _Counted(sink.refs_to_tag(plan.refs))
        batches = stack.enter_context(
            contextlib.closing(
                decoded_batches(
                    to_tag, session.spec, batch_size, workers, config.max_pixels, config.decode_memory,
                    config.io_threads,
                )  # fmt: skip
            )
        )
        stack.push(on_abort)  # SIGTERM or a store outage: what is cleaned up above waits for the store seconds only
        # The bar's total (and so its ETA) is the number of files to tag, known once the listing has ended.
        bar = stack.enter_context(tqdm(unit="img", disable=not show_bar, dynamic_ncols=True, file=sys.stderr))
        t_tag = last_line = time.perf_counter()
        inflight = config.inflight or default_inflight(session.provider)
        for batch, table in tag_batches(batches, session, config.top_k, timer, inflight):
            t0 = time.perf_counter()
            sink.write(table)
            timer.add("write", time.perf_counter() - t0)
            if bar.total is None and to_tag.total is not None:
                bar.total = to_tag.total
            bar.update(len(batch))
            # No line after the last batch: the summary follows.
            if show_lines and time.perf_counter() - last_line >= PROGRESS_EVERY_S and sink.tagged != to_tag.total:
                last_line = time.perf_counter()
                line = _progress_line(sink.tagged, to_tag, sink.errors, last_line - t_tag)
                print(line, file=sys.stderr, flush=True)
        if bar.total is None and to_tag.total:  # the listing ended after the last batch came through
            bar.total = to_tag.total
            bar.refresh()
        t0 = time.perf_counter()
        sink.finish()
        timer.add("write", time.perf_counter() - t0)
    return sink.summary(timer.seconds)


def execute(config: RunConfig, options: Mapping[str, Any]) -> RunSummary:
    """The ENGINES entry point: run(config); the other engines' options must be unset."""
    if any(v is not None for v in options.values()):
        raise UsageError("--ray-address, --actors and --num-gpus-per-actor need --engine ray")
    return run(config)


__all__ = ["execute", "run"]
