"""The start-up heap is frozen for the garbage collector (``aiserver.heap.settle``): garbage
left by start-up is collected first, the live objects leave the collector's passes, and
``aiserver serve`` does it once it has started (and keeps freed memory for uploads)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

_CHILD = textwrap.dedent(
    """
    import gc, weakref
    from aiserver import heap

    class Node:
        pass

    garbage = Node()
    garbage.me = garbage  # a cycle: only a collection frees it
    gone = weakref.ref(garbage)
    del garbage
    kept = [Node() for _ in range(1000)]
    assert gc.get_freeze_count() == 0
    frozen = heap.settle()
    assert gone() is None, "start-up garbage was frozen instead of collected"
    assert frozen == gc.get_freeze_count() > 1000
    # A full pass no longer sees them: what it tracks is only what came after.
    assert not any(isinstance(o, list) and o is kept for o in gc.get_objects())
    print("ok", frozen)
    """
)


def test_settle_collects_then_freezes() -> None:
    found = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=60, check=False
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.startswith("ok ")


async def test_serve_freezes_the_heap_once_started(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "AISERVER_DATA_DIR": str(tmp_path),
        "AISERVER_GRPC_PORT": "0",
        "AISERVER_HTTP_PORT": "0",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aiserver", "serve", env=env, stderr=subprocess.PIPE
    )
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(30):
            # The malloc setting comes after the freeze (tests/test_heap_malloc.py).
            while not any("malloc keeps up to 64 MiB freed" in line for line in lines):
                line = (await proc.stderr.readline()).decode()
                assert line, "the server exited: " + "".join(lines)
                lines.append(line)
        assert any("frozen for the garbage collector" in line for line in lines)
        listening = [i for i, line in enumerate(lines) if "listening on" in line]
        assert listening and listening[-1] < len(lines) - 1  # after start-up, not before
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            await proc.stderr.read()
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
