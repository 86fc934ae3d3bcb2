"""WebhookSender against a real local HTTP receiver: signing, retries, SSRF refusals."""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from aiserver.errors import ErrorKind, FieldViolation, ServiceError
from aiserver.jobs.model import ArtifactRef, Job, JobState
from aiserver.tasks import ImageToImageSpec, TaskKind
from aiserver.webhooks import (
    DeliveryOutcome,
    DeliveryStatus,
    SignatureError,
    WebhookSender,
    message_id,
    verify,
)
from aiserver.webhooks.guard import IPAddress
from tests.webhooks.receiver import Receiver, Reply

SECRET = b"whsec-test-secret"
NOW = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
SHA = "ab" * 32


def make_job(reply_to: str, state: JobState = JobState.SUCCEEDED, **kw: Any) -> Job:
    artifact = ArtifactRef(
        name=f"artifacts/2031/05/06/{SHA}.webp",
        url=f"/artifacts/2031/05/06/{SHA}.webp",
        file_name="out_1.webp",
        mime_type="image/webp",
        width=512,
        height=384,
        size_bytes=1234,
        sha256=SHA,
        seed=7,
        provider="comfy-1",
        created=NOW,
        job_id="job-1",
    )
    fields: dict[str, Any] = {
        "id": "job-1",
        "task": TaskKind.IMAGE_TO_IMAGE,
        "spec": ImageToImageSpec(positive_prompt="a cat"),
        "state": state,
        "created": NOW,
        "updated": NOW,
        "owner": "alice",
        "ref_id": "ref-9",
        "tag": "batch-a",
        "reply_to": reply_to,
        "outputs": [artifact],
        "texts": ["a cat on a mat"],
    }
    fields.update(kw)
    return Job(**fields)


SenderFactory = Callable[..., WebhookSender]


def last_status(sender: WebhookSender) -> DeliveryStatus:
    return sender.outcomes[-1].status


@pytest.fixture
async def make_sender() -> AsyncIterator[SenderFactory]:
    made: list[WebhookSender] = []

    def factory(**kw: Any) -> WebhookSender:
        options: dict[str, Any] = {
            "allow_hosts": ["127.0.0.1"],
            "timeout_s": 2,
            "max_attempts": 3,
            "backoff_s": 0.01,
            "public_base_url": "https://img.example.com/",
        }
        options.update(kw)
        sender = WebhookSender(options.pop("secret", SECRET), **options)
        made.append(sender)
        return sender

    yield factory
    for sender in made:
        await sender.close()


async def test_delivers_signed_body(make_sender: SenderFactory) -> None:
    sender = make_sender()
    async with Receiver() as rx:
        job = make_job(rx.url)
        await sender.deliver(job)
    [req] = rx.requests
    assert req.method == "POST"
    assert req.target == "/hooks/done?token=s3cr3t-t0ken"
    assert req.headers["content-type"] == "application/json"
    verify(SECRET, req.headers, req.body, tolerance_s=60)
    assert req.headers["webhook-id"] == message_id(job)
    assert json.loads(req.body) == {
        "jobId": "job-1",
        "state": "SUCCEEDED",
        "refId": "ref-9",
        "tag": "batch-a",
        "outputs": [
            {
                "fileName": "out_1.webp",
                "url": f"https://img.example.com/artifacts/2031/05/06/{SHA}.webp",
                "mimeType": "image/webp",
                "width": 512,
                "height": 384,
            }
        ],
        "textOutputs": [{"text": "a cat on a mat"}],
        "responseStatus": None,
    }
    [outcome] = sender.outcomes
    assert (outcome.status, outcome.attempts, outcome.http_status) == (
        DeliveryStatus.DELIVERED,
        1,
        200,
    )
    assert outcome.host == "127.0.0.1"


async def test_failed_job_carries_response_status(make_sender: SenderFactory) -> None:
    error = ServiceError(
        ErrorKind.INVALID_ARGUMENT,
        "INVALID_PARAMETERS",
        "denoise out of range",
        violations=(FieldViolation("params.denoise", "must be in (0.0, 1.0]"),),
    )
    sender = make_sender()
    async with Receiver() as rx:
        await sender.deliver(make_job(rx.url, JobState.FAILED, outputs=[], texts=[], error=error))
    body = json.loads(rx.requests[0].body)
    assert body["state"] == "FAILED"
    assert body["outputs"] == [] and body["textOutputs"] == []
    assert body["responseStatus"] == {
        "errorCode": "INVALID_PARAMETERS",
        "message": "denoise out of range",
        "errors": [
            {
                "fieldName": "params.denoise",
                "errorCode": "INVALID_PARAMETERS",
                "message": "must be in (0.0, 1.0]",
            }
        ],
    }


async def test_retries_after_500_then_succeeds(make_sender: SenderFactory) -> None:
    sender = make_sender()
    async with Receiver(500, 503, 200) as rx:
        await sender.deliver(make_job(rx.url))
    assert len(rx.requests) == 3
    assert len({r.headers["webhook-id"] for r in rx.requests}) == 1  # receivers can dedupe
    for req in rx.requests:
        verify(SECRET, req.headers, req.body)
    assert last_status(sender) is DeliveryStatus.DELIVERED
    assert sender.outcomes[-1].attempts == 3


async def test_retries_429_honouring_retry_after(make_sender: SenderFactory) -> None:
    sender = make_sender()
    async with Receiver(Reply(429, {"retry-after": "0"}), 204) as rx:
        await sender.deliver(make_job(rx.url))
    assert len(rx.requests) == 2
    assert last_status(sender) is DeliveryStatus.DELIVERED
    # Retry-After sets a floor under the backoff (capped by max_backoff_s).
    assert sender._delay(1, 0.5) >= 0.5
    assert sender._delay(1, 10_000) <= 60


@pytest.mark.parametrize("status", [400, 401, 404, 410, 302])
async def test_no_retry_on_final_answers(make_sender: SenderFactory, status: int) -> None:
    sender = make_sender()
    reply = Reply(status, {"location": "http://127.0.0.1:1/elsewhere"})
    async with Receiver(reply) as rx:
        await sender.deliver(make_job(rx.url))
    assert len(rx.requests) == 1  # and no redirect followed
    outcome = sender.outcomes[-1]
    assert (outcome.status, outcome.attempts, outcome.http_status) == (
        DeliveryStatus.FAILED,
        1,
        status,
    )


async def test_gives_up_after_max_attempts(make_sender: SenderFactory) -> None:
    sender = make_sender(max_attempts=2)
    async with Receiver(500, 500, 500) as rx:
        await sender.deliver(make_job(rx.url))
    assert len(rx.requests) == 2
    assert last_status(sender) is DeliveryStatus.FAILED


async def test_connection_errors_are_retried_and_never_raise(make_sender: SenderFactory) -> None:
    sender = make_sender(max_attempts=2)
    async with Receiver() as rx:
        url = rx.url
    await sender.deliver(make_job(url))  # the receiver is gone: connection refused
    outcome = sender.outcomes[-1]
    assert (outcome.status, outcome.attempts) == (DeliveryStatus.FAILED, 2)
    assert outcome.detail == "ConnectError"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://10.1.2.3/hook",
        "http://172.16.0.1/hook",
        "http://192.168.1.1/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://100.64.0.1/hook",
        "http://0.0.0.0/hook",
        "http://224.0.0.1/hook",
        "http://255.255.255.255/hook",
        "http://[::1]:9/hook",
        "http://[::]/hook",
        "http://[fe80::1]/hook",
        "http://[fc00::1]/hook",
        "http://[ff02::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://[::ffff:10.0.0.1]/hook",
        "http://[2002:7f00:1::1]/hook",
        "http://2130706433/hook",
        "http://0x7f.1/hook",
        "http://localhost/hook",
        "ftp://example.com/hook",
        "file:///etc/passwd",
        "gopher://127.0.0.1:25/",
        "http:///nohost",
        "not a url",
    ],
)
async def test_refuses_non_public_targets(
    make_sender: SenderFactory, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    sender = make_sender(allow_hosts=[])
    caplog.set_level(logging.DEBUG)
    await sender.deliver(make_job(url + "?token=hunter2"))
    outcome = sender.outcomes[-1]
    assert outcome.status is DeliveryStatus.REFUSED
    assert outcome.attempts == 1
    assert "hunter2" not in caplog.text
    assert SECRET.decode() not in caplog.text


async def test_allow_list_admits_loopback(make_sender: SenderFactory) -> None:
    async with Receiver() as rx:
        refused = make_sender(allow_hosts=[])
        await refused.deliver(make_job(rx.url))
        assert last_status(refused) is DeliveryStatus.REFUSED
        assert rx.requests == []
        for allow in (["127.0.0.1"], ["127.0.0.0/8"]):
            sender = make_sender(allow_hosts=allow)
            await sender.deliver(make_job(rx.url))
            assert last_status(sender) is DeliveryStatus.DELIVERED
        private = make_sender(allow_hosts=[], allow_private=True)
        await private.deliver(make_job(rx.url))
        assert last_status(private) is DeliveryStatus.DELIVERED
    assert len(rx.requests) == 3


def fake_dns(table: dict[str, Sequence[str]]) -> Callable[[str, int], Any]:
    async def resolve(host: str, port: int) -> Sequence[IPAddress]:
        if host not in table:
            raise OSError("no such host")
        return [ipaddress.ip_address(a) for a in table[host]]

    return resolve


async def test_resolved_names_are_checked_and_pinned(make_sender: SenderFactory) -> None:
    dns = fake_dns(
        {
            "internal.test": ["10.0.0.5"],
            "mixed.test": ["93.184.216.34", "192.168.0.7"],
            "hooks.test": ["127.0.0.1"],
        }
    )
    async with Receiver() as rx:
        sender = make_sender(allow_hosts=["127.0.0.0/8"], resolver=dns, max_attempts=1)
        for host in ("internal.test", "mixed.test"):
            await sender.deliver(make_job(f"http://{host}:{rx.port}/h"))
            assert last_status(sender) is DeliveryStatus.REFUSED
        await sender.deliver(make_job(f"http://nowhere.test:{rx.port}/h"))
        assert last_status(sender) is DeliveryStatus.FAILED  # DNS failure: retryable
        # A name whose address is allowed: connects to the checked address, Host unchanged.
        await sender.deliver(make_job(f"http://hooks.test:{rx.port}/h"))
        assert last_status(sender) is DeliveryStatus.DELIVERED
    [req] = rx.requests
    assert req.headers["host"] == f"hooks.test:{rx.port}"


async def test_skips_jobs_without_reply_to_or_not_finished(make_sender: SenderFactory) -> None:
    sender = make_sender()
    async with Receiver() as rx:
        await sender.deliver(make_job(""))
        await sender.deliver(make_job(rx.url, JobState.RUNNING))
    assert rx.requests == []
    assert [o.status for o in sender.outcomes] == [DeliveryStatus.SKIPPED] * 2


async def test_unsigned_without_secret(make_sender: SenderFactory) -> None:
    sender = make_sender(secret=None)
    async with Receiver() as rx:
        await sender.deliver(make_job(rx.url))
    [req] = rx.requests
    assert "webhook-signature" not in req.headers
    assert req.headers["webhook-timestamp"].isdigit()


async def test_submit_runs_in_background_and_close_waits(make_sender: SenderFactory) -> None:
    sender = make_sender()
    seen: list[DeliveryOutcome] = []
    sender._on_outcome = seen.append
    async with Receiver() as rx:
        sender.submit(make_job(rx.url))
        await sender.close(grace_s=5)
    assert len(rx.requests) == 1
    assert [o.status for o in seen] == [DeliveryStatus.DELIVERED]


async def test_verify_rejects_tampering(make_sender: SenderFactory) -> None:
    sender = make_sender()
    async with Receiver() as rx:
        await sender.deliver(make_job(rx.url))
    req = rx.requests[0]
    with pytest.raises(SignatureError):
        verify(SECRET, req.headers, req.body + b" ")
    with pytest.raises(SignatureError):
        verify(b"another secret", req.headers, req.body)
    with pytest.raises(SignatureError):
        verify(SECRET, {**req.headers, "webhook-id": "msg_other"}, req.body)
    with pytest.raises(SignatureError):
        ts = int(req.headers["webhook-timestamp"])
        verify(SECRET, req.headers, req.body, tolerance_s=300, now=ts + 301)
