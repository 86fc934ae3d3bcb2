"""The metrics terminal hook: one series per label set, children found once and reused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families

from aiserver.jobs.model import Job, JobState
from aiserver.jobs.scheduler import default_spec
from aiserver.metrics import Metrics
from aiserver.tasks import TaskKind

_T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def _job(task: TaskKind, state: JobState, provider: str, run_s: float | None) -> Job:
    started = None if run_s is None else _T0 + timedelta(seconds=1)
    ended = None if started is None else started + timedelta(seconds=run_s)
    return Job(
        id="j", task=task, spec=default_spec(task), state=state, created=_T0, updated=_T0,
        provider=provider, started=started, ended=ended,
    )  # fmt: skip


def _samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def test_each_label_set_counts_its_own_jobs() -> None:
    a, b = list(TaskKind)[:2]
    metrics = Metrics()
    for _ in range(3):
        metrics.job_finished(_job(a, JobState.SUCCEEDED, "comfy", 0.2))
    metrics.job_finished(_job(a, JobState.FAILED, "local", 3.0))
    metrics.job_finished(_job(b, JobState.CANCELLED, "", None))  # never started
    found = _samples(metrics)

    def value(name: str, **labels: str) -> float:
        return found.get((name, frozenset(labels.items())), 0.0)

    finished = "aiserver_jobs_finished_total"
    assert value(finished, task=a.value, state="SUCCEEDED") == 3
    assert value(finished, task=a.value, state="FAILED") == 1
    assert value(finished, task=b.value, state="CANCELLED") == 1
    assert value(finished, task=b.value, state="SUCCEEDED") == 0
    duration = "aiserver_job_duration_seconds"
    assert value(f"{duration}_count", task=a.value, provider="comfy") == 3
    assert value(f"{duration}_sum", task=a.value, provider="comfy") == pytest.approx(0.6)
    assert value(f"{duration}_count", task=a.value, provider="local") == 1
    assert value(f"{duration}_bucket", task=a.value, provider="local", le="2.5") == 0
    assert value(f"{duration}_bucket", task=a.value, provider="local", le="5.0") == 1
    wait = "aiserver_job_queue_wait_seconds"
    assert value(f"{wait}_count", task=a.value) == 4
    assert value(f"{wait}_sum", task=a.value) == 4.0
    assert value(f"{wait}_count", task=b.value) == 0
