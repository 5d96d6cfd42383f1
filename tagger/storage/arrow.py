"""Object stores through pyarrow.fs (s3://, gs://, any URI FileSystem.from_uri understands): a Store of URIs.

Read in one call (pyarrow sends a HEAD and a GET); publish by uploading a finished local file in one call, so an
object appears whole or not at all; every call under the store's time bound (retry.py); a best-effort lease lock.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import io
import urllib.parse
import uuid
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from tagger.errors import TaggerError, UsageError
from tagger.storage.base import AmbiguousKey, Entry, StoreLock
from tagger.storage.local import discard, temp_file
from tagger.storage.lock import LeaseLock
from tagger.storage.retry import CLEANUP_SECONDS, StoreUnavailable, hurry, is_transient, request_timeouts, retrying
from tagger.storage.retry import store_timeout
from tagger.storage.uri import BadURI, Location, is_uri, object_id, place, redact, split, why


@functools.lru_cache(maxsize=16)
def _filesystem(base: str, query: str, bound: float) -> tuple[pafs.FileSystem, str]:
    """One filesystem per store, options and bound, per process (clients hold connection pools and credentials).

    Credentials come from the standard chains (AWS env vars, ~/.aws profiles, instance roles, AWS_ENDPOINT_URL;
    GCS application default credentials) unless the URI carries them. S3: allow_delayed_open makes a small object
    one PUT instead of create + upload part + complete (3 round trips); its errors surface at close(), which
    publish calls itself. Every attempt gets connect and request timeouts and the SDK retries nothing: retrying
    retries transient errors, so one bound covers a whole call.
    """
    options = urllib.parse.parse_qs(query)
    if base.startswith("s3://") and "allow_delayed_open" not in options:
        query = (query + "&" if query else "") + "allow_delayed_open=true"
    fs, root = pafs.FileSystem.from_uri(f"{base}/?{query}" if query else f"{base}/")
    if isinstance(fs, pafs.S3FileSystem):
        _, (kw,) = fs.__reduce__()  # the options from_uri resolved (region, endpoint, credentials), to rebuild with
        connect, request = request_timeouts(bound)
        kw.update(connect_timeout=connect, request_timeout=request,
                  retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))  # fmt: skip
        kw["region"] = kw["region"] or None
        if not kw["proxy_options"]["host"]:
            kw["proxy_options"] = None
        fs = pafs.S3FileSystem(**kw)
    return fs, root.rstrip("/")  # s3://bkt/ -> 'bkt', file:/// -> ''


def _fs(loc: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path in it) of a URI (an S3 or GCS path starts with the bucket); TaggerError (redacted) when
    pyarrow does not understand it (StoreUnavailable when the store does not answer as it is opened: S3 may ask
    it for the bucket's region)."""
    try:
        base, path, query = split(loc)
        bound = store_timeout()
        try:
            fs, root = _filesystem(base, query, bound)  # cached: no call to the store after the first
        except (OSError, pa.ArrowException) as e:
            if not is_transient(e):
                raise
            fs, root = retrying(loc, "open", lambda: _filesystem(base, query, bound))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise TaggerError(f"cannot open {redact(loc)}: {why(e, loc)}") from None
    return fs, f"{root}/{path}" if root or base.startswith("file:") else path


def _file_fs(loc: str) -> tuple[pafs.FileSystem, str]:
    """_fs for one file of a catalog or list: a URI that cannot be opened is that file's error (BadURI, its row),
    not the run's; a store that does not answer still stops the run."""
    try:
        return _fs(loc)
    except StoreUnavailable:
        raise
    except TaggerError as e:
        raise BadURI(str(e)) from None


def has_dot_segments(uri: str) -> bool:
    """Whether a URI's key has a '.' or '..' component ('cat/hires/../small/1.jpg'). HTTP clients collapse such
    segments before sending (RFC 3986), so that object can be neither read nor written under its own key: another
    one would be."""
    return any(part in (".", "..") for part in split(uri)[1].split("/"))


UPLOAD_IN_ONE_WRITE = 64 << 20  # bytes: a file up to this size is uploaded from memory, in one write


def _put(fs: pafs.FileSystem, key: str, data: bytes) -> None:
    """Write `data` as the whole object `key` and close the stream ourselves: close() is where the store answers
    (a delayed or multipart upload is sent or completed there), and a destructor would only log its error. All of
    `data` goes in one write, so whatever interrupts us, the object is complete or absent."""
    f = fs.open_output_stream(key)
    try:
        f.write(data)
    finally:
        f.close()


def _upload(tmp: Path, out: str) -> None:
    """Upload a finished local file as the object `out`, verified by the store's answer (TaggerError otherwise).

    Up to UPLOAD_IN_ONE_WRITE bytes: one write of the whole file (_put). Larger: streamed to a hidden staging
    object beside it, then copied server-side onto `out` in one call (CopyObject, up to 5 GB) and the staging object
    deleted: a stream interrupted halfway can only ever complete the staging object, never `out`.
    """
    fs, path = _fs(out)
    try:
        size = tmp.stat().st_size
        if size <= UPLOAD_IN_ONE_WRITE:
            data = tmp.read_bytes()
            retrying(out, "write", lambda: _put(fs, path, data))
            return
        head, _, name = path.rpartition("/")
        staging = f"{head}/.{name}.{uuid.uuid4().hex}.upload.tmp"

        def stream() -> None:
            with open(tmp, "rb") as src:
                f = fs.open_output_stream(staging)
                try:
                    for block in iter(lambda: src.read(8 << 20), b""):
                        f.write(block)
                finally:
                    f.close()

        try:
            retrying(out, "write", stream)
            retrying(out, "write", lambda: fs.copy_file(staging, path))
        finally:
            # Retried a little only: the store may be what failed. A staging object left behind is hidden.
            with contextlib.suppress(OSError, pa.ArrowException, TaggerError), hurry(CLEANUP_SECONDS):
                retrying(out, "remove", lambda: fs.delete_file(staging))
    except (OSError, pa.ArrowException) as e:
        raise TaggerError(f"cannot write {redact(out)}: {why(e, out)}") from None


class ArrowStore:
    """Object stores through pyarrow.fs: keys are URIs, kept as the exact string (pathlib would collapse 's3://' to
    's3:/'). One filesystem per store and options, per process (_filesystem)."""

    remote = True

    def redact(self, key: Location) -> str:
        return redact(key)

    def absolute(self, key: Location) -> str:
        return redact(key)

    def join(self, key: Location, name: str) -> str:
        base, path, query = split(str(key))
        full = f"{path.rstrip('/')}/{name}" if path else name
        return f"{base}/{urllib.parse.quote(full)}" + (f"?{query}" if query else "")

    def sibling(self, key: Location, suffix: str) -> str:
        base, path, query = split(str(key))
        return f"{base}/{urllib.parse.quote(path + suffix)}" + (f"?{query}" if query else "")

    def name(self, key: Location) -> str:
        try:
            return split(str(key))[1].rstrip("/").rsplit("/", 1)[-1]
        except BadURI:
            return ""

    def check_names_file(self, key: Location, what: str) -> None:
        """Also refused: a bare bucket, a malformed URI, and a key with '.' or '..' components (the client would
        write another object: a photo of the catalog, say)."""
        try:
            split(str(key))
        except BadURI as e:
            raise UsageError(f"{what} {redact(key)!r}: {e}") from None
        if self.name(key) in ("", ".", ".."):
            raise UsageError(f"{what} must name a file, got {redact(key)!r}")
        if has_dot_segments(str(key)):
            raise UsageError(
                f"{what} {redact(key)!r} has a '.' or '..' component in its key, which the store would resolve to "
                "another object; write the key without them"
            )

    def same(self, a: Location, b: Location) -> bool:
        """The same object: scheme, host, port and key (not the credentials or options it is reached with)."""
        return object_id(str(a)) == object_id(str(b))

    def relative(self, root: Location, key: Location) -> str | None:
        rb, rp, _ = split(str(root))
        lb, lp, _ = split(str(key))
        prefix = rp.rstrip("/") + "/" if rp else ""
        if place(rb)[:3] != place(lb)[:3] or not lp.startswith(prefix):
            return None
        return lp[len(prefix) :] or None

    def resolve(self, key: Location) -> str:
        return str(key)  # keys have no links

    def locate(self, root: Location, name: str) -> str:
        return self.join(root, name.lstrip("/"))

    def _info(self, key: Location) -> pafs.FileInfo:
        fs, path = _fs(str(key))
        try:
            info: pafs.FileInfo = retrying(key, "read", lambda: fs.get_file_info(path))
        except (OSError, pa.ArrowException) as e:
            raise TaggerError(f"cannot read {redact(key)}: {why(e, key)}") from None
        return info

    def exists(self, key: Location) -> bool:
        return self._info(key).type != pafs.FileType.NotFound

    def is_folder(self, key: Location) -> bool:
        fs, path = _fs(str(key))
        try:
            return retrying(key, "read", lambda: fs.get_file_info(path)).type == pafs.FileType.Directory
        except (OSError, pa.ArrowException):
            return False  # no bucket or no access: writing it says so

    def list(self, key: Location, keep: Callable[[str], bool]) -> Iterator[Entry]:
        """pyarrow's recursive FileSelector returns the whole listing at once: ~100 bytes a key, 100 MB for a
        million."""
        fs, path = _fs(str(key))
        prefix = path.rstrip("/")
        try:
            infos = retrying(key, "list", lambda: fs.get_file_info(pafs.FileSelector(prefix, recursive=True)))
        except (OSError, pa.ArrowException) as e:
            raise TaggerError(f"cannot list catalog {redact(key)}: {why(e, key)}") from None
        entries = []
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            rel = info.path[len(prefix) + 1 :] if prefix else info.path
            if keep(rel):
                entries.append((rel, info))
        entries.sort(key=lambda e: e[0])
        for rel, info in entries:
            yield Entry(rel, self.join(key, rel), info.size, (info.mtime_ns or 0) / 1e9)

    def stat(self, key: Location) -> tuple[int, float]:
        fs, path = _file_fs(str(key))
        info = retrying(key, "read", lambda: fs.get_file_info(path))
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(2, "No such object")
        return info.size, (info.mtime_ns or 0) / 1e9

    def read(self, key: Location) -> bytes:
        """Its errors (403, deleted) are OSErrors too."""
        if has_dot_segments(str(key)):
            raise AmbiguousKey("a key with a '.' or '..' component, which the store would resolve to another object")
        fs, path = _file_fs(str(key))

        def get() -> bytes:
            with fs.open_input_stream(path, compression=None) as f:  # never 'detect': a photo named x.gz stays bytes
                data: bytes = f.read()
                return data

        return retrying(key, "read", get)

    def open(self, key: Location) -> BinaryIO:
        return io.BytesIO(self.read(key))

    def _list_prefix(self, key: Location) -> builtins.list[pafs.FileInfo]:
        """What lies directly below a key prefix; TaggerError (redacted) when it cannot be listed (403, no
        server)."""
        fs, path = _fs(str(key))
        selector = pafs.FileSelector(path.rstrip("/"), recursive=False, allow_not_found=True)
        try:
            infos: builtins.list[pafs.FileInfo] = retrying(key, "list", lambda: fs.get_file_info(selector))
        except (OSError, pa.ArrowException) as e:
            raise TaggerError(f"cannot list {redact(key)}: {why(e, key)}") from None
        return infos

    def names(self, key: Location) -> builtins.list[str]:
        return sorted(i.base_name for i in self._list_prefix(key) if i.type == pafs.FileType.File)

    def entries(self, key: Location) -> builtins.list[str] | None:
        return sorted(i.base_name for i in self._list_prefix(key))

    def make_folder(self, key: Location) -> None:
        """Nothing: folders are key prefixes."""

    def reserve_temp(self, key: Location, tmp_dir: Location | None = None) -> Path:
        """A file in tmp_dir when that is local, else in the system's temp folder: uploaded by publish."""
        folder = tmp_dir if tmp_dir is not None and not is_uri(tmp_dir) else None
        return temp_file(self.name(key), folder, redact(key))

    def publish(self, tmp: Path, key: Location) -> None:
        """Only the store's answer says the object is there: a refused or failed upload is a TaggerError and the
        previous object stays."""
        try:
            self.check_names_file(key, "output")
            _upload(tmp, str(key))
        finally:
            discard(tmp)

    def publish_bytes(self, key: Location, data: bytes, tmp_dir: Location | None = None) -> None:
        """One write, answered by the store."""
        self.check_names_file(key, "output")
        fs, path = _fs(str(key))
        try:
            retrying(key, "write", lambda: _put(fs, path, data))
        except (OSError, pa.ArrowException) as e:
            raise TaggerError(f"cannot write {redact(key)}: {why(e, key)}") from None

    def remove(self, key: Location) -> None:
        fs, path = _fs(str(key))
        try:
            retrying(key, "remove", lambda: fs.delete_file(path))
        except FileNotFoundError:
            pass
        except (OSError, pa.ArrowException) as e:
            raise TaggerError(f"cannot remove {redact(key)}: {why(e, key)}") from None

    def remove_tree(self, key: Location) -> None:
        fs, path = _fs(str(key))
        with contextlib.suppress(OSError, TaggerError):  # delete_dir: also the folder marker S3 leaves
            retrying(key, "remove", lambda: fs.delete_dir(path))

    def lock(self, key: Location, what: str) -> StoreLock:
        return LeaseLock(self, self.join(key, "lock"), what)

    def arrow_source(self, key: Location) -> tuple[str, pafs.FileSystem | None]:
        fs, path = _fs(str(key))
        return path, fs
