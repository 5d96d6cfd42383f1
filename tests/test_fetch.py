"""fetch's read-ahead window and budget's leases, on objects in a real S3 server (moto_server on 127.0.0.1)."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from PIL import Image

from tagger.contract import PreprocessSpec
from tagger.pipeline.budget import DecodeMemory, DecodeMemoryError, Lease
from tagger.pipeline.discover import ImageRef, discover
from tagger.pipeline.fetch import FetchWindow
from tagger.pipeline.image import load_image

LIMIT = 100_000  # bytes of budget: half of it (50,000) is what reads ahead may hold


def _objects(bucket: str, tmp_path: Path, sizes: list[int], first: bytes | None = None) -> list[ImageRef]:
    """One object per size (its bytes: its index repeated, or `first` for the first), listed as the run lists them:
    sizes from the listing."""
    root = tmp_path / "objects"
    root.mkdir()
    for i, n in enumerate(sizes):
        (root / f"{i:02d}.jpg").write_bytes(first if i == 0 and first is not None else bytes([i]) * n)
    if first is not None:
        sizes = [len(first), *sizes[1:]]
    fs, key = pafs.FileSystem.from_uri(f"{bucket}/cat?allow_delayed_open=true")
    pafs.copy_files(str(root), key, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    refs = list(discover(f"{bucket}/cat"))
    assert [r.size for r in refs] == sizes
    return refs


def _room(memory: DecodeMemory) -> int:
    """What reads ahead could still hold now: the largest n hold_ahead takes (given back at once)."""
    lo, hi = 0, memory.limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if memory.hold_ahead(mid):
            memory.release(mid)
            lo = mid
        else:
            hi = mid - 1
    return lo


def test_the_window_reads_in_order_ahead_of_its_decoder_and_gives_the_budget_back(
    bucket: str, tmp_path: Path
) -> None:
    sizes = [1000 + 100 * i for i in range(8)]
    refs = _objects(bucket, tmp_path, sizes)
    memory = DecodeMemory(LIMIT)
    lease = Lease(memory)
    window = FetchWindow(refs, 3, lease)
    assert _room(memory) == LIMIT // 2 - sum(sizes[:3])  # three reads out, each holding its size
    for i, ref in enumerate(refs):
        future = window.take(i)
        assert future is not None and future.result() == bytes([i]) * sizes[i]
        assert lease.held == sizes[i]  # the read's share passed to the decoder
        out = sizes[i + 1 : i + 4]  # the next three, sent as this one was taken
        assert _room(memory) == LIMIT // 2 - sizes[i] - sum(out)
        lease.release()
    window.close()
    assert _room(memory) == LIMIT // 2  # the whole budget is free again


def test_an_object_over_half_the_budget_waits_its_turn_and_the_ones_after_it_with_it(
    bucket: str, tmp_path: Path
) -> None:
    sizes = [10_000, 60_000, 10_000, 10_000, 150_000, 10_000]
    refs = _objects(bucket, tmp_path, sizes)
    memory = DecodeMemory(LIMIT)
    lease = Lease(memory)
    window = FetchWindow(refs, 4, lease)
    assert _room(memory) == LIMIT // 2 - 10_000  # only the first is out: the 60 KB one does not fit
    assert window.take(0) is not None and lease.held == 10_000
    lease.release()
    big = window.take(1)  # read by the decoder itself, its size held in the lease first
    assert big is not None and big.result() == bytes([1]) * 60_000 and lease.held == 60_000
    assert _room(memory) == 0  # 60 KB held: no read ahead may take any of the half kept for decodes
    lease.release()
    for i in (2, 3):  # they waited behind it, and go out once it is done
        future = window.take(i)
        assert future is not None and future.result() == bytes([i]) * 10_000
        lease.release()
    too_big = window.take(4)  # more than the whole budget: its row's error, and nothing held
    assert too_big is not None and isinstance(too_big.exception(), DecodeMemoryError)
    assert str(too_big.exception()).startswith("a 146.5 KiB object needs ~146.5 KiB to decode, more than")
    assert lease.held == 0
    last = window.take(5)
    assert last is not None and last.result() == bytes([5]) * 10_000
    lease.release()
    window.close()
    assert _room(memory) == LIMIT // 2


def test_closing_the_window_early_gives_back_what_unread_objects_hold(bucket: str, tmp_path: Path) -> None:
    refs = _objects(bucket, tmp_path, [2000] * 6)
    memory = DecodeMemory(LIMIT)
    window = FetchWindow(refs, 4, Lease(memory))
    assert _room(memory) == LIMIT // 2 - 4 * 2000
    window.close()
    assert _room(memory) == LIMIT // 2


def test_local_files_are_not_read_ahead(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"x" * 500)
    refs = list(discover(tmp_path))
    memory = DecodeMemory(LIMIT)
    window = FetchWindow(refs, 4, Lease(memory))
    assert window.take(0) is None and _room(memory) == LIMIT // 2
    window.close()


def test_a_decode_holds_its_estimate_in_its_lease_and_none_without_one(tmp_path: Path) -> None:
    Image.new("RGB", (60, 80), (9, 9, 9)).save(tmp_path / "a.png")
    spec = PreprocessSpec(size=32)
    memory = DecodeMemory(LIMIT)
    lease = Lease(memory)
    lease.adopt(1000)  # what its bytes, read ahead, held: kept, and added to
    load_image(tmp_path / "a.png", spec, 10**6, lease)
    assert lease.held == 1000 + 60 * 80 * (4 + 4)  # RGB as Pillow holds it, and the RGB copy
    memory.acquire(LIMIT - lease.held, "all the rest")  # the budget is now full
    load_image(tmp_path / "a.png", spec, 10**6)  # no lease: no budget, no wait
    too_small = "^60x80 needs ~37.5 KiB to decode, more than --decode-memory 1000 bytes$"
    with pytest.raises(DecodeMemoryError, match=too_small):
        load_image(tmp_path / "a.png", spec, 10**6, Lease(DecodeMemory(1000)))


def test_a_decode_over_half_the_budget_gets_the_room_its_own_reads_ahead_hold(bucket: str, tmp_path: Path) -> None:
    """A PNG whose decoding needs 64,000 of the 100,000 bytes, then ten 4,500-byte objects read ahead of it: the
    reads ahead (45,000, within their half) leave too little room, and only this decoder would ever take them. It
    gives their share back (they are read again at their turn) instead of waiting for itself."""
    buf = io.BytesIO()
    Image.new("RGB", (100, 80), (9, 9, 9)).save(buf, "PNG")  # 8,000 pixels: 4 bytes each in Pillow, 4 in the copy
    refs = _objects(bucket, tmp_path, [4500] * 11, first=buf.getvalue())
    memory = DecodeMemory(LIMIT)
    lease = Lease(memory)
    window = FetchWindow(refs, 16, lease)
    assert _room(memory) == LIMIT // 2 - refs[0].size - 45_000  # all eleven out
    first = window.take(0)
    assert first is not None
    decoded: list[tuple[Image.Image, int, int]] = []
    # A daemon thread: were the decode to wait forever again, the test fails instead of hanging the suite.
    decoder = threading.Thread(
        target=lambda: decoded.append(load_image(first.result(), PreprocessSpec(size=32), 10**6, lease)), daemon=True
    )
    decoder.start()
    decoder.join(timeout=30)
    assert decoded and decoded[0][1:] == (100, 80), "the decode still waits for its own reads ahead"
    assert lease.held == refs[0].size + 64_000
    lease.release()
    for i in range(1, 11):  # read again, in order, at their turn
        future = window.take(i)
        assert future is not None and future.result() == bytes([i]) * 4500
        lease.release()
    window.close()
    assert _room(memory) == LIMIT // 2


def test_no_window_reads_ahead_while_a_decode_over_half_the_budget_waits(bucket: str, tmp_path: Path) -> None:
    """Another decoder's window holds 45,000 bytes of reads ahead when a 64,000-byte decode starts waiting: as that
    decoder takes its files it sends no new reads, so the decode gets room after two files, not after all twenty."""
    refs = _objects(bucket, tmp_path, [4500] * 20)
    memory = DecodeMemory(LIMIT)
    other = Lease(memory)
    window = FetchWindow(refs, 10, other)
    png = tmp_path / "big.png"
    Image.new("RGB", (100, 80), (9, 9, 9)).save(png)  # needs 64,000 bytes, as above
    decoded: list[tuple[Image.Image, int, int]] = []
    lease = Lease(memory)
    decoder = threading.Thread(
        target=lambda: decoded.append(load_image(png, PreprocessSpec(size=32), 10**6, lease)), daemon=True
    )
    decoder.start()
    decoder.join(timeout=0.5)
    assert not decoded  # 55,000 free: it waits
    taken = 0
    while not decoded and taken < len(refs):
        future = window.take(taken)
        assert future is not None and future.result() == bytes([taken]) * 4500
        other.release()
        taken += 1
        decoder.join(timeout=2)
    assert decoded and taken == 2, taken  # 55,000 + 2 x 4,500 >= 64,000
    lease.release()
    for i in range(taken, len(refs)):  # the window goes on once it is done
        future = window.take(i)
        assert future is not None and future.result() == bytes([i]) * 4500
        other.release()
    window.close()
    assert _room(memory) == LIMIT // 2
