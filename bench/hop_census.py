"""Per job: thread hops, SQLite write transactions and fsyncs of the service.

    python -m bench.hop_census [--jobs 400] [--concurrency 16] [--agents bench.fast_agent]

The orchestration path of :mod:`bench.profile_service` (instant agents in their own process,
the service in its own, SQLite, gRPC ImageUpscale SYNC + references). The service process
counts (``BENCH_HOP_CENSUS``, installed by :mod:`bench.service_proc`): each
``ThreadPoolExecutor.submit`` (``run_in_executor``, ``to_thread``) and each thread started,
by the innermost ``aiserver`` frame that asked; each SQLite write transaction per database
file (``BEGIN`` ... ``COMMIT``, or one write statement in autocommit), its statements, WAL
checkpoints; ``os.fsync``/``os.fdatasync`` called from Python. ``strace -c`` attached for the
measured segment counts every ``fsync``/``fdatasync`` system call of the process (SQLite's
own included), and with them every other system call of the process (per job); each loop
callback run (``Handle._run``: a task's step or wake-up, by its coroutine, or the function)
is counted too. ``--tree`` runs another source tree's service (an exported ``main`` with
this file copied in). Counts are reset after the warm-up (``SIGUSR1``) and written on ``SIGUSR2``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import re
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

_COUNTS: dict[str, Counter[str]] = {}
_LOCK = threading.Lock()
_WRITE = re.compile(r"\s*(INSERT|UPDATE|DELETE|REPLACE)\b", re.IGNORECASE)


def _count(table: str, key: str, n: int = 1) -> None:
    with _LOCK:
        _COUNTS.setdefault(table, Counter())[key] += n


def _asker(depth: int = 3) -> str:
    """The innermost ``aiserver`` frames above the hook (file:function < its callers)."""
    frame: Any = sys._getframe(2)
    found: list[str] = []
    while frame is not None and len(found) < depth:
        name = frame.f_code.co_filename
        if "/aiserver/" in name:
            short = name.split("/aiserver/", 1)[1]
            found.append(f"{short}:{frame.f_code.co_name}")
        frame = frame.f_back
    return " < ".join(found) or "(no aiserver frame)"


def install(out: Path) -> None:
    """Hooks in the service process; counts go to ``out`` on SIGUSR2, reset on SIGUSR1."""
    submit = ThreadPoolExecutor.submit

    def counted_submit(self: ThreadPoolExecutor, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        _count("hops", _asker())
        return submit(self, fn, *args, **kwargs)

    ThreadPoolExecutor.submit = counted_submit  # type: ignore[method-assign]

    start = threading.Thread.start

    def counted_start(self: threading.Thread) -> None:
        _count("threads", f"{_asker()} ({self.name.split('-')[0]})")
        start(self)

    threading.Thread.start = counted_start  # type: ignore[method-assign]

    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def counted_sync(fd: int, _real: Any = real, _name: str = name) -> None:
            _count("fsyncs", f"{_asker()} ({_name})")
            _real(fd)

        setattr(os, name, counted_sync)

    connect = sqlite3.connect

    def counted_connect(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = connect(database, *args, **kwargs)
        label = Path(str(database)).name
        state = {"open": False}

        def trace(sql: str) -> None:
            head = sql.lstrip()[:24].upper()
            _count("statements", label)
            if head.startswith("BEGIN"):
                state["open"] = True
                _count("transactions", label)
            elif head.startswith(("COMMIT", "ROLLBACK", "END")):
                state["open"] = False
            elif "WAL_CHECKPOINT" in sql.upper():
                _count("checkpoints", label)
            elif not state["open"] and _WRITE.match(sql):
                _count("transactions", label)

        conn.set_trace_callback(trace)
        return conn

    sqlite3.connect = counted_connect  # type: ignore[assignment]

    def reset(*_: object) -> None:
        with _LOCK:
            _COUNTS.clear()

    def dump(*_: object) -> None:
        with _LOCK:
            out.write_text(json.dumps({k: dict(v) for k, v in _COUNTS.items()}))

    run = asyncio.events.Handle._run

    def counted_run(self: asyncio.Handle) -> None:
        _count("callbacks", _callback_name(self._callback))  # type: ignore[attr-defined]
        run(self)

    asyncio.events.Handle._run = counted_run  # type: ignore[method-assign]

    signal.signal(signal.SIGUSR1, reset)
    signal.signal(signal.SIGUSR2, dump)


def _callback_name(callback: Any) -> str:
    """A loop callback: a task's step or wake-up by the task's coroutine, else the function."""
    if isinstance(callback, functools.partial):
        return f"partial({_callback_name(callback.func)})"
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro: Any = owner.get_coro()
        name = getattr(coro, "__qualname__", type(coro).__name__)
        return f"task {name}"
    module = getattr(callback, "__module__", None) or type(owner).__module__
    name = getattr(callback, "__qualname__", None) or type(callback).__name__
    return f"{module}.{name}"


async def _census(jobs: int, concurrency: int, module: str, tree: Path | None) -> str:
    import grpc

    from bench import ROOT
    from bench.orchestration import Inputs, _segment, _service_job, _wait_ready
    from bench.service_proc import ServiceProcess, service_env
    from bench.standin_proc import StandIns

    tmp = Path(tempfile.mkdtemp(prefix="bench-hop-census-"))
    out = tmp / "counts.json"
    try:
        async with StandIns(4, tmp / "comfy", module=module) as agents:
            env = service_env(tmp / "service", agents.urls, BENCH_HOP_CENSUS=str(out))
            root = tree or ROOT
            async with ServiceProcess(env, tmp / "service.log", root) as service:
                inputs = Inputs()
                async with grpc.aio.insecure_channel(service.target) as channel:
                    await _wait_ready(channel)
                    job = _service_job(channel)
                    await _segment(job, 4, inputs.take(16))  # warm-up
                    pngs = inputs.take(jobs)
                    strace = await asyncio.create_subprocess_exec(
                        "strace", "-f", "-c",
                        "-p", str(service.pid), "-o", str(tmp / "strace.txt"),
                        stdout=asyncio.subprocess.DEVNULL,
                        stderr=asyncio.subprocess.DEVNULL,
                    )  # fmt: skip
                    await asyncio.sleep(1.0)  # strace attaches to every thread
                    os.kill(service.pid, signal.SIGUSR1)
                    got = await _segment(job, concurrency, pngs)
                    os.kill(service.pid, signal.SIGUSR2)
                    strace.send_signal(signal.SIGINT)
                    await strace.wait()
                    for _ in range(50):
                        if out.exists():
                            break
                        await asyncio.sleep(0.1)
        done = len(got["latencies"])
        counts: dict[str, dict[str, int]] = json.loads(out.read_text())
        syscalls = _strace_counts(tmp / "strace.txt")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [
        f"hop census: {done} jobs ({len(got['failed'])} failed), {concurrency} callers,"
        f" 4 agents ({module}), gRPC ImageUpscale SYNC + references, SQLite; per job:"
    ]
    tables = ("hops", "threads", "transactions", "statements", "checkpoints", "fsyncs")
    for table in (*tables, "callbacks"):
        entries = counts.get(table, {})
        total = sum(entries.values())
        lines.append(f"{table}: {total / max(done, 1):.2f}")
        for key, n in sorted(entries.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {n / max(done, 1):6.2f}  {key}")
    lines.append(f"system calls (strace -c -f): {sum(syscalls.values()) / max(done, 1):.1f}")
    for name, n in sorted(syscalls.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {n / max(done, 1):6.2f}  {name}")
    return "\n".join(lines)


def _strace_counts(path: Path) -> dict[str, int]:
    found: dict[str, int] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[3].isdigit() and parts[-1] != "total":
            found[parts[-1]] = int(parts[3])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--agents", default="bench.fast_agent")
    parser.add_argument(
        "--tree", type=Path, help="another source tree's service (its bench/hop_census.py counts)"
    )
    args = parser.parse_args()
    print(asyncio.run(_census(args.jobs, args.concurrency, args.agents, args.tree)))


if __name__ == "__main__":
    main()
