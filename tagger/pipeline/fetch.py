"""Read-ahead for objects in a store with latency: a window of reads, in order, in flight ahead of their decoder."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Sequence

from tagger.pipeline.budget import Lease, size_text
from tagger.pipeline.discover import ImageRef
from tagger.pipeline.image import Source
from tagger.storage import open_location, read_file

DEFAULT_IO_THREADS = 16  # object-store reads in flight per decoder (--io-threads): ~16 GETs of 30 ms hide the latency


def reads_ahead(src: Source) -> bool:
    """Whether src is read ahead of its decoding: a listed file in a remote store (an object). The one place decode
    asks storage where a file lives."""
    return isinstance(src, ImageRef) and src.unlistable is None and open_location(src.abspath)[0].remote


class FetchWindow:
    """The objects of a chunk read by io_threads threads while its one decoding thread decodes the files before
    them. That thread drives the window: take(i), in order, hands over file i's read and sends the next ones, so up
    to io_threads reads are always out ahead of the decoding. Local files are not read ahead: decode reads them.

    With a lease, each object's size (known from the listing) is held in its budget before its read is sent, only
    while the reads ahead leave half of the budget free (DecodeMemory.hold_ahead), and passes to the lease when
    the decoding takes it. An object that does not fit waits, and the objects after it with it (sending them first
    could leave it no room); if it still does not fit at its turn, the decoding thread holds its size in the lease,
    waiting for room as a decoding does, and reads it itself. A decoding that needs more than half the budget may
    need the share of the reads ahead of it too: the lease then drains them (_drain) before it waits.
    """

    def __init__(self, srcs: Sequence[Source], io_threads: int, lease: Lease | None) -> None:
        self._srcs = srcs
        self._lease = lease
        self._depth = io_threads
        self._waiting = deque(i for i, src in enumerate(srcs) if reads_ahead(src))  # not sent yet, in order
        self._sent: dict[int, tuple[Future[bytes], int]] = {}  # index -> (its read, bytes it holds in the budget)
        self._pool = ThreadPoolExecutor(min(io_threads, len(self._waiting))) if self._waiting else None
        if lease is not None:
            lease.drain_ahead = self._drain
        self._send()

    def _ref(self, i: int) -> ImageRef:
        ref = self._srcs[i]
        assert isinstance(ref, ImageRef)  # reads_ahead holds only for refs
        return ref

    def _held(self, ref: ImageRef) -> int:
        return ref.size if self._lease is not None and ref.size > 0 else 0

    def _send(self) -> None:
        """Send the next reads, in order, while the window has room and the budget lets them hold their size."""
        while self._waiting and len(self._sent) < self._depth:
            assert self._pool is not None  # made when anything waits
            i = self._waiting[0]
            ref = self._ref(i)
            nbytes = self._held(ref)
            if nbytes and self._lease is not None and not self._lease.memory.hold_ahead(nbytes):
                return
            self._waiting.popleft()
            self._sent[i] = (self._pool.submit(read_file, ref.abspath), nbytes)

    def _drain(self) -> None:
        """Give back the share of every read sent and not yet taken, and drop its bytes (a read under way first
        ends: its bytes are in memory until then); they go out again, in order, when there is room. Called by the
        lease when a decode over half the budget must wait: these reads could otherwise only be taken after it."""
        assert self._lease is not None  # the lease calls it
        for i in sorted(self._sent, reverse=True):
            future, nbytes = self._sent.pop(i)
            if not future.cancel():
                wait([future])
            if nbytes:
                self._lease.memory.release(nbytes)
            self._waiting.appendleft(i)

    def take(self, i: int) -> Future[bytes] | None:
        """Source i's bytes (None: not an object, decode reads it); the budget they hold passes to the lease.
        Called for every source, in order, by the decoding thread."""
        if i not in self._sent:
            self._send()  # the decodes before it gave their room back: it may go out now, and the ones after it
        if i in self._sent:
            future, nbytes = self._sent.pop(i)
            if self._lease is not None:
                self._lease.adopt(nbytes)
            self._send()
            return future
        if not self._waiting or self._waiting[0] != i:
            return None
        self._waiting.popleft()  # no room to read it ahead even now: read here
        ref = self._ref(i)
        done: Future[bytes] = Future()
        try:
            try:
                if self._lease is not None and (nbytes := self._held(ref)):
                    self._lease.release()
                    self._lease.add(nbytes, f"a {size_text(nbytes, up=True)} object")
            finally:
                self._send()  # the reads after it, once it holds its size
            done.set_result(read_file(ref.abspath))
        except Exception as e:  # noqa: BLE001 - the row's error, as a read ahead's
            done.set_exception(e)
        return done

    def close(self) -> None:
        """Stop reading ahead; give back what reads never taken hold."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._lease is not None:
            self._lease.drain_ahead = None
            for _, nbytes in self._sent.values():
                if nbytes:
                    self._lease.memory.release(nbytes)
        self._sent.clear()
        self._waiting.clear()
