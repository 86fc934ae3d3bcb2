"""Artifact retention: delete old or excess outputs without leaving references behind.

With several coordinators on one database, only the elected leader sweeps; it gives the lead
up when it stops, so another coordinator sweeps from its next turn on, not once the lease
lapsed (up to ``lease_s`` later)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiserver.artifacts import ArtifactStore
from aiserver.artifacts.store import SWEEP_FRESH_S
from aiserver.jobs.manager import JobManager
from aiserver.jobs.store import JobStore, new_holder_id

__all__ = ["ROLE", "Retention", "RetentionPolicy"]

logger = logging.getLogger(__name__)

ROLE = "retention"


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    max_age_s: float | None
    """Delete artifacts stored longer ago than this; None keeps them."""
    max_total_bytes: int | None
    """Delete the oldest artifacts while the store is larger; None sets no cap."""
    interval_s: float
    fresh_s: float = SWEEP_FRESH_S
    """Blobs stored less than this long ago are kept whatever the limits: a put writes its
    bytes after its row, and an output another coordinator just stored is in no job record
    until that job's next save (its holder's memory knows it, the leader's does not)."""

    @property
    def active(self) -> bool:
        return self.max_age_s is not None or self.max_total_bytes is not None


class Retention:
    """Sweeps the artifact store, then drops the swept outputs from the jobs that listed them.

    Outputs of unfinished jobs are never swept. Variants of a swept artifact go with it.
    """

    resign_timeout_s = 2.0
    """At stop, how long giving up the lead may take (shutdown goes on without it)."""

    def __init__(
        self,
        policy: RetentionPolicy,
        artifacts: ArtifactStore,
        jobs: JobStore,
        manager: JobManager,
    ) -> None:
        self.policy = policy
        self._artifacts = artifacts
        self._jobs = jobs
        self._manager = manager
        self._task: asyncio.Task[None] | None = None
        self._holder = new_holder_id()
        self._led = False  # the last ask for the lead won it

    async def sweep(self) -> list[str]:
        # The database knows every process's unfinished jobs; this process's memory also
        # knows outputs stored a moment ago and not yet saved with their job.
        in_use = self._manager.artifacts_in_use() | await self._jobs.artifacts_in_use()
        deleted = await self._artifacts.sweep(
            self.policy.max_age_s,
            self.policy.max_total_bytes,
            in_use.__contains__,
            fresh_s=self.policy.fresh_s,
        )
        if deleted:
            # Names end in "{sha256}.{ext}": the hash identifies the output in job records.
            hashes = {name.rsplit("/", 1)[-1].split(".", 1)[0] for name in deleted}
            changed = await self._jobs.forget_outputs(hashes)
            logger.info("retention: %d artifacts deleted, %d jobs updated", len(deleted), changed)
        return deleted

    def start(self) -> None:
        if self.policy.active:
            self._task = asyncio.create_task(self._loop(), name="retention")

    @property
    def lease_s(self) -> float:
        """The leader's lease: it outlives two intervals."""
        return max(30.0, self.policy.interval_s * 2.5)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if not self._led:
            return
        self._led = False
        try:
            async with asyncio.timeout(self.resign_timeout_s):
                await self._jobs.resign(ROLE, self._holder)
        except Exception:  # (TimeoutError too) the lease lapses by itself
            logger.warning("could not give up the retention lead", exc_info=True)

    async def _loop(self) -> None:
        # One coordinator sweeps at a time.
        while True:
            try:
                # Set before the ask's answer: a stop during it resigns (harmless if refused).
                self._led = True
                self._led = await self._jobs.lead(ROLE, self._holder, self.lease_s)
                if self._led:
                    await self.sweep()
            except Exception:
                logger.exception(
                    "retention sweep failed; next try in %.0f s", self.policy.interval_s
                )
            await asyncio.sleep(self.policy.interval_s)
