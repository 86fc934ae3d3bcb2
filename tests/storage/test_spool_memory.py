"""The process's memory for uploads used once: blocks, readers, the budget."""

from __future__ import annotations

import mmap
import sys
import threading
from typing import IO

import pytest

from aiserver import spool_memory
from aiserver.spool_memory import BLOCK_BYTES, HeldBytes, SpoolMemory


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
            assert a.add(b"A" * 2 * BLOCK_BYTES)
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
            b.add(b"B" * 2 * BLOCK_BYTES)  # reuses a's blocks if they were given back
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
    assert held.add(b"x" * (BLOCK_BYTES + 1))
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
