"""The bench's CPU-time sampler (``bench.cpu_sampler``, ``bench.profile_service --cpu``):
installed in a process, it samples only between SIGUSR1 and SIGUSR2, counts the CPU a busy
function spends (not wall time: a sleeping process gets no samples), and writes the
collapsed stacks and the garbage collector's time when told to stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from bench import ROOT

_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from bench.cpu_sampler import install

    install(Path(sys.argv[1]))

    def idle_before():
        time.sleep(0.3)  # sampled? it must not be: no CPU spent

    def busy_spin():
        end = time.process_time() + 0.4
        while time.process_time() < end:
            cycle = []
            cycle.append(cycle)  # garbage only a collection frees: collections happen

    def idle_after():
        time.sleep(0.3)

    print("ready", flush=True)
    sys.stdin.readline()  # the test sent SIGUSR1 before this line
    idle_before()
    busy_spin()
    idle_after()
    print("done", flush=True)
    sys.stdin.readline()  # the test sent SIGUSR2 before this line
    """
)


_WORKER_CHILD = textwrap.dedent(
    """
    import sys, threading, time
    from pathlib import Path
    from bench.cpu_sampler import install

    install(Path(sys.argv[1]))

    def worker_spin():
        end = time.thread_time() + 0.4
        while time.thread_time() < end:
            pass

    def wait_for_worker():
        worker = threading.Thread(target=worker_spin)
        worker.start()
        worker.join()  # the main thread sleeps: the worker's CPU raises the signals

    print("ready", flush=True)
    sys.stdin.readline()  # the test sent SIGUSR1 before this line
    wait_for_worker()
    print("done", flush=True)
    sys.stdin.readline()  # the test sent SIGUSR2 before this line
    """
)

_GC_CHILD = textwrap.dedent(
    """
    import gc, json, signal, sys
    from pathlib import Path
    from bench.cpu_sampler import install

    out = Path(sys.argv[1])
    install(out)
    start, stop = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGUSR2)

    def start_inside(phase, info):  # after the sampler's callback: its start is not seen
        if phase == "start":
            start()

    gc.callbacks.append(start_inside)
    gc.collect()
    gc.callbacks.remove(start_inside)
    stop()
    """
)


def _sampled(tmp_path: Path, child_code: str) -> tuple[dict[str, int], dict[str, Any]]:
    """Runs ``child_code`` with the sampler on between its "ready" and "done": its stacks'
    counts and its ``.gc`` record."""
    out = tmp_path / "stacks.txt"
    with subprocess.Popen(
        [sys.executable, "-c", child_code, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_ENV,
        cwd=ROOT,
    ) as child:
        assert child.stdin is not None and child.stdout is not None
        try:
            assert child.stdout.readline().strip() == "ready"
            os.kill(child.pid, signal.SIGUSR1)
            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "done"
            os.kill(child.pid, signal.SIGUSR2)
            child.stdin.write("end\n")
            child.stdin.flush()
            assert child.wait(timeout=30) == 0
        finally:
            if child.poll() is None:
                child.kill()
    return _counts(out), json.loads(Path(f"{out}.gc").read_text())


def _counts(out: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in out.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        counts[stack] = int(n)
    return counts


_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}


def test_samples_cpu_between_the_signals(tmp_path: Path) -> None:
    counts, found = _sampled(tmp_path, _CHILD)
    busy = sum(n for stack, n in counts.items() if "busy_spin (" in stack)
    idle = sum(n for stack, n in counts.items() if "idle_" in stack.split(";")[-1])
    # 0.4 s of CPU, counted in ms: about 400, nearly all in the spin.
    assert busy >= 300
    assert idle <= busy // 10
    assert all(stack.startswith("<module> (<string>:") for stack in counts)
    assert found["collections"][0] > 0
    assert 0.0 < found["seconds"] < 0.4
    assert not list(tmp_path.glob("*.tmp"))  # written through temporary files, renamed


def test_counts_a_worker_threads_cpu(tmp_path: Path) -> None:
    """The worker's ticks raise signals the main thread handles once, when the join returns:
    one sample, weighted by the CPU since the last one, not one count."""
    counts, _ = _sampled(tmp_path, _WORKER_CHILD)
    waiting = sum(n for stack, n in counts.items() if "wait_for_worker (" in stack)
    assert waiting >= 300  # 0.4 s of the worker's CPU, in ms
    assert sum(counts.values()) < 600


def test_a_collection_running_when_sampling_starts_is_not_counted(tmp_path: Path) -> None:
    out = tmp_path / "stacks.txt"
    ran = subprocess.run(
        [sys.executable, "-c", _GC_CHILD, str(out)], env=_ENV, cwd=ROOT, timeout=30, check=False
    )
    assert ran.returncode == 0
    assert json.loads(Path(f"{out}.gc").read_text()) == {"seconds": 0.0, "collections": [0, 0, 0]}
