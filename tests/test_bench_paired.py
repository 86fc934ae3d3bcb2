"""The real-ComfyUI rows' statistics (``bench.paired``) and their bench end to end against a
stand-in: balanced orders, a median of paired differences that a drifting agent does not
move, and ``bench.orchestration --real``'s cycles with ComfyUI's own run taken out."""

from __future__ import annotations

import itertools
import random
import statistics
from pathlib import Path

import pytest

from bench.orchestration_real import REAL_NAMES, _real_comfy, real_figures, real_rows
from bench.paired import balanced_orders, median_interval, paired
from bench.standin_proc import StandIns


@pytest.mark.parametrize("count", [2, 4, 6])
def test_balanced_orders_put_each_path_everywhere_and_after_every_other_once(count: int) -> None:
    orders = balanced_orders(count)
    assert len(orders) == count
    for place in range(count):
        assert sorted(order[place] for order in orders) == list(range(count))
    follows = [pair for order in orders for pair in itertools.pairwise(order)]
    assert sorted(follows) == sorted(itertools.permutations(range(count), 2))


def test_the_median_of_paired_differences_is_not_flipped_by_a_drifting_agent() -> None:
    # The agent's own time drifts by tens of ms from round to round and scatters job by
    # job; the service adds 2 ms. Per round, each path's p50 over a segment of 5 jobs in a
    # turning order (what the rows were): the difference of p50s carries the drift between
    # the two segments. Jobs interleaved one by one and paired: each difference carries only
    # the drift between two neighbouring jobs.
    rng = random.Random(7)
    added = 2.0
    old_rounds: list[float] = []
    service_jobs: list[float] = []
    direct_jobs: list[float] = []
    agent = 70.0
    for rnd in range(5):
        segments: dict[str, list[float]] = {"service": [], "direct": []}
        for path in ("service", "direct") if rnd % 2 == 0 else ("direct", "service"):
            agent += rng.uniform(-15, 15)  # the drift between segments
            for _ in range(5):
                extra = added if path == "service" else 0.0
                segments[path].append(agent + rng.gauss(0, 8) + extra)
        old_rounds.append(
            statistics.median(segments["service"]) - statistics.median(segments["direct"])
        )
    for _ in range(96):
        agent += rng.uniform(-1, 1)  # the same drift spread over many short cycles
        service_jobs.append(agent + rng.gauss(0, 8) + added)
        direct_jobs.append(agent + rng.gauss(0, 8))
    new = median_interval(paired(service_jobs, direct_jobs), 2)
    assert new["min"] <= added <= new["max"]
    assert new["max"] - new["min"] < 8
    # The old figure's rounds spread over tens of ms: any one of them can say anything.
    assert max(old_rounds) - min(old_rounds) > 2 * (new["max"] - new["min"])


def test_median_interval_keeps_the_table_s_keys_and_is_repeatable() -> None:
    values = [5.0, -3.0, 1.0, 2.0, 40.0, 0.5, 1.5]
    a, b = median_interval(values), median_interval(values)
    assert a == b
    assert a["median"] == 1.5
    assert a["min"] <= a["median"] <= a["max"]
    assert a["range"] == [-3.0, 40.0]
    assert a["n"] == 7 and a["runs"] == values
    assert paired([4.0, 6.0], [2.0, 0.0], ratio=True) == [2.0]
    with pytest.raises(ValueError):
        paired([1.0], [1.0, 2.0])


async def test_the_real_rows_run_in_cycles_against_a_stand_in(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    async with StandIns(1, tmp_path / "comfy") as agents:
        monkeypatch.setenv("BENCH_COMFY_URL", agents.urls[0])
        got = await _real_comfy(True, tmp_path)
    assert got is not None
    assert got["unmatched_cycles_1"] == [0]
    for p in REAL_NAMES:
        assert len(got[f"added_p50_1_{p}"]) == 8  # one difference per cycle
        assert len(got[f"added_outside_comfy_1_{p}"]) == 8
        assert len(got[f"added_comfy_run_1_{p}"]) == 8
        # Each pair's difference is the part outside ComfyUI's run plus its run's.
        for total, outside, run in zip(
            got[f"added_p50_1_{p}"],
            got[f"added_outside_comfy_1_{p}"],
            got[f"added_comfy_run_1_{p}"],
            strict=True,
        ):
            assert total == pytest.approx(outside + run)
        assert len(got[f"jobs_per_s_16_ratio_{p}"]) == 4
        assert len(got[f"service_cpu_ms_per_job_{p}_16"]) == 4
    figures = real_figures(got)
    assert figures["added_p50_1_grpc"]["interval"].startswith("95% bootstrap")
    assert "interval" not in figures["grpc_p50_1"]
    rows = real_rows(figures)
    names = [r["metric"] for r in rows]
    for name in REAL_NAMES.values():
        assert f"real ComfyUI: added p50 @1, 64 px upscale ({name})" in names
        assert f"real ComfyUI: added @1 outside ComfyUI's own run ({name})" in names
    assert "real ComfyUI: jobs/s @16 / direct client" in names
    assert all(r["value"] is not None for r in rows)
