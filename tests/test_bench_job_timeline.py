"""``bench.job_timeline`` end to end, a few jobs: every process stamps its steps, each job's
stamps fall in its own call window, and the spans the bench notes read are there."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from bench.job_timeline import _run


async def test_a_short_timeline_has_every_process_s_steps(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The stand-ins get their timeline file through their own environment: this process's
    # (and so any other child's) is left as it was.
    mine = str(tmp_path / "not-the-bench-s.json")
    monkeypatch.setenv("BENCH_TIMELINE", mine)
    args = argparse.Namespace(jobs=4, rounds=1, tree="", agents_tree="", direct=True)
    result = await _run(args)
    assert os.environ["BENCH_TIMELINE"] == mine
    assert not Path(mine).exists()
    service, direct = result["rounds"]
    assert (service["tree"], direct["tree"]) == ("this", "direct")
    assert service["jobs"] == direct["jobs"] == 4
    steps = {row["step"]: row for row in service["steps"]}
    for step in (
        "c.start",
        "s.call",
        "s.submitted",
        "s.agent_upload",
        "a.POST /upload/image",
        "a.POST /prompt",
        "s.ws.ExecutionSuccess",
        "s.put",
        "s.register",
        "s.write",
        "s.fsync",
        "s.put_done",
        "s.end_written",
        "s.yield.finished",
        "c.finished",
    ):
        assert steps[step]["n"] == 4, step
    # In order within a job: the caller's call, the service, the agent, back to the caller.
    assert steps["s.call"]["at_p50"] < steps["s.agent_upload"]["at_p50"]
    assert steps["a.POST /prompt"]["at_p50"] < steps["s.ws.ExecutionSuccess"]["at_p50"]
    assert steps["s.put_done"]["at_p50"] < steps["c.finished"]["at_p50"]
    spans = {row["span"]: row for row in service["spans"]}
    assert spans["the job"]["n"] == 4
    assert spans["of which in fsync (file + folder)"]["p50"] > 0
    assert spans["messages yielded to the caller after the put (mean)"]["p50"] >= 1
    assert set(service["cpu_ms_per_job"]) == {"agents", "service"}
    assert "a.GET /history/*" in {row["step"] for row in direct["steps"]}
