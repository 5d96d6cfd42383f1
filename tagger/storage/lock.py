"""A lease lock for stores without an atomic one: a lock object (token, host, pid, expiry), written and read back."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from typing import TYPE_CHECKING

from tagger.errors import TaggerError
from tagger.storage.uri import why

if TYPE_CHECKING:
    from tagger.storage.base import Store

log = logging.getLogger(__name__)

LOCK_LEASE_S = 900.0  # a lock object not refreshed for this long belongs to a dead run


class LeaseLock:
    """Best effort, not atomic (pyarrow.fs has no conditional put): the lock object is written, then read back to
    see that this run's token won. Two runs starting within one round trip of each other can both read back their
    own token (the later write wins at the store, and the earlier run only finds out at its next refresh). A lock of
    a dead run is taken over when its lease (LOCK_LEASE_S, renewed by refresh()) has run out, or at once when it
    names this host and a pid that no longer runs."""

    def __init__(self, store: Store, key: str, what: str) -> None:
        self._store, self._key, self.what = store, key, what
        self._token = uuid.uuid4().hex
        self._refreshed = 0.0
        holder = self._holder()
        if holder is not None and holder.get("token") != self._token and not _dead(holder):
            raise TaggerError(
                f"another tagger run is writing {what} (pid {holder.get('pid')} on {holder.get('host')} holds "
                f"{store.redact(key)} until its lease runs out)"
            )
        self.refresh()
        holder = self._holder()
        if holder is None or holder.get("token") != self._token:
            raise TaggerError(f"another tagger run took the lock on {what} at the same time; try again")

    def _holder(self) -> dict[str, object] | None:
        """The lock object's content; None when there is none or it is not ours to read (torn, not JSON).
        TaggerError when the store refuses the read (credentials, no bucket): that is the cause to name."""
        try:
            data = json.loads(self._store.read(self._key))
        except FileNotFoundError:
            return None
        except OSError as e:
            raise TaggerError(f"cannot write output {self.what}: {why(e, self._key)}") from None
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def refresh(self) -> None:
        """Renew the lease (called as the run commits)."""
        self._refreshed = time.monotonic()
        info = {"token": self._token, "host": socket.gethostname(), "pid": os.getpid(),
                "expires": time.time() + LOCK_LEASE_S}  # fmt: skip
        self._store.publish_bytes(self._key, json.dumps(info).encode())

    def refresh_due(self) -> bool:
        return time.monotonic() - self._refreshed > LOCK_LEASE_S / 3

    def release(self) -> None:
        try:
            holder = self._holder()
            if holder is not None and holder.get("token") == self._token:
                self._store.remove(self._key)
        except (OSError, TaggerError) as e:  # the store is down or refuses: the lease runs out by itself
            log.warning("could not release the lock %s: %s", self._store.redact(self._key), e)


def _dead(holder: dict[str, object]) -> bool:
    """Whether a lock object's run is gone: its lease ran out, or it names this host and a pid not running."""
    expires = holder.get("expires")
    if not isinstance(expires, (int, float)) or expires < time.time():
        return True
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(int(holder["pid"]), 0)  # type: ignore[call-overload]
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
