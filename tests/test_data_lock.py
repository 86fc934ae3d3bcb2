"""One process per data folder: a second one refuses to start, a dead holder's lock is gone."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from aiserver.data_lock import DataFolderInUse, DataFolderLock
from tests.test_startup_errors import serve


async def test_a_second_server_on_a_data_folder_in_use_is_one_line_and_exit_2(
    tmp_path: Path,
) -> None:
    (tmp_path / "data").mkdir()
    held = DataFolderLock(tmp_path / "data")
    held.acquire()
    try:
        rc, err = await serve(tmp_path)
    finally:
        held.release()
    assert rc == 2, err
    assert "Traceback" not in err, err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("aiserver: cannot start:"), err
    assert "in use by another aiserver process" in last, err
    assert f"pid {os.getpid()}" in last, err
    assert not (tmp_path / "data" / "jobs.db").exists()  # nothing in the folder was touched


async def test_a_holder_killed_by_sigkill_leaves_no_stale_lock(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from aiserver.data_lock import DataFolderLock\n"
        "DataFolderLock(Path(sys.argv[1])).acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, str(tmp_path), stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"held\n"
    with pytest.raises(DataFolderInUse, match=f"pid {proc.pid}"):
        DataFolderLock(tmp_path).acquire()
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    lock = DataFolderLock(tmp_path)
    lock.acquire()  # the kernel dropped the dead holder's lock
    lock.release()


def test_the_lock_is_given_back_on_release_and_taken_once(tmp_path: Path) -> None:
    first = DataFolderLock(tmp_path)
    first.acquire()
    first.acquire()  # idempotent while held
    with pytest.raises(DataFolderInUse):
        DataFolderLock(tmp_path).acquire()  # another open file, even in this process
    first.release()
    second = DataFolderLock(tmp_path)
    second.acquire()
    second.release()
