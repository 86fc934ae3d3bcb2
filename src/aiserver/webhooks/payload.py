"""The JSON body a ReplyTo URL receives when a job ends (camelCase, as AI Server sends)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from aiserver.jobs.model import Job

__all__ = ["body_of", "message_id", "message_id_for", "payload_of"]


def _same(url: str) -> str:
    return url


def payload_of(
    job: Job, public_base_url: str = "", link: Callable[[str], str] = _same
) -> dict[str, Any]:
    """``{jobId, state, refId, tag, outputs, textOutputs, responseStatus}``.

    Output URLs go through ``link`` (signed, when the server signs URLs), then are made
    absolute with ``public_base_url`` (left relative when it is empty). ``responseStatus`` is
    null unless the job carries an error.
    """
    base = public_base_url.rstrip("/")
    status: dict[str, Any] | None = None
    if job.error is not None:
        status = {
            "errorCode": job.error.reason,
            "message": job.error.message,
            "errors": [
                {"fieldName": v.field, "errorCode": job.error.reason, "message": v.description}
                for v in job.error.violations
            ],
        }
    return {
        "jobId": job.id,
        "state": job.state.value,
        "refId": job.ref_id,
        "tag": job.tag,
        "outputs": [
            {
                "fileName": a.file_name,
                "url": base + link(a.url) if base else link(a.url),
                "mimeType": a.mime_type,
                "width": a.width,
                "height": a.height,
            }
            for a in job.outputs
        ],
        "textOutputs": [{"text": t} for t in job.texts],
        "responseStatus": status,
    }


def body_of(job: Job, public_base_url: str = "", link: Callable[[str], str] = _same) -> bytes:
    """The exact bytes sent (and signed): compact UTF-8 JSON."""
    payload = payload_of(job, public_base_url, link)
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def message_id(job: Job) -> str:
    """``webhook-id``: the same for every attempt at one job's state, so receivers can dedupe.

    Hashed so that any job id gives a short, header-safe value.
    """
    return message_id_for(job.id, job.state.value)


def message_id_for(job_id: str, state: str) -> str:
    """:func:`message_id` from a job id and state name (of a stored body)."""
    digest = hashlib.sha256(f"{job_id}\x00{state}".encode()).hexdigest()
    return f"msg_{digest[:32]}"
