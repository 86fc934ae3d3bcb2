"""The manager's unfinished jobs, counted per owner as they come and go."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from aiserver.jobs.attempt import ActiveJob, ActiveJobs
from aiserver.jobs.model import Job, JobState
from aiserver.jobs.store import JobRecord
from aiserver.tasks import ImageToImageSpec, TaskKind

NOW = datetime(2025, 5, 1, tzinfo=UTC)


def active(job_id: str, owner: str) -> ActiveJob:
    spec = ImageToImageSpec(positive_prompt="x")
    job = Job(job_id, TaskKind.IMAGE_TO_IMAGE, spec, JobState.QUEUED, NOW, NOW, owner=owner)
    return ActiveJob(JobRecord(job, 1))


def test_counts_follow_assignment_replacement_and_removal() -> None:
    jobs = ActiveJobs()
    jobs["a"] = active("a", "k1")
    jobs["b"] = active("b", "k1")
    jobs["c"] = active("c", "k2")
    assert (jobs.owned_by("k1"), jobs.owned_by("k2"), jobs.owned_by("k3")) == (2, 1, 0)
    jobs["b"] = active("b", "k2")  # the same id again: counted once, under its new record
    assert (jobs.owned_by("k1"), jobs.owned_by("k2")) == (1, 2)
    del jobs["a"]
    del jobs["b"]
    assert (jobs.owned_by("k1"), jobs.owned_by("k2"), len(jobs)) == (0, 1, 1)
    assert jobs._by_owner == {"k2": 1}  # no owner left behind at zero


def test_pop_counts_and_bypassing_methods_are_refused() -> None:
    jobs = ActiveJobs()
    jobs["a"] = active("a", "k1")
    jobs["b"] = active("b", "k1")
    assert jobs.pop("a").job.id == "a"
    assert jobs.pop("a", None) is None
    with pytest.raises(KeyError):
        jobs.pop("a")
    assert jobs.owned_by("k1") == 1
    bypasses: list[Callable[[], object]] = [
        lambda: jobs.update({"c": active("c", "k1")}),
        lambda: jobs.setdefault("c", active("c", "k1")),
        jobs.popitem,
        jobs.clear,
        lambda: jobs.__ior__({"c": active("c", "k1")}),
    ]
    for bypass in bypasses:
        with pytest.raises(TypeError):
            bypass()
    assert (len(jobs), jobs.owned_by("k1")) == (1, 1)
