"""Shared pieces of the benchmark scripts: statistics, result rows, a service on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import PIL
from PIL import Image, ImageDraw, ImageFilter

from bench import ROOT

RESULTS = ROOT / "bench" / "results"


# ---- statistics ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def spread(values: Sequence[float], digits: int = 3) -> dict[str, Any]:
    """Median of repeated runs with min, max and the runs themselves."""
    vals = [float(v) for v in values]
    return {
        "median": round(statistics.median(vals), digits),
        "min": round(min(vals), digits),
        "max": round(max(vals), digits),
        "n": len(vals),
        "runs": [round(v, digits) for v in vals],
    }


def num(x: float) -> str:
    """A figure for a table: no exponent, three significant digits or the whole number."""
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def ms(seconds: float) -> float:
    return seconds * 1000.0


# ---- result rows --------------------------------------------------------------------------


def row(
    metric: str,
    value: dict[str, Any] | None,
    unit: str,
    *,
    target: float | None = None,
    better: str = "higher",
    baseline: str = "",
    note: str = "",
) -> dict[str, Any]:
    """One line of the summary table. ``value`` is a :func:`spread`; None when skipped.

    ``better`` is ``higher`` (target is a floor) or ``lower`` (target is a ceiling).
    """
    status = "SKIP" if value is None else "INFO"
    score = None
    if value is not None and target is not None:
        v = value["median"]
        ok = v >= target if better == "higher" else v <= target
        status = "PASS" if ok else "MISS"
        if better == "higher":
            score = v / target if target else None
        else:
            score = target / v if v > 0 else math.inf
    return {
        "metric": metric,
        "value": value,
        "unit": unit,
        "target": target,
        "better": better,
        "status": status,
        "score": None if score is None or math.isinf(score) else round(score, 3),
        "baseline": baseline,
        "note": note,
    }


def machine() -> dict[str, Any]:
    import grpc

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "grpcio": grpc.__version__,
        "pillow": PIL.__version__,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


class LoadWatch:
    """Load average before and after a script, to say how noisy the machine was."""

    def __init__(self) -> None:
        self.before = os.getloadavg()[0]
        self.started = time.perf_counter()

    def done(self) -> dict[str, Any]:
        return {
            "load_1m_before": round(self.before, 2),
            "load_1m_after": round(os.getloadavg()[0], 2),
            "seconds": round(time.perf_counter() - self.started, 1),
        }


# ---- the service ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_settings(data_dir: Path, **overrides: Any) -> Any:
    from aiserver.config import load_settings

    base: dict[str, Any] = {
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "http_port": 0,
        "data_dir": data_dir,
    }
    base.update(overrides)
    return load_settings(env={}, overrides=base)


def ensure_comfy_provider(service: Any) -> str:
    """How the service reaches its ComfyUI agents.

    When the provider registry does not (yet) build a ComfyUI pool from ``settings.agents``,
    the bench adds one itself, built from the same settings, before the service starts.
    """
    from aiserver.providers.comfy.pool import ComfyPool
    from aiserver.providers.comfy.workflows import WorkflowCatalog
    from aiserver.tasks import TaskKind

    settings = service.settings
    if not settings.agents:
        return "none"
    if any(p.supports(TaskKind.IMAGE_UPSCALE) for p in service.providers):
        return "registry"
    pool = ComfyPool(
        list(settings.agents),
        WorkflowCatalog.load(user_dir=settings.workflows_dir),
    )
    service.providers.append(pool)
    return "bench-injected ComfyPool (the registry built none)"


@asynccontextmanager
async def running_service(data_dir: Path, **overrides: Any) -> AsyncIterator[Any]:
    """A :class:`aiserver.server.Service` on loopback, in this process."""
    from aiserver import heap
    from aiserver.server import Service

    service = Service(make_settings(data_dir, **overrides))
    service.provider_wiring = ensure_comfy_provider(service)  # type: ignore[attr-defined]
    # The process as `aiserver serve` sets it (process-wide, idempotent): uploads held in
    # memory are kept as received, which costs fresh pages per upload without it.
    heap.keep_freed_memory(service.spool.memory.share)
    await service.start()
    try:
        yield service
    finally:
        await service.stop(grace_s=1)


# ---- images ---------------------------------------------------------------------------------


def photo_like(width: int, height: int, seed: int = 1) -> Image.Image:
    """A synthetic image with photo-like statistics: smooth regions, texture and edges.

    (Flat colours would make every encoder look fast; pure noise would make them look slow.)
    """
    small = (max(8, width // 16), max(8, height // 16))
    bands = []
    for i, sigma in enumerate((60, 50, 40)):
        noise = Image.effect_noise(small, sigma).filter(ImageFilter.GaussianBlur(1.5 + i))
        bands.append(noise.resize((width, height), Image.Resampling.BICUBIC))
    img = Image.merge("RGB", bands)
    grain = Image.effect_noise((width, height), 12).convert("RGB")
    img = Image.blend(img, grain, 0.15)
    draw = ImageDraw.Draw(img)
    step = max(8, width // 12)
    for k in range(12):
        x = (k * 7919 * seed) % max(1, width - step)
        y = (k * 104729 * seed) % max(1, height - step)
        colour = ((k * 53) % 256, (k * 97) % 256, (k * 193) % 256)
        draw.rectangle((x, y, x + step, y + step // 2), outline=colour, width=max(1, step // 40))
        draw.ellipse((y % width, x % height, y % width + step, x % height + step), fill=colour)
    return img


def encode(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **params)
    return buffer.getvalue()


# ---- processes ------------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """CPU time of a process: all its threads, those that exited included, in ns.

    Read from the process's CPU-time clock (Linux's ``clock_getcpuclockid``: the kernel's
    sum of every thread's run time, exited ones kept in the process's totals), which
    ``time.clock_gettime`` reads for any process of ours. ``/proc/PID/stat``'s utime + stime
    are the same total in 10 ms ticks (a quick segment of 0.1 s read +-45%), and
    ``/proc/PID/schedstat`` (ns) is the main thread's alone (summing ``task/*/schedstat``
    loses the threads that exited). ``stat`` is the fallback where the clock is refused
    (a process ended and reaped, or not Linux)."""
    with contextlib.suppress(OSError, OverflowError):
        return time.clock_gettime((~pid << 3) | 2)  # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)
    with open(f"/proc/{pid}/stat", "rb") as fh:
        fields = fh.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def listening_pid(port: int) -> int | None:
    """The process listening on loopback TCP ``port`` (``/proc/net/tcp``, then the socket's
    inode among every process's file descriptors), or None when it is not on this machine or
    not ours to read."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            for line in list(fh)[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                        return int(entry)
    return None


def memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` (resident now) and ``VmHWM`` (peak resident) of a process, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def reset_peak_rss(pid: int) -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0, our own child); False if refused."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


async def quit_child(proc: asyncio.subprocess.Process | None, within_s: float = 20.0) -> None:
    """End a bench child that reads commands on stdin: ``quit``, then a kill past
    ``within_s``."""
    if proc is None:
        return
    if proc.stdin is not None and not proc.stdin.is_closing():
        proc.stdin.write(b"quit\n")
        proc.stdin.close()
    try:
        async with asyncio.timeout(within_s):
            await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()


def run_in_tree(script: str, tree: Path, *args: str) -> dict[str, Any]:
    """``script`` (a bench file) run as a child against ``tree``'s own ``aiserver`` and
    ``bench`` (the A/B scripts' other source tree); the JSON of its last line of output."""
    env = dict(os.environ, PYTHONPATH=f"{tree / 'src'}{os.pathsep}{tree}")
    out = subprocess.run(
        [sys.executable, script, *args],
        cwd=tree,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


async def drop_schema(url: str, schema: str) -> None:
    """Drops a bench run's throwaway PostgreSQL schema (and everything in it)."""
    import asyncpg  # only the PostgreSQL benches need it

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()
