"""A sampler of the service process's CPU time, for :mod:`bench.profile_service` ``--cpu``.

py-spy samples the wall time of the thread holding the GIL: a system call that waits on a
busy core (a loopback ``sendmsg`` whose receiver preempts the sender) counts as busy, so its
shares are not CPU shares (``sendmsg`` 25% of py-spy's ``--native`` samples against 2% of
``perf``'s CPU samples). This sampler counts CPU instead: ``ITIMER_PROF`` fires each time the
process (all its threads) has used one interval of CPU, and the Python handler records the
main thread's stack, weighted by the process CPU used since the previous sample.
Installed by :mod:`bench.service_proc` when ``BENCH_CPU_SAMPLES=FILE``; ``SIGUSR1`` starts
sampling, ``SIGUSR2`` stops it and writes the collapsed stacks to ``FILE`` (``frame;frame;...
count``, py-spy's format; a count is milliseconds of the whole process's CPU) and the garbage
collector's time over the same span to ``FILE.gc`` (JSON: main-thread CPU seconds in
collections, collections per generation), each through a temporary file and a rename,
``FILE.gc`` last, so a reader that sees it sees both whole.

How to read it: the kernel delivers the timer in ticks (4 ms here: ``HZ=250``), so a stack is
seen about once per tick of CPU and counted as that tick's milliseconds; and Python runs the
handler only on the main thread, where it next checks for signals (a function's entry, a
loop's back edge, a resumed coroutine). CPU spent in C with no Python frame in between (grpc
aio's Cython callbacks, a Future's callbacks, a task's deallocation) lands on ``Handle._run``
or on the first Python function entered after it (``call_soon``, ``create_future``,
``WeakSet._remove``). CPU of other threads (grpc's poller, an ``asyncio.to_thread`` worker)
raises signals the main thread handles once when it next wakes: the weight counts that CPU,
but it lands on whatever the main thread is doing then (often the event loop's ``select`` or
the ``await`` of that worker). Read a subtree's total, not a leaf.
"""

from __future__ import annotations

import gc
import json
import signal
import time
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

INTERVAL_S = 0.001  # asked for; the kernel rounds it up to its tick


def _frame_name(frame: FrameType) -> str:
    code = frame.f_code
    name = code.co_filename
    for marker in ("site-packages/", "/src/", "python3.11/", "python3.12/"):
        if marker in name:
            name = name.split(marker, 1)[1]
            break
    return f"{code.co_name} ({name}:{frame.f_lineno})"


def _replace(path: Path, text: str) -> None:
    """Writes ``path`` so that it appears with all of ``text`` or not at all."""
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def install(out: Path) -> None:
    """Hooks in the service process: SIGUSR1 starts sampling, SIGUSR2 writes ``out``."""
    stacks: Counter[str] = Counter()
    on = [False]
    last = [0.0]  # process CPU at the previous sample
    collecting: dict[str, Any] = {"seconds": 0.0, "started": 0.0, "seen": False}
    collections = [0, 0, 0]

    def sample(_signum: int, frame: FrameType | None) -> None:
        if not on[0]:
            return
        # One handler run may stand for many signals (a worker thread's CPU, while the main
        # thread slept, collapses into one): weigh it by the CPU used since the last one.
        now = time.process_time()
        weight = max(1, round((now - last[0]) / INTERVAL_S))
        last[0] = now
        names: list[str] = []
        while frame is not None:
            names.append(_frame_name(frame))
            frame = frame.f_back
        stacks[";".join(reversed(names))] += weight

    def collected(phase: str, info: dict[str, Any]) -> None:
        # A collection running when sampling starts is not counted: its start was not seen
        # with sampling on, so its time would run from an older collection's start.
        if phase == "start":
            collecting["started"] = time.thread_time()
            collecting["seen"] = on[0]
        elif on[0] and collecting["seen"]:
            collecting["seconds"] += time.thread_time() - collecting["started"]
            collections[info["generation"]] += 1

    def start(*_: object) -> None:
        stacks.clear()
        collecting["seconds"] = 0.0
        collections[:] = [0, 0, 0]
        last[0] = time.process_time()
        on[0] = True
        signal.setitimer(signal.ITIMER_PROF, INTERVAL_S, INTERVAL_S)

    def stop(*_: object) -> None:
        on[0] = False
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        gc_text = json.dumps({"seconds": collecting["seconds"], "collections": collections})
        # The reader waits for FILE.gc to exist: write both whole (temp, rename), it last.
        _replace(out, "".join(f"{stack} {n}\n" for stack, n in stacks.items()))
        _replace(Path(f"{out}.gc"), gc_text)

    gc.callbacks.append(collected)
    signal.signal(signal.SIGPROF, sample)
    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
