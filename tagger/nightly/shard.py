"""Shards: split a catalog between machines by a stable hash of each path; merge the shard outputs into one."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tagger._version import __version__
from tagger.errors import TaggerError, UsageError
from tagger.guards import check_no_input
from tagger.output import schema as out_schema
from tagger.output.reader import OutputInfo, RowReader, read_output_info
from tagger.output.writer import ResultWriter, check_parquet_name
from tagger.storage import Location, as_location, check_names_file, exists, redact, same_file

log = logging.getLogger(__name__)

META_MERGED_SHARDS = "tagger.run.merged_shards"  # on a merged output: how many shards it was merged from


def shard_of(path: str, count: int) -> int:
    """The shard (0 .. count-1) of a relative posix path: sha1 of its UTF-8 bytes, first 8 bytes big-endian, mod
    count. The same on every machine, run and Python version (unlike hash())."""
    digest = hashlib.sha1(path.encode("utf-8", "surrogateescape"), usedforsecurity=False).digest()
    return int.from_bytes(digest[:8], "big") % count


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`: the files whose path hashes to index (see shard_of)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise UsageError(f"bad shard {self.index}/{self.count}: need 0 <= I < N")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """'I/N', e.g. '0/3'."""
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if m is None:
            raise UsageError(f"bad shard {text!r}: expected I/N, e.g. 0/3")
        return cls(int(m[1]), int(m[2]))

    def holds(self, path: str) -> bool:
        return shard_of(path, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class MergeSummary:
    out: Location
    shards: int
    files: int
    ok: int
    errors: int

    def line(self) -> str:
        return (
            f"merged {self.shards} shards: {self.files} files, {self.ok} ok, {self.errors} errors -> {redact(self.out)}"
        )


def _check_shards(infos: Sequence[OutputInfo]) -> list[OutputInfo]:
    """The infos ordered by shard index, after checking they are all the shards of one catalog, model and options."""
    shards: dict[int, OutputInfo] = {}
    first = infos[0]
    first_shard: Shard | None = None
    for info in infos:
        if info.identity.shard is None:
            raise TaggerError(f"{redact(info.path)} is not a shard (it was not written with --shard I/N)")
        shard = Shard.parse(info.identity.shard)
        first_shard = first_shard or shard
        if shard.count != first_shard.count:
            raise TaggerError(f"{redact(first.path)} is shard {first_shard} but {redact(info.path)} is shard {shard}: different splits")
        if info.identity.model_sha256 != first.identity.model_sha256:
            raise TaggerError(f"{redact(first.path)} and {redact(info.path)} were tagged by different models")
        if dataclasses.replace(info.identity, shard=None) != dataclasses.replace(first.identity, shard=None):
            raise TaggerError(f"{redact(first.path)} and {redact(info.path)} cover different catalogs or options")
        if shard.index in shards:
            twice = f"{redact(shards[shard.index].path)}, {redact(info.path)}"
            raise TaggerError(f"shard {shard} is given twice ({twice}); shards must not overlap")
        shards[shard.index] = info
    assert first_shard is not None
    missing = [f"{i}/{first_shard.count}" for i in range(first_shard.count) if i not in shards]
    if missing:
        raise TaggerError(f"shard {', '.join(missing)} missing: merging needs all {first_shard.count} shards")
    return [shards[i] for i in range(first_shard.count)]


def _merged_metadata(infos: Sequence[OutputInfo]) -> dict[str, str]:
    """The first shard's model and output keys (shard left out), and run keys describing the merge."""
    meta = {k: v for k, v in infos[0].metadata.items() if not k.startswith("tagger.run.") and k != out_schema.META_SHARD}
    meta[out_schema.META_TOOL_VERSION] = __version__
    meta[out_schema.META_PROVIDER] = ",".join(sorted({i.metadata.get(out_schema.META_PROVIDER, "?") for i in infos}))
    meta[out_schema.META_STARTED] = min(i.metadata.get(out_schema.META_STARTED, "") for i in infos)
    meta[META_MERGED_SHARDS] = str(len(infos))
    return meta


def _check_out(out: Location, shard_files: Sequence[Location]) -> None:
    """Refuse an OUT that is one of the inputs, or a shard output itself: the user most likely forgot OUT."""
    usage = "OUT comes first: tagger merge OUT.parquet SHARD.parquet..."
    if not exists(out):
        return
    if any(same_file(out, p) for p in shard_files):
        raise TaggerError(f"output {redact(out)} is one of the shards to merge; {usage}")
    try:
        shard = read_output_info(out).identity.shard
    except TaggerError:
        return  # not a tagger output: replaced on success, like any output
    if shard is not None:
        raise TaggerError(f"output {redact(out)} is a shard output (shard {shard}), not a merged one; {usage}")


def _check_out_is_no_photo(out: Location, identity: out_schema.RunIdentity) -> None:
    """Refuse an OUT that the shards' catalog walk lists (a photo of it, or a name the next run would tag). Shards
    always come from a walk (--shard refuses --files-from), so the recorded extensions are there. A catalog in a
    bucket is recorded redacted, without the options that say which store it is: an OUT in the same bucket and
    prefix is refused, whichever store it is on."""
    if identity.extensions is not None:
        check_no_input(out, catalog=identity.catalog, extensions=identity.extensions, reader="the shards tagged")


def check_shard_output(out: Location, shard: Shard | None) -> None:
    """TaggerError when a --shard run would replace an existing tagger output that holds other rows than its
    shard's: an unsharded output (every shard's rows) or another shard's. Anything else at `out` is left to the run."""
    if shard is None or not exists(out):
        return
    try:
        held = read_output_info(out).identity.shard
    except TaggerError:
        return  # not a tagger output: no rows of the catalog to lose
    if held != str(shard):
        what = "every shard's rows (an unsharded run)" if held is None else f"the rows of shard {held}"
        raise TaggerError(
            f"{redact(out)} holds {what}; --shard {shard} would replace it with one shard's: write each shard to "
            "its own --out, then `tagger merge`"
        )


def merge_shards(out: Location, shard_files: Sequence[Location]) -> MergeSummary:
    """Merge the outputs of `tagger run --shard I/N` (all N of them) into one, in global path order.

    The result equals an unsharded run's output (rows, order, values). Shards of different catalogs, models or
    options, a shard given twice, a missing shard, or a path in two shards are refused (TaggerError) before
    anything is written; the output is written atomically.
    """
    check_names_file(out, "OUT")
    check_parquet_name(out, "OUT")
    out = as_location(out)
    if not shard_files:
        raise TaggerError("name the shard outputs to merge")
    _check_out(out, shard_files)
    infos = _check_shards([read_output_info(p) for p in shard_files])
    _check_out_is_no_photo(out, infos[0].identity)
    tasks, top_k, dim = infos[0].tasks, infos[0].identity.top_k, infos[0].identity.embedding_dim
    with contextlib.ExitStack() as stack:
        readers = [stack.enter_context(RowReader([i.path], tasks, top_k, dim)) for i in infos]
        paths = [r.keys().column("path") for r in readers]
        for info, p in zip(infos, paths):
            if len(p) > 1 and pc.any(pc.less_equal(p[1:], p[:-1])).as_py():
                raise TaggerError(f"{redact(info.path)} is not in path order, so it is not a shard output of tagger run")
        sizes = np.array([len(p) for p in paths], np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)])  # [N + 1] first global row of each shard
        everything = pa.chunked_array([c for p in paths for c in p.chunks], pa.string())
        order = pc.sort_indices(everything).to_numpy().astype(np.int64)  # [rows] global row ids, path order (stable)
        ordered = everything.take(order)
        if len(ordered) > 1:
            dup = pc.equal(ordered[1:], ordered[:-1]).to_numpy(zero_copy_only=False)
            if dup.any():
                path = ordered[int(np.argmax(dup))].as_py()
                raise TaggerError(f"{path} is in more than one shard: the shards overlap")
        shard = np.searchsorted(offsets, order, side="right") - 1  # [rows] shard of each merged row
        local = order - offsets[shard]  # [rows] its row within that shard
        writer = stack.enter_context(ResultWriter(out, readers[0].schema, _merged_metadata(infos)))
        consumed = np.zeros(len(infos), np.int64)  # rows of each shard written so far
        ok = 0
        for s in range(0, len(order), out_schema.ROW_GROUP_SIZE):
            sh, lo = shard[s : s + out_schema.ROW_GROUP_SIZE], local[s : s + out_schema.ROW_GROUP_SIZE]
            counts = np.bincount(sh, minlength=len(infos))
            base = np.concatenate([[0], np.cumsum(counts)[:-1]])  # where each shard's rows start in `pieces`
            # Each shard is in path order, so this chunk takes the next counts[i] rows of shard i, in order.
            pieces = pa.concat_tables(
                [readers[i].read(int(consumed[i]), int(counts[i])) for i in range(len(infos)) if counts[i]]
            )
            chunk = pieces.take(pa.array(base[sh] + lo - consumed[sh]))
            writer.write(chunk)
            ok += out_schema.count_ok(chunk)
            consumed += counts
        files = len(order)
        for r in readers:
            r.close()
        tagged = sum(int(i.metadata.get(out_schema.META_TAGGED, i.metadata.get(out_schema.META_FILES, "0"))) for i in infos)
        reused = sum(int(i.metadata.get(out_schema.META_REUSED, "0")) for i in infos)
        resumed = sum(int(i.metadata.get(out_schema.META_RESUMED, "0")) for i in infos)
        unlistable = sum(int(i.metadata.get(out_schema.META_UNLISTABLE, "0")) for i in infos)
        writer.commit(out_schema.closing_metadata(files, ok, tagged, reused, resumed, unlistable=unlistable))
    log.info("merged %d shards into %s: %d files", len(infos), redact(out), files)
    return MergeSummary(out, len(infos), files, ok, files - ok)


__all__ = ["MergeSummary", "Shard", "check_shard_output", "merge_shards", "shard_of"]
