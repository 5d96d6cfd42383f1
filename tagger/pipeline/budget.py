"""The decode memory budget of a run, shared by all its decoders, and the lease through which one decoder holds it."""

from __future__ import annotations

import multiprocessing
from typing import Callable

DEFAULT_DECODE_MEMORY = 4 * 1024**3  # bytes of decoding all decoders of a run may hold at once (--decode-memory)
MAX_DECODE_MEMORY = 2**60  # 1 EiB: far above any machine, and the budget's shared counter is a signed 64-bit int


class DecodeMemoryError(MemoryError):
    """An image whose decoding alone needs more than the whole --decode-memory budget."""


def size_text(nbytes: int, up: bool) -> str:
    """nbytes in its largest unit (bytes, KiB, MiB, GiB, TiB) with one decimal at most, rounded up or down: an
    estimate rounded up next to a budget rounded down always reads as more, as it is."""
    unit, scale = next((u, s) for u, s in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10),
                                          ("bytes", 1)) if nbytes >= s or s == 1)  # fmt: skip
    tenths = -(-nbytes * 10 // scale) if up else nbytes * 10 // scale
    if nbytes == 1:
        return "1 byte"
    return f"{tenths // 10} {unit}" if tenths % 10 == 0 else f"{tenths / 10:.1f} {unit}"


class DecodeMemory:
    """The bytes of decoding that every decoder of a run (pool workers included) may hold at once.

    An image waits until its estimate (image.decode_bytes) fits beside the others'; one larger than the whole
    budget is refused. Crosses into spawned workers through the pool's initializer. A worker killed while holding
    a share leaks it: a pool that lost a worker is replaced with a fresh budget.
    """

    def __init__(self, limit: int) -> None:
        if not 1 <= limit <= MAX_DECODE_MEMORY:
            raise ValueError(f"decode memory must be 1 .. {MAX_DECODE_MEMORY} bytes, got {limit}")
        ctx = multiprocessing.get_context("spawn")
        self.limit = limit
        self._cond = ctx.Condition()
        self._free = ctx.RawValue("q", limit)
        self._large_waiting = ctx.RawValue("q", 0)  # decodes over half the budget waiting for room

    def acquire(self, nbytes: int, what: str) -> None:
        """Wait until nbytes fit beside what the others hold, and hold them; DecodeMemoryError when they never can."""
        if nbytes > self.limit:
            raise DecodeMemoryError(
                f"{what} needs ~{size_text(nbytes, up=True)} to decode, more than --decode-memory "
                f"{size_text(self.limit, up=False)}"
            )
        with self._cond:
            # One over half needs room reads ahead may hold: none are sent while it waits (hold_ahead), or the other
            # decoders' windows could refill it as fast as they give it back.
            large = nbytes > self.limit // 2 and self._free.value < nbytes
            self._large_waiting.value += large
            try:
                self._cond.wait_for(lambda: self._free.value >= nbytes)
            finally:
                self._large_waiting.value -= large
            self._free.value -= nbytes

    def try_acquire(self, nbytes: int) -> bool:
        """Hold nbytes if they fit now; False (nothing held, no wait) otherwise."""
        with self._cond:
            if self._free.value < nbytes:
                return False
            self._free.value -= nbytes
        return True

    def release(self, nbytes: int) -> None:
        with self._cond:
            self._free.value += nbytes
            self._cond.notify_all()

    def hold_ahead(self, nbytes: int) -> bool:
        """Hold nbytes for a file read ahead of its decoding, at once, if half the budget stays free for the
        decodes: files read ahead never hold more than half, so a decode (one of at most half the budget) always
        gets room; none while a larger decode waits. False (nothing held, no wait) otherwise."""
        reserve = self.limit // 2
        if nbytes > self.limit - reserve:
            return False
        with self._cond:
            if self._large_waiting.value or self._free.value - nbytes < reserve:
                return False
            self._free.value -= nbytes
        return True


class Lease:
    """What one decoder (one thread) holds of a DecodeMemory for the file it is on: the file's bytes when they were
    read ahead, then its decoding; given back in one call when the file is done.

    Passed explicitly to what decodes (fetch.FetchWindow, image.load_image): a decoder without one never waits.
    """

    def __init__(self, memory: DecodeMemory) -> None:
        self.memory = memory
        self.held = 0
        # Gives back what this decoder's own reads ahead hold (fetch.FetchWindow sets it while it is open).
        self.drain_ahead: Callable[[], None] | None = None

    def add(self, nbytes: int, what: str) -> None:
        """Hold nbytes more for the current file. What is held already is given back while waiting and taken again
        with the rest, so a decoder never sits on a share while it waits; DecodeMemoryError (nothing held) when the
        total is more than the whole budget.

        Reads ahead always leave half the budget to decodes; a total over half may need their share too, and the
        ones of this decoder's own window wait for this very decode: they are given back before it waits."""
        total = self.held + nbytes
        self.release()
        if not self.memory.try_acquire(total):
            if self.drain_ahead is not None and self.memory.limit // 2 < total <= self.memory.limit:
                self.drain_ahead()
            self.memory.acquire(total, what)  # waits; DecodeMemoryError past the whole budget
        self.held = total

    def adopt(self, nbytes: int) -> None:
        """Take over nbytes held already for the next file (its bytes, read ahead), giving back what was held."""
        self.release()
        self.held = nbytes

    def release(self) -> None:
        if self.held:
            self.memory.release(self.held)
            self.held = 0
