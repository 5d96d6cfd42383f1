"""Store calls under one time bound: transient errors retried with backoff, a stopping run never held up by a store."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import threading
import time
from typing import Callable, Iterator, TypeVar

import pyarrow as pa

from tagger.errors import TaggerError, UsageError
from tagger.storage.uri import Location, redact, split, why

log = logging.getLogger(__name__)

STORE_TIMEOUT_ENV = "TAGGER_STORE_TIMEOUT"
DEFAULT_STORE_TIMEOUT = 60.0  # seconds a store may fail with transient errors before a call gives up
MAX_BACKOFF_S = 5.0


def store_timeout() -> float:
    """How long one store call keeps retrying transient errors (seconds): TAGGER_STORE_TIMEOUT, else 60. Read from
    the environment so that decode workers, in other processes, follow the same bound."""
    raw = os.environ.get(STORE_TIMEOUT_ENV)
    if not raw:
        return DEFAULT_STORE_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"{STORE_TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if not 0 < value <= 86400:
        raise UsageError(f"{STORE_TIMEOUT_ENV} must be between 0 and 86400 seconds, got {raw!r}")
    return value


def request_timeouts(bound: float) -> tuple[float, float]:
    """(connect, request) timeouts of one attempt, in whole seconds (the S3 client rounds down, and 0 would mean
    none): a quarter of the bound, at most 10 s to connect and 15 s without receiving a byte (curl's low-speed
    limit: a slow large transfer is not cut). A PUT may wait that long in each of its phases (headers, body,
    answer), so one attempt stays within 3/4 of the bound and a call within twice the bound."""
    quarter = max(1, int(bound / 4))
    return float(min(10, quarter)), float(min(15, quarter))


# A store's answer that may change by itself: connection refused or reset, timeouts, throttling, 5xx. Matched
# against pyarrow's messages (AWS SDK error names, curl's) and against error rows written by earlier runs.
TRANSIENT_PATTERN = (
    r"NETWORK_CONNECTION|REQUEST_TIMEOUT|SLOW_DOWN|THROTTL|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|REQUEST_LIMIT|"
    r"Timeout was reached|Connection reset|Could not connect|Connection refused|timed out|"
    r"HTTP (?:status|response code):? ?(?:5\d\d|429)|\[code (?:5\d\d|429)\]"
)
_TRANSIENT = re.compile(TRANSIENT_PATTERN, re.IGNORECASE)


def is_transient(e: BaseException) -> bool:
    """Whether a store error may go away by itself (retry it) rather than be the object's answer (403, missing)."""
    return isinstance(e, (OSError, pa.ArrowException)) and not isinstance(e, FileNotFoundError) and (
        isinstance(e, (ConnectionError, TimeoutError)) or _TRANSIENT.search(str(e)) is not None
    )


class StoreUnavailable(TaggerError):
    """The object store kept failing with transient errors past the bound: the run stops, it blames no file."""


_T = TypeVar("_T")

_gave_up: dict[str, float] = {}  # store (scheme://authority) -> when a call last gave up on it (monotonic)
_hurry_until: float | None = None  # set by hurry(): no store call waits past this (monotonic)


def _store_of(loc: Location) -> str:
    return split(str(loc))[0]


_CALL_THREAD = "tagger-store-call"


def _attempt(call: Callable[[], _T]) -> _T:
    """call() once, in a helper thread that the caller waits for: a signal (SIGTERM, Ctrl-C) is handled at once in
    the main thread, and once a stopping run hurries (hurry, abort_fast) no thread waits past its deadline for a
    store that does not answer (TimeoutError; the helper is a daemon, so nothing waits for it at exit either)."""
    result: list[_T] = []
    error: list[BaseException] = []
    done = threading.Event()

    def target() -> None:
        try:
            result.append(call())
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            error.append(e)
        finally:
            done.set()

    threading.Thread(target=target, name=_CALL_THREAD, daemon=True).start()
    while not done.wait(0.25):
        if _hurry_until is not None and time.monotonic() >= _hurry_until:
            raise TimeoutError("the run is stopping; no answer from the store in time")
    if error:
        raise error[0]
    return result[0]


def retrying(loc: Location, what: str, call: Callable[[], _T]) -> _T:
    """call(), retried with bounded exponential backoff while it fails transiently; StoreUnavailable once
    store_timeout() has passed since the first attempt (a call ends within the bound plus one request timeout).
    Permanent errors are raised as they are, at once. A store this process gave up on less than a bound ago is
    not waited for again: the run is stopping, its clean-up must not take another bound."""
    bound = store_timeout()
    store = _store_of(loc)
    deadline = time.monotonic() + bound
    gave_up = time.monotonic() - _gave_up.get(store, -math.inf)
    if gave_up < bound:  # the run is stopping because of it: its clean-up must not wait another bound
        raise StoreUnavailable(f"object store unreachable ({STORE_TIMEOUT_ENV}: gave up {gave_up:.0f} s ago)")
    delay = 0.2
    while True:
        try:
            return _attempt(call)
        except (OSError, pa.ArrowException) as e:
            if not is_transient(e):
                raise
            hurry_until = _hurry_until  # may have been set meanwhile (SIGTERM)
            if time.monotonic() + delay >= (deadline if hurry_until is None else min(deadline, hurry_until)):
                _gave_up[store] = time.monotonic()
                raise StoreUnavailable(
                    f"object store unreachable for {bound:g} s ({STORE_TIMEOUT_ENV}) while trying to {what} "
                    f"{redact(loc)}: {why(e, loc)}"
                ) from None
            log.debug("transient store error on %s, retrying in %.1f s: %s", redact(loc), delay, why(e, loc))
        time.sleep(delay)
        delay = min(delay * 2, MAX_BACKOFF_S)


def exit_if_stuck(code: int) -> None:
    """End the process at once with `code` while store calls still wait for an answer (a store that never
    answers): pyarrow's exit handler would wait for each of them, up to its request timeouts. For the CLI, after the
    run has cleaned up and said why it stops; nothing happens when no call is left waiting."""
    if any(t.name == _CALL_THREAD and t.is_alive() for t in threading.enumerate()):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


CLEANUP_SECONDS = 3.0  # the most a stopping run waits for a store in all: its last rows, its lock


def stop_waiting(seconds: float = CLEANUP_SECONDS) -> None:
    """From now on, no store call in this process waits more than `seconds` in all. For a SIGTERM handler, before
    it unwinds the run: threads reading ahead stop waiting for a store that does not answer, so the run's clean-up
    is not held up by them."""
    global _hurry_until
    until = time.monotonic() + seconds
    _hurry_until = until if _hurry_until is None else min(_hurry_until, until)


def aborting(exc_type: type[BaseException] | None) -> bool:
    """Whether a block ends because the run was told to stop (SIGTERM, Ctrl-C) or its store stopped answering:
    then its clean-up hurries."""
    return exc_type is not None and (not issubclass(exc_type, Exception) or issubclass(exc_type, StoreUnavailable))


@contextlib.contextmanager
def hurry(seconds: float) -> Iterator[None]:
    """Within the block no store call waits more than `seconds` in all: the clean-up of a run that was told to stop
    or whose store failed, which must end soon whatever the store does."""
    global _hurry_until
    saved = _hurry_until
    _hurry_until = time.monotonic() + seconds if saved is None else min(saved, time.monotonic() + seconds)
    try:
        yield
    finally:
        _hurry_until = saved


@contextlib.contextmanager
def abort_fast(seconds: float) -> Iterator[Callable[..., bool]]:
    """For a run's ExitStack: yields an exit callback to push last. When the run aborts (see aborting), it makes
    the clean-up of everything pushed before it (decode threads, work parts, the lock) wait for the store at most
    `seconds` in all; the block's end restores the normal bound."""
    global _hurry_until
    saved = _hurry_until

    def on_exit(exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        global _hurry_until
        if aborting(exc_type):
            _hurry_until = time.monotonic() + seconds if saved is None else min(saved, time.monotonic() + seconds)
        return False

    try:
        yield on_exit
    finally:
        _hurry_until = saved
        _gave_up.clear()  # the next run tries the store afresh
