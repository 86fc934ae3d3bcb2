"""Start-up errors an operator meets: one line on stderr, exit status 2, no traceback."""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.storage.backends import PG_URL


async def serve(tmp_path: Path, **env: str) -> tuple[int, str]:
    full_env = {
        **os.environ,
        "AISERVER_DATA_DIR": str(tmp_path / "data"),
        "AISERVER_GRPC_PORT": "0",
        "AISERVER_HTTP_PORT": "0",
        "AISERVER_LOCAL_UPSCALE": "off",
        **env,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aiserver",
        "serve",
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError("the server kept running on a port in use") from None
    return proc.returncode or 0, err.decode()


@pytest.mark.parametrize("which", ["GRPC", "HTTP", "METRICS"])
async def test_a_port_in_use_is_one_line_and_exit_2(tmp_path: Path, which: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, err = await serve(tmp_path, **{f"AISERVER_{which}_PORT": str(port)})
    assert rc == 2, err
    assert "Traceback" not in err, err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("aiserver: cannot start:"), err
    assert str(port) in last, err


async def test_the_standalone_gateway_on_a_port_in_use_is_one_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "aiserver",
            "gateway",
            "--port",
            str(port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        _, raw = await asyncio.wait_for(proc.communicate(), 60)
    err = raw.decode()
    assert proc.returncode == 2, err
    assert "Traceback" not in err, err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(f"aiserver gateway: cannot listen on 127.0.0.1:{port}")
    )


async def test_an_unreachable_job_database_is_one_line_without_its_password(
    tmp_path: Path,
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections are refused
        rc, err = await serve(
            tmp_path, AISERVER_DATABASE_URL=f"postgresql://u:hunter2@127.0.0.1:{port}/db"
        )
    assert rc == 2, err
    assert "Traceback" not in err and "hunter2" not in err, err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("aiserver: cannot start: cannot open the job database"), err
    assert f"postgresql://u:***@127.0.0.1:{port}/db" in last, err


async def test_a_job_database_from_a_newer_release_is_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with sqlite3.connect(data / "jobs.db") as db:
        db.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_us INT)")
        db.execute("INSERT INTO schema_migrations VALUES (999, 0)")
    rc, err = await serve(tmp_path)
    assert rc == 2, err
    assert "Traceback" not in err, err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("aiserver: cannot start: cannot open the job database"), err
    assert "schema version 999 is newer than this server" in last, err


@pytest.mark.parametrize(
    ("name", "what"),
    [("jobs.db", "the job database"), ("artifacts/artifacts.sqlite3", "the artifact index")],
)
async def test_a_database_file_that_is_not_one_is_one_line(
    tmp_path: Path, name: str, what: str
) -> None:
    path = tmp_path / "data" / name
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not a database, " * 200)
    rc, err = await serve(tmp_path)
    assert rc == 2, err
    assert "Traceback" not in err, err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith(f"aiserver: cannot start: cannot open {what}"), err
    assert "not a database" in last, err


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DATABASE_URL", "mysql://db/x"),
        ("BLOB_URL", "gs://bucket/x"),
        ("BLOB_URL", "s3:///no-bucket"),
        ("DATABASE_SCHEMA", "Robert'); DROP"),
        ("SPOOL_MEMORY_MB", "-1"),
        ("AGENT_PROBE_TIMEOUT_S", "0"),
    ],
)
async def test_bad_storage_urls_are_bad_configuration(
    tmp_path: Path, name: str, value: str
) -> None:
    rc, err = await serve(tmp_path, **{f"AISERVER_{name}": value})
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("aiserver: bad configuration:"), err
    assert name.lower() in err, err


@pytest.mark.parametrize(("lease_s", "timeout_s"), [("30", "11"), ("3", "5")])
async def test_a_database_bound_that_may_outlast_the_lease_is_bad_configuration(
    tmp_path: Path, lease_s: str, timeout_s: str
) -> None:
    """A statement allowed to wait longer than a renewal has left lets a lease lapse (and
    the job be taken over) with no outage at all: refused at start, naming both settings."""
    rc, err = await serve(
        tmp_path,
        AISERVER_DATABASE_URL=PG_URL,
        AISERVER_JOB_LEASE_S=lease_s,
        AISERVER_DATABASE_TIMEOUT_S=timeout_s,
    )
    assert rc == 2, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("aiserver: bad configuration:"), err
    assert "job_lease_s" in last and "database_timeout_s" in last, last
