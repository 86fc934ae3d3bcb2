"""Scale-out: jobs/s and CPU per job for 1, 2 and 3 coordinators on PostgreSQL and for one on
SQLite, with the database's own CPU and transactions per job.

- Stand-ins: ``AGENTS`` instant ComfyUI stand-ins in one subprocess (64 slots each), shared by
  every coordinator.
- Coordinators: ``bench.service_proc`` processes (``aiserver serve``'s settings), each with its
  own data folder (bytes stay in local folders: the figures are the job path's coordination,
  not S3's). PostgreSQL: a database of the bench's own (``bench_scaleout``, so its counters
  see no other client), a fresh schema per configuration. With 2 coordinators each is pinned
  to its own core (``taskset -cp``); the callers and PostgreSQL float.
- Load: closed loop, ``CALLERS`` callers per coordinator, each sending SYNC ImageUpscale jobs
  (a different tiny PNG each) to its coordinator, back to back.
- Figures per configuration, median of rounds: jobs/s; coordinator CPU ms per job (all
  coordinators' ``/proc`` CPU over the jobs); PostgreSQL CPU ms per job (``/proc`` CPU of the
  backends serving the bench's database: their connections live as long as the pools, so
  every statement of the segment is counted; the shared background processes are not);
  transactions per job (``pg_stat_database.xact_commit``: asyncpg runs each statement outside
  an explicit transaction as its own, so this is the statement count, except that the
  statements of one explicit transaction count once, and each listening coordinator's backend
  spends one on every notification it receives); the stand-ins' and the callers' CPU per job
  (the rest of the machine's work, for the cost-based view of scaling).

``python -m bench.scaleout LABEL [--jobs N] [--coordinators 1,2,3] [--base DIR] [--rounds R]``
instead runs the coordinators on PostgreSQL under :mod:`bench.sql_census` and writes, per
configuration, the statements they sent and the notifications they received per job, by
statement, with the figures above (PostgreSQL's CPU split into the ``LISTEN`` backends' and
the others'), to ``bench/results/sql-census-LABEL.json``. ``--base DIR`` runs another source
tree's coordinators (an exported ``main``) in the same rounds, alternating with this one's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from bench import ROOT
from bench.common import cpu_seconds, drop_schema, ms, row, spread
from bench.orchestration import Inputs, _segment, _service_job, _wait_ready
from bench.service_proc import ServiceProcess
from bench.standin_proc import StandIns

NAME = "scaleout"
AGENTS = 4
CALLERS = 16
# A database of the bench's own: its counters (transactions, backends' CPU) see no other client.
# Two benches run at once on one server need two (``BENCH_SCALEOUT_DATABASE``).
DATABASE = os.environ.get("BENCH_SCALEOUT_DATABASE", "bench_scaleout")
ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
BENCH_URL = f"postgresql://postgres@127.0.0.1:5432/{DATABASE}"
CONFIGS = (("sqlite", 1), ("postgres", 1), ("postgres", 2), ("postgres", 3))


def run(quick: bool) -> dict[str, Any]:
    return asyncio.run(_run(quick))


async def _run(quick: bool) -> dict[str, Any]:
    reps = 1 if quick else 3
    jobs_per_process = 12 if quick else 300
    configs = CONFIGS[:2] if quick else CONFIGS
    await _ensure_database()
    inputs = Inputs()
    per_config: dict[str, dict[str, list[float]]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    try:
        async with StandIns(AGENTS, tmp / "comfy") as agents:
            for rep in range(reps):
                for kind, count in configs:
                    key = f"{kind}x{count}"
                    got = await _config(
                        tmp / f"{key}-{rep}", agents, kind, count, inputs, jobs_per_process
                    )
                    figures = per_config.setdefault(key, {})
                    for name, value in got.items():
                        figures.setdefault(name, []).append(value)
                    await agents.reset()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    figures_out = {k: {n: spread(v, 3) for n, v in f.items()} for k, f in per_config.items()}
    return {
        "name": NAME,
        "about": __doc__.strip().split("\n\n")[0],
        "setup": {
            "agents": AGENTS,
            "callers_per_coordinator": CALLERS,
            "jobs_per_coordinator": jobs_per_process,
            "rounds": reps,
            "task": "ImageUpscale, SYNC, OUTPUT_DELIVERY_REFERENCES, instant agents",
            "pinning": "2 coordinators: taskset -cp 0 and 1",
        },
        "figures": figures_out,
        "rows": _rows(figures_out),
    }


async def _ensure_database() -> None:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE):
            await conn.execute(f"CREATE DATABASE {DATABASE}")
    finally:
        await conn.close()


async def _config(
    data: Path,
    agents: StandIns,
    kind: str,
    count: int,
    inputs: Inputs,
    per_process: int,
    census: Path | None = None,
    root: Path = ROOT,
    separate: bool = False,
) -> dict[str, float]:
    """One configuration's figures. ``separate``: each coordinator on a schema of its own
    (nothing shared: the control for what sharing one store costs, at the same load and the
    same contention for the cores)."""
    schema = f"b_{uuid.uuid4().hex[:12]}"
    schemas = [f"{schema}_{i}" if separate else schema for i in range(count)]
    agent_list = [
        {"url": url, "name": f"agent{i}", "max_concurrent_jobs": 64}
        for i, url in enumerate(agents.urls)
    ]
    services = []
    before: dict[str, float] | None = None
    after: dict[str, float] | None = None
    for i in range(count):
        env = {
            "AISERVER_GRPC_HOST": "127.0.0.1",
            "AISERVER_GRPC_PORT": "0",
            "AISERVER_HTTP_ENABLED": "false",
            "AISERVER_DATA_DIR": str(data / f"c{i}"),
            "AISERVER_AGENTS": json.dumps(agent_list),
        }
        if kind == "postgres":
            env |= {"AISERVER_DATABASE_URL": BENCH_URL, "AISERVER_DATABASE_SCHEMA": schemas[i]}
        if census is not None:
            env["BENCH_SQL_CENSUS"] = str(census / f"c{i}.json")
        services.append(ServiceProcess(env, data.with_name(f"{data.name}-c{i}.log"), root))
    await asyncio.to_thread(data.mkdir, parents=True, exist_ok=True)
    try:
        for service in services:
            try:
                await service.__aenter__()
            except RuntimeError as exc:
                tail = service.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{exc}\n{tail}") from None
        if count == 2:
            for core, service in enumerate(services):
                pin = await asyncio.create_subprocess_exec(
                    "taskset", "-cp", str(core), str(service.pid), stdout=subprocess.DEVNULL
                )
                if await pin.wait() != 0:
                    raise RuntimeError("taskset failed")
        channels = [grpc.aio.insecure_channel(s.target) for s in services]
        try:
            for channel in channels:
                await _wait_ready(channel)
            jobs = [_service_job(c) for c in channels]
            for job in jobs:  # warm-up: connections, caches, first imports
                await _segment(job, 2, inputs.take(WARM_UP_JOBS))
            before = await _settled_counters() if kind == "postgres" else None
            cpu = [cpu_seconds(s.pid) for s in services]
            others = (cpu_seconds(agents.pid), time.process_time())
            start = time.perf_counter()
            results = await asyncio.gather(
                *(_segment(job, CALLERS, inputs.take(per_process)) for job in jobs)
            )
            wall = time.perf_counter() - start
            used = sum(cpu_seconds(s.pid) - c for s, c in zip(services, cpu, strict=True))
            standins = cpu_seconds(agents.pid) - others[0]
            callers = time.process_time() - others[1]
            after = await _database_counters() if kind == "postgres" else None
        finally:
            for channel in channels:
                await channel.close()
    finally:
        for service in services:
            await service.__aexit__()
    if after is not None:
        # Backends report their counters when idle (up to 10 s later) or when they exit:
        # the coordinators' backends have exited now (shutdown statements are counted too).
        await asyncio.sleep(0.5)
        after |= {
            k: v for k, v in (await _database_counters()).items() if k not in ("cpu", "listen")
        }
    done = sum(len(r["latencies"]) for r in results)
    tables: dict[str, float] = {}
    if kind == "postgres":
        # Counted from the schema's start (a table's counts reach the statistics late):
        # the warm-up's jobs included.
        written: Counter[str] = Counter()
        for name in sorted(set(schemas)):
            written.update(await _table_writes(name))
            await drop_schema(BENCH_URL, name)
        tables = per_job(dict(written), {}, done + WARM_UP_JOBS * count)
    figures = {
        "jobs_per_s": done / wall,
        "coordinator_cpu_ms_per_job": ms(used) / done,
        "failed": float(sum(len(r["failed"]) for r in results)),
        # The rest of the machine's work per job, for the cost-based view of scaling
        # (docs/scale-out.md): what N coordinators on N cores would do.
        "standin_cpu_ms_per_job": ms(standins) / done,
        "caller_cpu_ms_per_job": ms(callers) / done,
    }
    if before is not None and after is not None:
        figures["postgres_cpu_ms_per_job"] = ms(after["cpu"] - before["cpu"]) / done
        figures["postgres_listen_cpu_ms_per_job"] = ms(after["listen"] - before["listen"]) / done
        figures["postgres_xacts_per_job"] = (after["xacts"] - before["xacts"]) / done
        figures["postgres_rows_written_per_job"] = (after["written"] - before["written"]) / done
        figures |= {f"rows {k}": v for k, v in tables.items()}
    return figures


async def _settled_counters() -> dict[str, float]:
    """The counters once every backend reported what it did so far (unchanged for 1.5 s)."""
    last = await _database_counters()
    stable = 0
    for _ in range(24):
        await asyncio.sleep(0.5)
        now = await _database_counters()
        stable = stable + 1 if now["xacts"] == last["xacts"] else 0
        last = now
        if stable >= 3:
            break
    return last


async def _database_counters() -> dict[str, float]:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        pids = await conn.fetch(
            "SELECT pid, application_name LIKE 'aiserver-listen%' FROM pg_stat_activity"
            " WHERE datname = $1 AND backend_type = 'client backend'",
            DATABASE,
        )
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        stats = await conn.fetchrow(
            "SELECT xact_commit + xact_rollback AS xacts,"
            " tup_inserted + tup_updated + tup_deleted AS written"
            " FROM pg_stat_database WHERE datname = $1",
            DATABASE,
        )
    finally:
        await conn.close()
    cpu = listen = 0.0
    for record in pids:
        with contextlib.suppress(OSError):  # a backend that ended meanwhile
            used = cpu_seconds(int(record[0]))
            cpu += used
            listen += used if record[1] else 0.0  # the LISTEN connections' backends
    assert stats is not None
    return {
        "cpu": cpu,
        "listen": listen,
        "xacts": float(stats["xacts"]),
        "written": float(stats["written"]),
    }


async def _table_writes(schema: str) -> dict[str, float]:
    """Rows inserted, updated (of which HOT) and deleted per table of ``schema`` so far."""
    conn = await asyncpg.connect(BENCH_URL)
    try:
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        records = await conn.fetch(
            "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del"
            " FROM pg_stat_user_tables WHERE schemaname = $1",
            schema,
        )
    finally:
        await conn.close()
    got: dict[str, float] = {}
    for r in records:
        for what in ("ins", "upd", "hot_upd", "del"):
            if r[f"n_tup_{what}"]:
                got[f"{r['relname']}.{what}"] = float(r[f"n_tup_{what}"])
    return got


def per_job(after: dict[str, float], before: dict[str, float], jobs: int) -> dict[str, float]:
    """``after - before`` per job, the keys that moved."""
    moved = {k: (v - before.get(k, 0.0)) / jobs for k, v in after.items()}
    return {k: round(v, 3) for k, v in sorted(moved.items()) if v}


def _rows(figures: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for key, f in figures.items():
        rows.append(row(f"scaleout {key}: jobs/s", f["jobs_per_s"], "jobs/s"))
        rows.append(
            row(
                f"scaleout {key}: coordinator CPU per job",
                f["coordinator_cpu_ms_per_job"],
                "ms",
                better="lower",
            )
        )
        if "postgres_cpu_ms_per_job" in f:
            rows.append(
                row(
                    f"scaleout {key}: PostgreSQL CPU per job",
                    f["postgres_cpu_ms_per_job"],
                    "ms",
                    better="lower",
                )
            )
            rows.append(
                row(
                    f"scaleout {key}: PostgreSQL transactions per job",
                    f["postgres_xacts_per_job"],
                    "xact",
                    better="lower",
                )
            )
    sqlite = figures.get("sqlitex1")
    pg1 = figures.get("postgresx1")
    if sqlite and pg1:
        ratio = (
            pg1["coordinator_cpu_ms_per_job"]["median"]
            / sqlite["coordinator_cpu_ms_per_job"]["median"]
        )
        rows.append(
            row(
                "scaleout: coordinator CPU/job, PostgreSQL over SQLite",
                spread([ratio], 2),
                "x",
                target=1.3,
                better="lower",
            )
        )
        pg_cpu = pg1["postgres_cpu_ms_per_job"]["median"]
        coord = pg1["coordinator_cpu_ms_per_job"]["median"]
        if pg_cpu > 0:
            feeds = coord / pg_cpu  # coordinators at full rate one database core keeps up with
            rows.append(
                row(
                    "scaleout: coordinators one PostgreSQL core can feed",
                    spread([feeds], 1),
                    "procs",
                    target=20,
                )
            )
    pg2 = figures.get("postgresx2")
    if pg1 and pg2:
        speedup = pg2["jobs_per_s"]["median"] / pg1["jobs_per_s"]["median"]
        rows.append(
            row(
                "scaleout: 2 coordinators (pinned) over 1, jobs/s",
                spread([speedup], 2),
                "x",
                target=1.6,
                note="2 cores shared with callers, stand-ins and PostgreSQL: capped here",
            )
        )
        # What the cores of this machine cannot show, from cost: were each coordinator on a
        # core of its own (and the database elsewhere), 2 would do 2 x (CPU per job at 1 /
        # CPU per job at 2) the jobs/s of one; below 2 by what a second coordinator adds to
        # each job (lease contention, lone statements, cross-process watching).
        by_cost = (
            2
            * pg1["coordinator_cpu_ms_per_job"]["median"]
            / pg2["coordinator_cpu_ms_per_job"]["median"]
        )
        rows.append(
            row(
                "scaleout: 2 coordinators over 1, from CPU per job (a core each)",
                spread([by_cost], 2),
                "x",
                note="projection from cost, not a measured rate",
            )
        )
    return rows


WARM_UP_JOBS = 4
"""Jobs each coordinator runs before the measured segment (``_config``'s warm-up)."""


async def _census(
    jobs: int,
    out: Path,
    counts: Sequence[int],
    base: Path | None,
    rounds: int,
    separate: bool = False,
) -> None:
    """Statements sent and notifications received per job on PostgreSQL, by statement, for
    each number of coordinators (``bench.sql_census``): the whole life of the processes over
    their jobs, so start-up and timers count too. With ``base``, that tree's coordinators run
    in the same rounds, before this tree's. ``separate``: each configuration of several
    coordinators runs once more with each coordinator on a schema of its own (key ``xN
    apart``), the control that tells what sharing adds from what the shared cores add."""
    await _ensure_database()
    inputs = Inputs()
    trees = ([("base", base)] if base is not None else []) + [("this", ROOT)]
    runs: dict[str, list[dict[str, Any]]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-census-"))
    try:
        async with StandIns(AGENTS, tmp / "comfy") as agents:
            for rep in range(rounds):
                for count in counts:
                    apart = (False, True) if separate and count > 1 else (False,)
                    for name, root in trees:
                        for alone in apart:
                            key = f"{name} x{count}" + (" apart" if alone else "")
                            where = tmp / f"{key.replace(' ', '-')}-{rep}"
                            await asyncio.to_thread(where.mkdir)
                            figures = await _config(
                                where / "run",
                                agents,
                                "postgres",
                                count,
                                inputs,
                                jobs,
                                where,
                                root,
                                separate=alone,
                            )
                            await agents.reset()
                            sent: Counter[str] = Counter()
                            for i in range(count):
                                sent.update(json.loads((where / f"c{i}.json").read_text()))
                            runs.setdefault(key, []).append(
                                _census_run(figures, sent, count * (jobs + WARM_UP_JOBS))
                            )
                            print(key, json.dumps(runs[key][-1]["figures"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = {"jobs_per_coordinator": jobs + WARM_UP_JOBS, "runs": runs}
    await asyncio.to_thread(out.write_text, json.dumps(report, indent=1))
    for key, found in runs.items():
        print(f"\n== {key} (last run)")
        for sql, n in found[-1]["by_statement"].items():
            if n >= 0.05:
                print(f"{n:6.2f}  {sql}")
    print()
    for key, found in runs.items():
        fig = [r["figures"] for r in found]
        print(
            f"{key}: statements/job {[r['statements_per_job'] for r in found]},"
            f" notifications received/job {[r['notifications_per_job'] for r in found]},"
            " xacts/job "
            f"{[round(f['postgres_xacts_per_job'], 2) for f in fig]},"
            f" PG CPU ms/job {[round(f['postgres_cpu_ms_per_job'], 2) for f in fig]}"
            f" (LISTEN {[round(f['postgres_listen_cpu_ms_per_job'], 2) for f in fig]}),"
            f" coordinator CPU ms/job {[round(f['coordinator_cpu_ms_per_job'], 2) for f in fig]}"
        )


def _census_run(figures: dict[str, float], sent: Counter[str], total: int) -> dict[str, Any]:
    heard = sent.pop("NOTIFY received", 0)
    return {
        "figures": figures,
        "statements_per_job": round(sum(sent.values()) / total, 2),
        "notifications_per_job": round(heard / total, 2),
        "by_statement": {sql: round(n / total, 2) for sql, n in sent.most_common()},
    }


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="statements per job on PostgreSQL")
    parser.add_argument("label")
    parser.add_argument("--jobs", type=int, default=300, help="per coordinator")
    parser.add_argument("--coordinators", default="1", help="e.g. 1,2,3")
    parser.add_argument("--base", type=Path, help="another source tree, run alternately")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--apart",
        action="store_true",
        help="also run each configuration of several coordinators on a schema each (control)",
    )
    options = parser.parse_args()
    target = Path(__file__).parent / "results" / f"sql-census-{options.label}.json"
    coordinators = [int(c) for c in options.coordinators.split(",")]
    asyncio.run(
        _census(options.jobs, target, coordinators, options.base, options.rounds, options.apart)
    )
