"""ReplyTo delivery: one signed POST per finished job, retried with backoff, never raising.

Logs and outcomes name the host only: the path and query of a webhook URL are often secrets.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx

from aiserver import __version__
from aiserver.jobs.model import Job, WebhookDelivery
from aiserver.webhooks.guard import RefusedTarget, Resolver, Target, TargetGuard
from aiserver.webhooks.payload import body_of, message_id
from aiserver.webhooks.signing import signature_headers

__all__ = ["DeliveryOutcome", "DeliveryStatus", "WebhookSender", "webhook_record"]

logger = logging.getLogger(__name__)


class DeliveryStatus(enum.Enum):
    DELIVERED = "DELIVERED"
    """The receiver answered 2xx."""
    FAILED = "FAILED"
    """Out of attempts, or a final answer (4xx other than 429, 3xx)."""
    REFUSED = "REFUSED"
    """The URL was not called: bad scheme or a non-public address."""
    SKIPPED = "SKIPPED"
    """No ReplyTo, or the job has not ended."""


@dataclass(frozen=True, slots=True)
class DeliveryOutcome:
    job_id: str
    message_id: str
    host: str
    status: DeliveryStatus
    attempts: int
    http_status: int | None = None
    detail: str = ""
    time: datetime = field(default_factory=lambda: datetime.now(UTC))
    """When the delivery ended."""


def webhook_record(outcome: DeliveryOutcome) -> WebhookDelivery:
    """What the job keeps of an ended delivery."""
    return WebhookDelivery(
        state=outcome.status.value,
        attempts=outcome.attempts,
        http_status=outcome.http_status,
        error="" if outcome.status is DeliveryStatus.DELIVERED else outcome.detail,
        ended=outcome.time,
    )


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class WebhookSender:
    """POSTs a job's final state to its ``reply_to`` URL.

    Use :meth:`deliver` as a terminal hook (it only returns once done, after up to
    ``max_attempts`` tries) or :meth:`submit` to run it in the background. Every delivery
    ends in a :class:`DeliveryOutcome`, kept in :attr:`outcomes` and passed to ``on_outcome``.
    """

    def __init__(
        self,
        secret: bytes | None,
        *,
        allow_hosts: Sequence[str] = (),
        allow_private: bool = False,
        timeout_s: float = 10,
        max_attempts: int = 5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        public_base_url: str = "",
        link: Callable[[str], str] | None = None,
        resolver: Resolver | None = None,
        on_outcome: Callable[[DeliveryOutcome], None] | None = None,
        keep_outcome: Callable[[DeliveryOutcome], Awaitable[None]] | None = None,
        history: int = 100,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._secret = secret
        self._guard = TargetGuard(allow_hosts, allow_private=allow_private, resolver=resolver)
        self._timeout_s = timeout_s
        self._max_attempts = max_attempts
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._public_base_url = public_base_url
        self._link = link
        self._on_outcome = on_outcome
        self.keep_outcome = keep_outcome
        """Awaited by :meth:`deliver` with each ended delivery (the server stores it on the
        job); settable after construction, as the job manager starts later."""
        self.outcomes: collections.deque[DeliveryOutcome] = collections.deque(maxlen=history)
        self._tasks: set[asyncio.Task[None]] = set()
        self._client = httpx.AsyncClient(
            timeout=timeout_s,
            follow_redirects=False,
            # Proxies from the environment would resolve the host themselves, past the guard.
            trust_env=False,
            # No connection reuse: a pinned connection must never serve another host name.
            limits=httpx.Limits(max_keepalive_connections=0),
            headers={"user-agent": f"aiserver-webhooks/{__version__}"},
        )

    @property
    def guard(self) -> TargetGuard:
        """The SSRF guard deliveries pass; submissions screen ReplyTo URLs with it too."""
        return self._guard

    async def deliver(self, job: Job) -> None:
        """Send ``job``'s webhook and keep its outcome; never raises (except cancellation)."""
        try:
            outcome = await self.send(job)
            if self.keep_outcome is not None and outcome.status is not DeliveryStatus.SKIPPED:
                await self.keep_outcome(outcome)
        except Exception:
            logger.exception("webhook for job %s failed unexpectedly", job.id)

    def submit(self, job: Job) -> None:
        """Deliver in the background; :meth:`close` waits for or cancels what is pending."""
        task = asyncio.create_task(self.deliver(job), name=f"webhook-{job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def send(self, job: Job) -> DeliveryOutcome:
        """Deliver and return the outcome (also recorded)."""
        msg_id = message_id(job)
        if not job.reply_to or not job.state.terminal:
            return self._record(DeliveryOutcome(job.id, msg_id, "", DeliveryStatus.SKIPPED, 0))
        if self._link is not None:
            body = body_of(job, self._public_base_url, self._link)
        else:
            body = body_of(job, self._public_base_url)
        host = ""
        attempt = 0
        status: int | None = None
        detail = ""
        while attempt < self._max_attempts:
            attempt += 1
            retry_after: float | None = None
            try:
                target = await self._guard.check(job.reply_to)
                host = target.url.host
                status, retry_after = await self._post(target, msg_id, body)
            except RefusedTarget as exc:
                detail = exc.reason
                if not exc.retryable:
                    logger.warning("webhook for job %s refused: %s", job.id, exc.reason)
                    return self._record(
                        DeliveryOutcome(
                            job.id, msg_id, host, DeliveryStatus.REFUSED, attempt, None, detail
                        )
                    )
            except (httpx.TransportError, TimeoutError) as exc:
                status, detail = None, type(exc).__name__
            else:
                detail = f"HTTP {status}"
                if 200 <= status < 300:
                    logger.info("webhook for job %s delivered to %s", job.id, host)
                    return self._record(
                        DeliveryOutcome(
                            job.id, msg_id, host, DeliveryStatus.DELIVERED, attempt, status
                        )
                    )
                if status != 429 and status < 500:
                    break  # the receiver's final word
            if attempt < self._max_attempts:
                delay = self._delay(attempt, retry_after)
                logger.info(
                    "webhook for job %s to %s: %s; retry %d in %.2fs",
                    job.id,
                    host or "?",
                    detail,
                    attempt + 1,
                    delay,
                )
                await asyncio.sleep(delay)
        logger.warning("webhook for job %s to %s failed: %s", job.id, host or "?", detail)
        return self._record(
            DeliveryOutcome(job.id, msg_id, host, DeliveryStatus.FAILED, attempt, status, detail)
        )

    async def _post(self, target: Target, msg_id: str, body: bytes) -> tuple[int, float | None]:
        url = target.url
        headers = {"content-type": "application/json"}
        headers |= signature_headers(self._secret, msg_id, body)  # fresh timestamp per attempt
        extensions: dict[str, str] = {}
        if target.pinned is not None:
            # Connect to the checked address; Host and TLS SNI (hence certificate checks)
            # still use the name from the URL.
            headers["host"] = url.netloc.decode("ascii")
            if url.scheme == "https":
                extensions["sni_hostname"] = url.host
            url = url.copy_with(host=str(target.pinned))
        async with (
            asyncio.timeout(self._timeout_s),  # httpx's timeouts are per phase, not overall
            self._client.stream(
                "POST", url, content=body, headers=headers, extensions=extensions
            ) as response,
        ):
            # The body is never read: a hostile receiver could send without end.
            return response.status_code, _retry_after(response.headers.get("retry-after"))

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        base = min(self._backoff_s * 2.0 ** (attempt - 1), self._max_backoff_s)
        delay = base / 2 + random.uniform(0, base / 2)  # jitter spreads retry storms
        if retry_after is not None:
            delay = max(delay, min(retry_after, self._max_backoff_s))
        return delay

    def _record(self, outcome: DeliveryOutcome) -> DeliveryOutcome:
        self.outcomes.append(outcome)
        if self._on_outcome is not None:
            try:
                self._on_outcome(outcome)
            except Exception:
                logger.exception("webhook outcome callback failed")
        return outcome

    async def close(self, grace_s: float = 0) -> None:
        """Wait up to ``grace_s`` for background deliveries, cancel the rest, close the client."""
        pending = set(self._tasks)
        if pending and grace_s > 0:
            _done, pending = await asyncio.wait(pending, timeout=grace_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self._client.aclose()
