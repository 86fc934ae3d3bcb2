"""The bytes of jobs' stored inputs (``InputRef.stored``) kept in memory from the create to
the job's end, within one budget per process: a job then hands them to its provider with
no read of the store. Past the budget (a deep queue of jobs with inputs near the 64 KiB
limit) a job keeps none and its attempt reads them from the store.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiserver.jobs.attempt import ActiveJob

__all__ = ["DEFAULT_BUDGET", "HeldInputs"]

DEFAULT_BUDGET = 64 * 1024 * 1024


class HeldInputs:
    """Counts the bytes held by active jobs against ``budget``."""

    def __init__(self, budget: int = DEFAULT_BUDGET) -> None:
        self.budget = budget
        self.used = 0

    def hold(self, active: ActiveJob, data: Mapping[str, bytes]) -> None:
        size = sum(len(d) for d in data.values())
        if not size or self.used + size > self.budget:
            return
        active.input_bytes = dict(data)
        self.used += size

    def release(self, active: ActiveJob) -> None:
        held, active.input_bytes = active.input_bytes, None
        if held:
            self.used -= sum(len(d) for d in held.values())
