"""The process's memory for uploads used once: blocks, readers, the budget."""

from __future__ import annotations

import mmap
import sys
import threading
from typing import IO

import pytest

from aiserver import spool_memory
from aiserver.spool_memory import BLOCK_BYTES, KEEP_BYTES, HeldBytes, SpoolMemory


def test_a_reader_left_open_by_a_cancelled_call_never_reads_another_uploads_bytes() -> None:
    # The loop releases the upload (its call was cancelled) while the image worker still
    # reads it; a second upload then takes free blocks and fills them with b"B".
    memory = SpoolMemory(64 * BLOCK_BYTES, share=64 * BLOCK_BYTES)  # freed blocks are kept
    seen: list[bytes] = []
    errors: list[BaseException] = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        for _ in range(1500):
            a = HeldBytes(memory)
            assert a.add(bytearray(b"A" * 2 * BLOCK_BYTES))  # copied into blocks
            reader = a.open()
            started, stop = threading.Event(), threading.Event()

            def read_loop(
                fh: IO[bytes] = reader,
                started: threading.Event = started,
                stop: threading.Event = stop,
            ) -> None:
                started.set()
                while not stop.is_set():
                    fh.seek(BLOCK_BYTES - 8)
                    try:
                        data = fh.read(16)  # across the block edge
                    except ValueError:  # released: a cancelled worker stops here
                        continue
                    except BaseException as exc:
                        errors.append(exc)
                        return
                    if data != b"A" * 16:
                        seen.append(data)

            thread = threading.Thread(target=read_loop)
            thread.start()
            started.wait()
            a.release()
            b = HeldBytes(memory)
            b.add(bytearray(b"B" * 2 * BLOCK_BYTES))  # reuses a's blocks if they were given back
            stop.set()
            thread.join()
            assert memory.used == 4 * BLOCK_BYTES or not b.size  # a's blocks still counted
            reader.close()
            b.release()
            assert memory.used == 0
    finally:
        sys.setswitchinterval(interval)
    assert errors == [] and seen == []


def test_blocks_go_back_when_the_last_reader_closes() -> None:
    memory = SpoolMemory(16 * BLOCK_BYTES)
    held = HeldBytes(memory)
    assert held.add(bytearray(BLOCK_BYTES + 1))  # mutable: copied into blocks
    first, second = held.open(), held.open()
    held.release()
    assert memory.used == 2 * BLOCK_BYTES  # still read
    with pytest.raises(ValueError):
        first.read(1)  # released: the worker stops early
    with pytest.raises(ValueError):
        held.open()
    first.close()
    first.close()  # twice is harmless: no double give
    assert memory.used == 2 * BLOCK_BYTES
    second.close()
    assert memory.used == 0
    held.release()  # idempotent
    assert memory.used == 0 and memory.kept == 2 * BLOCK_BYTES
    with pytest.raises(ValueError):
        second.read(1)  # closed


def test_take_reuses_the_free_blocks_it_has_even_when_it_needs_more() -> None:
    memory = SpoolMemory(16 * BLOCK_BYTES, share=16 * BLOCK_BYTES)
    blocks = memory.take(2)
    assert blocks is not None
    memory.give(blocks)
    assert memory.kept == 2 * BLOCK_BYTES
    more = memory.take(3)
    assert more is not None and len(more) == 3
    assert memory.kept == 0 and memory.used == 3 * BLOCK_BYTES
    assert {id(b) for b in blocks} <= {id(b) for b in more}
    memory.give(more)
    assert memory.used == 0


def test_a_failed_map_gives_the_budget_and_the_blocks_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    memory = SpoolMemory(16 * BLOCK_BYTES, share=16 * BLOCK_BYTES)
    kept = memory.take(1)
    assert kept is not None
    memory.give(kept)
    real = mmap.mmap
    made: list[int] = []

    def one_then_fail(*args: object, **kwargs: object) -> mmap.mmap:
        if made:
            raise OSError(12, "Cannot allocate memory")
        made.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(spool_memory.mmap, "mmap", one_then_fail)
    with pytest.raises(OSError):
        memory.take(4)  # reuses one, maps one, fails on the next
    monkeypatch.undo()
    assert memory.used == 0
    assert memory.kept == 2 * BLOCK_BYTES  # the reused block and the new one are kept
    again = memory.take(16)
    assert again is not None and len(again) == 16
    memory.give(again)


def test_received_bytes_are_kept_without_a_copy_and_counted_whole() -> None:
    memory = SpoolMemory(16 * BLOCK_BYTES)
    held = HeldBytes(memory)
    message = b"h" * 30 + bytes(range(256)) * 4096  # a wire message: a header, then 1 MiB
    chunk = memoryview(message)[30:]
    assert held.add(chunk)
    assert held.views()[0].obj is message  # kept, not copied
    assert memory.used == len(message)  # what the view keeps alive
    assert memory.kept == 0  # no block taken
    with held.open() as fh:
        assert fh.read() == bytes(chunk)
    held.release()
    assert memory.used == 0 and held.views() == []


def test_mutable_buffers_and_small_slices_of_large_objects_are_copied() -> None:
    memory = SpoolMemory(64 * BLOCK_BYTES)
    held = HeldBytes(memory)
    buffer = bytearray(b"a" * KEEP_BYTES)
    big = b"b" * (4 * KEEP_BYTES)
    assert held.add(buffer)  # a reader's buffer reused after: must not be kept
    assert held.add(memoryview(big)[:KEEP_BYTES])  # would keep 4x what it holds
    buffer[:] = b"z" * KEEP_BYTES
    assert held.tobytes() == b"a" * KEEP_BYTES + b"b" * KEEP_BYTES
    assert all(not isinstance(v.obj, bytes) for v in held.views())
    assert memory.used == BLOCK_BYTES  # both in one block
    held.release()
    assert memory.used == 0


def test_kept_and_copied_chunks_read_back_in_order_across_every_edge() -> None:
    memory = SpoolMemory(64 * BLOCK_BYTES)
    held = HeldBytes(memory)
    chunks = [
        bytes([1]) * 1000,
        bytes([2]) * KEEP_BYTES,  # kept
        bytes([3]) * 10,  # a block of its own after a kept chunk
        bytearray([4]) * (BLOCK_BYTES - 5),  # fills that block, then the next
        bytes([5]) * (3 * KEEP_BYTES),  # kept
        bytes([6]) * 7,
    ]
    for c in chunks:
        assert held.add(c)
    whole = b"".join(chunks)
    assert held.size == len(whole) and held.tobytes() == whole
    with held.open() as fh:
        for start in (0, 999, 1000, 1000 + KEEP_BYTES - 3, BLOCK_BYTES, len(whole) - 9):
            for size in (1, 13, KEEP_BYTES + 20, BLOCK_BYTES * 2):
                fh.seek(start)
                assert fh.read(size) == whole[start : start + size], (start, size)
        fh.seek(0)
        assert fh.read() == whole
    held.release()
    assert memory.used == 0


def test_kept_bytes_are_refused_past_the_budget() -> None:
    memory = SpoolMemory(4 * BLOCK_BYTES)
    held = HeldBytes(memory)
    assert held.add(b"x" * (3 * BLOCK_BYTES))
    assert not held.add(b"y" * (2 * BLOCK_BYTES))  # no room: nothing added
    assert held.size == 3 * BLOCK_BYTES and memory.used == 3 * BLOCK_BYTES
    held.release()
    assert memory.used == 0
