"""The benchmark scripts run (quick mode): they measure, they never assert speed."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)  # six scripts, scaleout starting three coordinator processes
async def test_bench_quick_mode_runs_and_writes_figures(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 280)
    assert proc.returncode == 0, out.decode()[-3000:]
    written = {p.name for p in tmp_path.glob("*.json")}
    assert {"orchestration.json", "transport.json", "imaging.json"} <= written
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary
