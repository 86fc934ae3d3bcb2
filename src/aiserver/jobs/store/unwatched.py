"""Jobs found unwatched a moment ago: their progress alone is not sent to PostgreSQL.

A held job's progress rows are for readers on other processes only (a watcher elsewhere marks
the job ``watched``; a WatchJobs feed elsewhere is counted apart). A timer's flush of progress
alone for a job nobody elsewhere reads stores nothing, but as a statement it still cost the
database about what the insert did (the statement, not its row or its commit, is most of the
cost). So once such a flush found the job unwatched, the job's next flushes of progress alone
are not sent for :data:`RECHECK_S`; then one asks again.

A progress not stored is not lost: the store says when to ask again (``append_events``
returns the seconds left), and the event log keeps the job's latest progress and sends it
then, unless a newer one replaced it, and stores it that time whoever reads. So a watcher
that marks the job gets the job's current progress at most :data:`RECHECK_S` plus the event
log's 0.5 s later, even when the job emits no other (a queued job's single waiting reason, a
long node without steps); a job waiting with one progress costs one check and one row. Every
other event kind is sent and stored whoever watches.
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

    def quiet(self, job_id: str, now: float) -> float:
        """How long ``job_id`` is still taken as unwatched after ``now`` (0.0: ask again)."""
        until = self._until.get(job_id)
        if until is None:
            return 0.0
        if until > now:
            return until - now
        del self._until[job_id]
        return 0.0

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
        """The job is marked watched here (this process watches it through the store), or
        it ended (its finding would only take room until the oldest are dropped)."""
        self._until.pop(job_id, None)
