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


def test_samples_cpu_between_the_signals(tmp_path: Path) -> None:
    out = tmp_path / "stacks.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
    with subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
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
    counts: dict[str, int] = {}
    for line in out.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        counts[stack] = int(n)
    busy = sum(n for stack, n in counts.items() if "busy_spin (" in stack)
    idle = sum(n for stack, n in counts.items() if "idle_" in stack.split(";")[-1])
    # 0.4 s of CPU at one sample per tick (1-10 ms): tens of samples, nearly all in the spin.
    assert busy >= 20
    assert idle <= busy // 10
    assert all(stack.startswith("<module> (<string>:") for stack in counts)
    found = json.loads(Path(f"{out}.gc").read_text())
    assert found["collections"][0] > 0
    assert 0.0 < found["seconds"] < 0.4
