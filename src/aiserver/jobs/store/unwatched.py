"""Jobs found unwatched a moment ago: their progress alone is not sent to PostgreSQL.

A held job's progress rows are for readers on other processes only (a watcher elsewhere marks
the job ``watched``; a WatchJobs feed elsewhere is counted apart). A timer's flush of progress
alone for a job nobody elsewhere reads stores nothing, but as a statement it still cost the
database about what the insert did (the statement, not its row or its commit, is most of the
cost). So once such a flush found the job unwatched, the job's next flushes of progress alone
are not sent for :data:`RECHECK_S`; then one asks again. A watcher that marks the job
meanwhile gets its first progress up to that much later (it re-reads every 2 s anyway);
every other event kind is sent and stored whoever watches.
"""

from __future__ import annotations

__all__ = ["RECHECK_S", "UnwatchedJobs"]

RECHECK_S = 2.0
"""How long a job found unwatched is taken as still unwatched (for its progress alone)."""

LIMIT = 4096
"""Jobs remembered at most (the oldest findings are forgotten first: asked again)."""


class UnwatchedJobs:
    """When each job was last found unwatched, for :data:`RECHECK_S`."""

    def __init__(self, recheck_s: float = RECHECK_S, limit: int = LIMIT) -> None:
        self.recheck_s = recheck_s
        self._limit = limit
        self._until: dict[str, float] = {}

    def quiet(self, job_id: str, now: float) -> bool:
        """Whether ``job_id`` was found unwatched less than ``recheck_s`` before ``now``."""
        until = self._until.get(job_id)
        if until is None:
            return False
        if until > now:
            return True
        del self._until[job_id]
        return False

    def found(self, job_id: str, watched: bool, now: float) -> None:
        """What a statement just read of the job's ``watched`` mark."""
        if watched:
            self._until.pop(job_id, None)
            return
        if len(self._until) >= self._limit:
            # Insertion order: the oldest findings go (a job ends long before it is oldest).
            for old in list(self._until)[: self._limit // 2]:
                del self._until[old]
        self._until[job_id] = now + self.recheck_s

    def forget(self, job_id: str) -> None:
        """The job is marked watched here (this process watches it through the store)."""
        self._until.pop(job_id, None)
