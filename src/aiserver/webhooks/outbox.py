"""The durable webhook outbox: deliveries stored with the job's final state, sent by one
elected runner (docs/scale-out.md, "Single runners").

The manager stores a finished job and its deliveries in one transaction
(:meth:`WebhookOutbox.deliveries` gives them). The runner of whichever process leads the
``webhook-outbox`` role claims due rows, tries each once through the sender, and marks them
delivered, failed for good, or due again after the sender's backoff. Delivery is at least
once: a runner that dies between posting and marking lets the next one post again (receivers
deduplicate by ``webhook-id``). A restart loses nothing: the rows are in the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time

from aiserver.jobs.model import Job
from aiserver.jobs.store import JobStore, OutboxItem
from aiserver.webhooks.payload import message_id_for
from aiserver.webhooks.sender import DeliveryStatus, WebhookSender

__all__ = ["ROLE", "WebhookOutbox"]

logger = logging.getLogger(__name__)

ROLE = "webhook-outbox"


class WebhookOutbox:
    """Builds a finished job's deliveries and runs the outbox while this process leads."""

    resign_timeout_s = 2.0
    """At stop, how long giving up the lead may take (shutdown goes on without it)."""

    def __init__(
        self,
        store: JobStore,
        sender: WebhookSender,
        holder: str,
        *,
        lease_s: float = 30.0,
        poll_s: float = 1.0,
        batch: int = 32,
    ) -> None:
        self._store = store
        self._sender = sender
        self._holder = holder
        self._lease_s = lease_s
        self._poll_s = poll_s
        self._batch = batch
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._renew_at = -math.inf  # (monotonic) while leading: when the lease is renewed
        self._follow_until = -math.inf  # (monotonic) while following: when to ask again

    def deliveries(self, job: Job) -> list[tuple[str, bytes]]:
        """What to store with ``job``'s final state: its ReplyTo POST, if it has one."""
        if not job.reply_to or not job.state.terminal:
            return []
        return [(job.reply_to, self._sender.body(job))]

    def wake(self) -> None:
        """A delivery was just stored here: look now rather than at the next poll."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="webhook-outbox")

    async def stop(self) -> None:
        """Stop running; a leader gives up the lead (a restart's successor, asking a third
        of a lease apart, takes it at its next ask rather than once the lease lapsed)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._renew_at == -math.inf:
            return  # never led, or refused since: nothing to give up
        self._renew_at = -math.inf
        try:
            async with asyncio.timeout(self.resign_timeout_s):
                await self._store.resign(ROLE, self._holder)
        except Exception:  # (TimeoutError too) the lease lapses by itself
            logger.warning("could not give up the webhook outbox lead", exc_info=True)

    async def run_once(self) -> int:
        """Deliver what is due, if this process leads; how many rows were tried."""
        if not await self._leads():
            return 0
        items = await self._store.outbox_claim(self._holder, self._lease_s, self._batch)
        await asyncio.gather(*(self._deliver(item) for item in items))
        return len(items)

    async def _leads(self) -> bool:
        """Whether this process leads: the lease is renewed every third of it, not at every
        poll (a write per coordinator per second). A follower asks again a third of a lease
        after it was refused, not at every poll or wake: the leader renews that often, so
        asking sooner only finds it again (each ask is a write that every other coordinator
        paid once a second); one takes over at most a third of a lease after the leader's
        lease lapsed, or after it gave the lead up at :meth:`stop`."""
        now = time.monotonic()
        if now < self._renew_at:
            return True
        if now < self._follow_until:
            return False
        if await self._store.lead(ROLE, self._holder, self._lease_s):
            self._renew_at = now + self._lease_s / 3
            return True
        self._renew_at = -math.inf
        self._follow_until = now + self._lease_s / 3
        return False

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                tried = await self.run_once()
            except Exception:
                logger.exception("webhook outbox pass failed")
                tried = 0
            if tried:
                continue  # more may be due
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_s):
                    await self._wake.wait()

    async def _deliver(self, item: OutboxItem) -> None:
        try:
            state = str(json.loads(item.body).get("state", ""))
        except ValueError:
            state = ""
        msg_id = message_id_for(item.job_id, state)
        tried = await self._sender.attempt(
            item.job_id, msg_id, item.url, item.body, item.attempts + 1
        )
        if tried.outcome is not None:
            if tried.outcome.status is DeliveryStatus.DELIVERED:
                await self._store.outbox_done(item.id)
            else:  # kept, not due any more: an operator can look at it
                await self._store.outbox_failed(item.id, tried.outcome.detail, None)
            if self._sender.keep_outcome is not None:  # shown on the job (GetJob)
                try:
                    await self._sender.keep_outcome(tried.outcome)
                except Exception:
                    logger.exception("could not keep the webhook outcome of %s", item.job_id)
        else:
            await self._store.outbox_failed(item.id, tried.detail, tried.retry_in_s)
