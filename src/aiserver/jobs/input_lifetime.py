"""When a job's spooled inputs may go: no unfinished job needs them, no request pins them.

On the embedded store this process knows every unfinished job. On a shared store another
process's jobs may need the same bytes, so the database is asked too (``inputs_in_use``)
before the shared copy is deleted: once per ``ask_every_s`` for every input that came due
meanwhile, not once per job (at full rate that was a statement per job).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from aiserver.jobs.model import Job
from aiserver.jobs.store import JobStore
from aiserver.spool import InputSpool

__all__ = ["InputLifetime"]

logger = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]


class InputLifetime:
    """Deletes inputs after their last job, a grace period later."""

    def __init__(
        self,
        spool: InputSpool,
        store: JobStore,
        *,
        needed_here: Callable[[], set[str]],
        ask_store: bool,
        grace_s: float,
        spawn: Spawn,
        ask_every_s: float = 0.2,
    ) -> None:
        self._spool = spool
        self._store = store
        self._needed_here = needed_here
        self._ask_store = ask_store
        self._grace_s = grace_s
        self._spawn = spawn
        self._deletions: dict[str, asyncio.TimerHandle] = {}  # by job: inputs waiting out grace
        self._ask_every_s = ask_every_s
        self._unasked: set[str] = set()  # to check with the store at the next ask
        self._ask: asyncio.TimerHandle | None = None

    def job_ended(self, job: Job) -> None:
        """Delete this job's inputs that no unfinished job needs, after the grace period: a
        request may have just committed the same content and be about to submit it."""
        shas = {ref.sha256 for ref in job.inputs if not ref.stored}  # stored: the job's own
        if not shas:
            return
        if self._grace_s <= 0:
            self.discard(shas)
            return
        key = job.id
        self._deletions[key] = asyncio.get_running_loop().call_later(
            self._grace_s, self.discard, shas, key
        )

    def discard(self, shas: set[str], key: str = "") -> None:
        """Delete inputs unless a job needs them or a request pins them."""
        self._deletions.pop(key, None)
        unneeded = shas - self._needed_here()
        if not unneeded:
            return
        if self._ask_store:
            self._unasked |= unneeded
            if self._ask is None:
                self._ask = asyncio.get_running_loop().call_later(self._ask_every_s, self._ask_now)
        else:
            self._delete(unneeded)

    def cancel_pending(self) -> None:
        """At stop: pending deletions are kept (a sweep's job)."""
        for handle in self._deletions.values():
            handle.cancel()
        self._deletions.clear()
        if self._ask is not None:
            self._ask.cancel()
            self._ask = None
        self._unasked.clear()

    def _ask_now(self) -> None:
        self._ask = None
        shas, self._unasked = self._unasked, set()
        self._spawn(self._discard_unless_stored(shas))

    async def _discard_unless_stored(self, shas: set[str]) -> None:
        in_use = await self._store.inputs_in_use(shas)
        self._delete(shas - in_use - self._needed_here())

    def _delete(self, shas: set[str]) -> None:
        for sha in shas:
            if self._spool.pinned(sha):
                continue  # a request has just uploaded the same bytes and will submit them
            self._spool.delete_local(sha)
            if self._spool.shared:
                self._spawn(self._spool.delete_shared(sha))
