"""Decode worker processes: a shared-memory arena, crash isolation, a start-up probe, and exit with the parent."""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import multiprocessing
import os
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from tagger.contract import PreprocessSpec
from tagger.errors import TaggerError, one_line
from tagger.pipeline.budget import DecodeMemory
from tagger.pipeline.chunk import DecodedBatch, Meta, decode_into, decode_many, pack, unpack
from tagger.pipeline.discover import ImageRef
from tagger.pipeline.fetch import reads_ahead
from tagger.pipeline.image import DecodeResult, Failure, Source

log = logging.getLogger(__name__)


class DecoderCrashed(Exception):
    """A file whose decoding killed the process decoding it (a decoder crash, or the OOM killer), twice."""


def default_workers() -> int:
    return os.cpu_count() or 1


class Arena:
    """A file-backed shared-memory block of `slots` chunk-sized pixel buffers that pool workers decode into.

    Pickling a chunk's pixels back through the pool's pipe cost the parent 65-80 us of CPU per thumbnail (64 KiB
    pipe reads and their context switches) against 30-45 us through the arena, where only a few bytes of metadata
    cross the pipe; on 2 cores that doubled the decode rate of 60x80 JPEGs. Lives in /dev/shm (RAM) where there is one.
    """

    def __init__(self, slots: int, chunk_size: int, size: int) -> None:
        self.shape = (chunk_size, size, size, 3)
        self._count = chunk_size * size * size * 3
        # Slot offsets must be multiples of the mmap granularity for the workers' partial maps.
        self.slot_bytes = -(-self._count // mmap.ALLOCATIONGRANULARITY) * mmap.ALLOCATIONGRANULARITY
        self.path, self._map = _shared_file(slots * self.slot_bytes)
        self.free = deque(range(slots))

    def view(self, slot: int) -> np.ndarray:
        """uint8 [chunk_size, S, S, 3] over one slot."""
        return np.frombuffer(self._map, np.uint8, self._count, slot * self.slot_bytes).reshape(self.shape)

    def close(self) -> None:
        try:
            self._map.close()
        except BufferError:
            log.debug("decode arena still has views; left to the garbage collector")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _shared_file(nbytes: int) -> tuple[str, mmap.mmap]:
    """A file of nbytes mapped into memory: in /dev/shm when it has room, else in the temp folder (page cache)."""
    dirs = [d for d in ("/dev/shm",) if os.path.isdir(d) and os.access(d, os.W_OK)] + [tempfile.gettempdir()]
    for d in dirs:
        fd, path = tempfile.mkstemp(prefix="tagger-decode-", dir=d)
        try:
            # Reserve the space now: a full tmpfs would otherwise kill a worker with SIGBUS at its first write.
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, nbytes)
            else:
                os.ftruncate(fd, nbytes)
            return path, mmap.mmap(fd, nbytes)
        except OSError as e:
            os.unlink(path)
            log.debug("no room for %d bytes of decode buffers in %s: %s", nbytes, d, e)
        finally:
            os.close(fd)
    raise TaggerError(f"no room for {nbytes >> 20} MiB of decode buffers in {' or '.join(dirs)}")


# A pool worker's budget and its pool's start-up flag, set once by _worker_init: a Condition crosses into a
# process only as it is spawned, so the initializer's arguments cannot come with each chunk.
_worker_memory: DecodeMemory | None = None
_worker_begun: Any = None


def _decode_into(
    arena: str, offset: int, shape: tuple[int, int, int, int], srcs: Sequence[Source], spec: PreprocessSpec,
    max_pixels: int, start: int, io_threads: int,
) -> tuple[list[Meta], float]:
    """Worker side of a chunk: decode srcs straight into one arena slot; return only the metadata."""
    t0 = time.perf_counter()
    if _worker_begun is not None:
        _worker_begun.value = 1  # this pool started: a worker dying from now on may be a file's fault
    n = shape[0] * shape[1] * shape[2] * shape[3]
    with open(arena, "r+b") as f, mmap.mmap(f.fileno(), n, offset=offset) as m:
        buf = np.frombuffer(m, np.uint8, n).reshape(shape)
        meta = decode_into(buf, srcs, spec, max_pixels, start, io_threads, _worker_memory)
        del buf  # the map cannot close while a view of it exists
    return meta, time.perf_counter() - t0


@dataclass(eq=False)
class _Job:
    """A chunk in flight: its arena slot (held until the consumer has it) and how often a dying worker lost it."""

    chunk: tuple[ImageRef, ...]
    start: int  # index of its first file
    slot: int
    future: Future[Any] | None = None  # None: not (re)submitted yet
    lost: int = 0  # pools that broke while it was in flight
    isolate: bool = False  # lost twice: decode it in processes of its own to find the file that kills them


def _sources(chunk: Sequence[ImageRef]) -> list[Source]:
    """What workers decode: a name crosses the pipe more cheaply than a ref; an unlistable folder's ref carries its
    error, an object's ref its size (read ahead, see fetch.FetchWindow)."""
    return [r if r.unlistable is not None or reads_ahead(r) else r.abspath for r in chunk]


_LIVE_POOLS: weakref.WeakSet[DecoderPool] = weakref.WeakSet()


def stop_decoders() -> None:
    """Kill the workers of every decode pool of this process: for a run told to stop (SIGTERM), whose pools may be
    waiting on store reads that never answer."""
    for pool in list(_LIVE_POOLS):
        pool.stop()


class DecoderPool:
    """decode_stream's pool of workers, its arena, and the chunks in flight, in input order.

    A worker that dies (OOM killer, decoder crash) breaks the whole pool and every chunk in flight with it: the pool
    is replaced (with a fresh memory budget, as the dead worker's share is lost) and those chunks sent again, each
    to the same slot (the old workers are all gone by then). A chunk lost twice is split in processes of its own
    (halves, down to single files) when its turn comes; the file that still kills its process gets a
    DecoderCrashed row, every other file its real one.
    """

    def __init__(
        self, workers: int, arena: Arena, spec: PreprocessSpec, max_pixels: int, decode_memory: int, io_threads: int
    ) -> None:
        self.arena, self.spec, self.max_pixels, self.decode_memory = arena, spec, max_pixels, decode_memory
        self.io_threads = io_threads
        self.workers = workers
        self.pending: deque[_Job] = deque()
        # spawn: safe next to the inference threads of this process, and the same on every OS. An executor rather
        # than multiprocessing.Pool: a worker killed mid-task raises BrokenProcessPool instead of hanging the run.
        self._ctx = multiprocessing.get_context("spawn")
        self._pool = self._new_pool()
        self._stopping = False
        _LIVE_POOLS.add(self)

    def stop(self) -> None:
        """Kill the workers and never restart them: the chunk being waited for ends (BrokenProcessPool), and
        _restart raises, instead of a wait on store reads that may never answer."""
        self._stopping = True
        # Python < 3.14 has no public terminate_workers(); what the workers decode now is abandoned anyway.
        for proc in list((self._pool._processes or {}).values()):
            proc.kill()

    def _new_pool(self) -> ProcessPoolExecutor:
        memory = DecodeMemory(self.decode_memory)
        self._begun = self._ctx.RawValue("b", 0)  # set by the first chunk any worker of this pool begins
        return ProcessPoolExecutor(self.workers, self._ctx, initializer=_worker_init, initargs=(memory, self._begun))

    def submit(self, chunk: tuple[ImageRef, ...], start: int) -> None:
        job = _Job(chunk, start, self.arena.free.popleft())
        self.pending.append(job)
        self._send(job)

    def _send(self, job: _Job) -> None:
        args = (
            self.arena.path, job.slot * self.arena.slot_bytes, (len(job.chunk), *self.arena.shape[1:]),
            _sources(job.chunk), self.spec, self.max_pixels, job.start, self.io_threads,
        )  # fmt: skip
        try:
            job.future = self._pool.submit(_decode_into, *args)
        except BrokenProcessPool:
            job.future = None  # sent again once the pool is replaced

    def next_result(self) -> tuple[tuple[ImageRef, ...], DecodedBatch]:
        """The oldest chunk's (refs, batch); its slot is refilled only after the consumer asks for the next one."""
        job = self.pending[0]
        while True:
            if job.isolate:
                meta, seconds = self._isolated(job)
                break
            if job.future is not None:
                try:
                    meta, seconds = job.future.result()
                    break
                except BrokenProcessPool:
                    pass
            self._restart()
        self.pending.popleft()
        self.arena.free.append(job.slot)
        return job.chunk, unpack(self.arena.view(job.slot), meta, seconds)

    def _restart(self) -> None:
        """Replace a broken pool; send its lost chunks again, or mark those lost twice for isolation.

        TaggerError when no worker of the broken pool began a chunk: the pool cannot start (a main module spawn
        cannot import again, a missing library, no memory for a process), which no file is to blame for.
        """
        self._pool.shutdown(wait=True, cancel_futures=True)  # a broken pool has terminated and joined its workers
        if self._stopping:
            raise TaggerError("decoding stopped: the run is stopping")
        if not self._begun.value:
            raise _cannot_start("its workers died")
        self._pool = self._new_pool()
        resent = isolated = 0
        for job in self.pending:
            f = job.future
            if job.isolate or (f is not None and f.done() and not f.cancelled() and f.exception() is None):
                continue  # decoded before the break, or waiting for its turn to be isolated
            if f is not None and not f.cancelled():
                job.lost += 1
            job.isolate = job.lost >= 2
            if job.isolate:
                isolated += 1
            else:
                self._send(job)
                resent += 1
        log.warning(
            "a decode worker died (out of memory, or a decoder crash): %d chunks sent again to a fresh pool, "
            "%d lost twice to be split in processes of their own", resent, isolated,
        )  # fmt: skip

    def _isolated(self, job: _Job) -> tuple[list[Meta], float]:
        """Decode job's chunk in processes of its own, halving what kills them down to the file; pack its slot.

        The pool is idle meanwhile (the chunks after this one are waited for first), so each process gets the
        whole memory budget and the run stays within it.
        """
        t0 = time.perf_counter()
        for other in itertools.islice(self.pending, 1, None):
            if other.future is not None:
                with contextlib.suppress(BrokenProcessPool):
                    other.future.exception()
        paths = _sources(job.chunk)
        results: list[DecodeResult] = []
        todo = [(0, len(paths))]  # pieces of the chunk still to decode, the next one last
        while todo:
            i, j = todo.pop()
            done = self._alone(paths[i:j], job.start + i)
            if isinstance(done, DecodedBatch):
                results += done.results
            elif j - i == 1:
                log.warning("%s kills the decoder (%s): error row", job.chunk[i].path, done)
                error = DecoderCrashed(f"decoding this file killed its process twice ({done})")
                results.append(Failure(job.start + i, one_line(error, named=True)))
            else:
                m = (i + j) // 2
                todo += [(m, j), (i, m)]
        meta = pack(self.arena.view(job.slot), results)
        return meta, time.perf_counter() - t0

    def _alone(self, paths: list[Source], start: int) -> DecodedBatch | str:
        """paths decoded in a process of its own, or how that process ended when it died ('SIGSEGV', 'exit code 3')."""
        receive, send = self._ctx.Pipe(duplex=False)
        memory = DecodeMemory(self.decode_memory)  # referenced here until the child has it: start() drops its args
        proc = self._ctx.Process(
            target=_decode_alone, args=(send, memory, paths, self.spec, self.max_pixels, start, self.io_threads)
        )
        proc.start()
        send.close()
        started = False
        try:
            started = receive.recv()  # sent before it decodes
            batch: DecodedBatch = receive.recv()
            return batch
        except EOFError:
            proc.join()
            code = proc.exitcode or 0
            how = signal.Signals(-code).name if code < 0 else f"exit code {code}"
            if not started:
                raise _cannot_start(f"a decode process ended ({how})") from None
            return how
        finally:
            receive.close()
            proc.join(5)  # it exits once the batch is sent; killed when this ends otherwise (Ctrl-C)
            if proc.is_alive():
                proc.kill()
                proc.join()

    def close(self, kill: bool = False) -> None:
        """Stop the pool; kill: a stream closed before its end (an error, a consumer that stopped) ends its workers
        at once instead of letting them finish chunks nobody will read."""
        if kill:
            self.stop()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.arena.close()


def _decode_alone(
    send: Any, memory: DecodeMemory, paths: list[Source], spec: PreprocessSpec, max_pixels: int, start: int,
    io_threads: int,
) -> None:
    """DecoderPool._alone's process: decode paths and send the batch back."""
    _worker_init(memory)
    send.send(True)
    send.send(decode_many(paths, spec, max_pixels, start, memory, io_threads))
    send.close()


def _worker_init(memory: DecodeMemory, begun: Any = None) -> None:
    """Set up a decode process: its budget, its pool's start-up flag (see DecoderPool), an exit with its parent."""
    global _worker_memory, _worker_begun
    # Ctrl-C reaches the whole process group; only the parent should react (it terminates the pool).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_memory, _worker_begun = memory, begun
    threading.Thread(target=_exit_with_parent, name="tagger-parent-watch", daemon=True).start()


def _exit_with_parent() -> None:
    """Exit as soon as the parent process is gone, however it ended (SIGKILL included): a killed run leaves no
    workers behind, and with them gone multiprocessing's resource tracker (whose pipe they hold) exits too.
    A spawned child's parent sentinel is a pipe whose other end only the parent holds: it reads EOF then."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        parent.join()
        os._exit(1)


class _Started:
    """What _startup_error's probe is handed once spawn's start-up is done: it runs nothing and exits 0."""

    def _bootstrap(self, parent_sentinel: int | None = None) -> int:
        return 0


def _startup_error() -> str:
    """Why a spawned decode process dies before it runs anything, in its own words: the last line of the stderr of a
    probe started exactly as spawn starts a worker (same interpreter, flags, path and main module, which spawn
    imports again, as with `python - < script.py`); '' when the probe starts fine."""
    if os.name != "posix":
        return ""
    from multiprocessing import reduction, spawn

    r, w = os.pipe()
    try:
        proc = subprocess.Popen(
            spawn.get_command_line(pipe_handle=r), pass_fds=(r,), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
    finally:
        os.close(r)
    data = spawn.get_preparation_data("tagger-probe")
    data["authkey"] = bytes(data["authkey"])  # pickled only while spawning otherwise; the child wraps it again
    with open(w, "wb") as f, contextlib.suppress(BrokenPipeError):
        reduction.dump(data, f)
        reduction.dump(_Started(), f)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return ""
    lines = [line.strip() for line in err.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1] if proc.returncode and lines else ""


def _cannot_start(what: str) -> TaggerError:
    """The error of a decode pool whose processes die before decoding anything: a failure of the system, not of
    any file. Names the processes' own error when a probe reproduces it."""
    why = _startup_error()
    return TaggerError(
        f"decode workers cannot start: {what} before decoding anything"
        + (f" ({' '.join(why.split())[:300]})" if why else "")
        + "; --workers 0 decodes in this process"
    )
