"""A sampler of the service process's CPU time, for :mod:`bench.profile_service` ``--cpu``.

py-spy samples the wall time of the thread holding the GIL: a system call that waits on a
busy core (a loopback ``sendmsg`` whose receiver preempts the sender) counts as busy, so its
shares are not CPU shares (``sendmsg`` 25% of py-spy's ``--native`` samples against 2% of
``perf``'s CPU samples). This sampler counts CPU instead: ``ITIMER_PROF`` fires each time the
process (all its threads) has used one interval of CPU, and the Python handler records the
main thread's stack. Installed by :mod:`bench.service_proc` when ``BENCH_CPU_SAMPLES=FILE``;
``SIGUSR1`` starts sampling, ``SIGUSR2`` stops it and writes the collapsed stacks to ``FILE``
(``frame;frame;... count``, py-spy's format) and the garbage collector's time over the same
span to ``FILE.gc`` (JSON: main-thread CPU seconds in collections, collections per
generation).

How to read it: the kernel delivers the timer in ticks (4 ms here: ``HZ=250``), so a sample
stands for about one tick of CPU; and Python runs the handler only where the main thread next
checks for signals (a function's entry, a loop's back edge, a resumed coroutine). CPU spent
in C with no Python frame in between (grpc aio's Cython callbacks, a Future's callbacks, a
task's deallocation) lands on ``Handle._run`` or on the first Python function entered after
it (``call_soon``, ``create_future``, ``WeakSet._remove``); CPU of other threads (grpc's
poller, a worker) lands wherever the main thread is. Read a subtree's total, not a leaf.
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


def install(out: Path) -> None:
    """Hooks in the service process: SIGUSR1 starts sampling, SIGUSR2 writes ``out``."""
    stacks: Counter[str] = Counter()
    on = [False]
    collecting = {"seconds": 0.0, "started": 0.0}
    collections = [0, 0, 0]

    def sample(_signum: int, frame: FrameType | None) -> None:
        if not on[0]:
            return
        names: list[str] = []
        while frame is not None:
            names.append(_frame_name(frame))
            frame = frame.f_back
        stacks[";".join(reversed(names))] += 1

    def collected(phase: str, info: dict[str, Any]) -> None:
        if not on[0]:
            return
        if phase == "start":
            collecting["started"] = time.thread_time()
        else:
            collecting["seconds"] += time.thread_time() - collecting["started"]
            collections[info["generation"]] += 1

    def start(*_: object) -> None:
        stacks.clear()
        collecting["seconds"] = 0.0
        collections[:] = [0, 0, 0]
        on[0] = True
        signal.setitimer(signal.ITIMER_PROF, INTERVAL_S, INTERVAL_S)

    def stop(*_: object) -> None:
        on[0] = False
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        gc_text = json.dumps({"seconds": collecting["seconds"], "collections": collections})
        Path(f"{out}.gc").write_text(gc_text)
        out.write_text("".join(f"{stack} {n}\n" for stack, n in stacks.items()))

    gc.callbacks.append(collected)
    signal.signal(signal.SIGPROF, sample)
    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
