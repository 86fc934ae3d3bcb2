"""A ComfyUI client for one agent: upload, queue, follow, download, cancel, recover.

One run (:meth:`ComfyClient.run`):

1. open ``/ws?clientId=<uuid>`` first: ComfyUI drops messages for absent clients;
2. upload each input as ``{job_id}-{field}-{sha8}.{ext}`` (unique per job, so a resubmit never
   reuses another job's cached result, and a retry of the same job reuses its own upload);
3. checkpoint ``{agent, prompt_id, client_id, seed}`` (the prompt id is ours, so a restart can
   re-attach even if it happened mid-``POST``), then ``POST /prompt`` with that ``prompt_id``;
4. follow the websocket, matching on ``prompt_id``, into :class:`ProviderProgress`; outputs come
   from ``executed`` messages (``/history`` or ``/api/jobs`` when messages were missed);
5. download images with ``/view``; text outputs (``{"text": [...]}``) go to the sink as text.

A dropped websocket is reopened with backoff and the prompt's state read back over HTTP. When a
run is abandoned (cancelled, timed out, the agent lost), its prompt is deleted if pending and
interrupted if running; a cancellation whose message is ``SHUTDOWN`` detaches instead, leaving
the prompt to be re-attached after the restart. Errors are :class:`ServiceError`; agent trouble
(refused, 5xx, timeouts) is :class:`ProviderUnavailable` so the scheduler may retry elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from aiserver.providers.base import ProviderUnavailable, RunSink, WorkItem
from aiserver.providers.comfy.run import Run
from aiserver.providers.comfy.workflows import Workflow

__all__ = ["ComfyClient", "ComfyTimeouts", "RemoteJob", "UploadedFile"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ComfyTimeouts:
    """How long to wait for an agent, per phase. Seconds."""

    connect_s: float = 5.0
    """TCP connect and websocket handshake."""
    request_s: float = 60.0
    """One HTTP request, uploads and downloads included."""
    queue_wait_s: float = 900.0
    """A queued prompt may wait this long for ComfyUI to start it."""
    execution_s: float = 1800.0
    """From the start of execution to its end."""
    idle_s: float = 180.0
    """Longest silence from a running prompt (one CPU sampler step was seen to take 9 s)."""
    poll_s: float = 5.0
    """After this much websocket silence, ask over HTTP how the prompt is doing."""
    reconnect_s: float = 30.0
    """Budget for getting a dropped websocket back."""
    backoff_initial_s: float = 0.1
    """First wait between websocket reconnect attempts; doubles up to ``backoff_max_s``."""
    backoff_max_s: float = 2.0
    cancel_s: float = 5.0
    """Budget for deleting or interrupting the remote prompt when a run is abandoned."""


@dataclass(frozen=True, slots=True)
class UploadedFile:
    """What ``/upload/image`` answered; ``path`` is what ``LoadImage`` takes."""

    name: str
    subfolder: str
    type: str

    @property
    def path(self) -> str:
        return f"{self.subfolder}/{self.name}" if self.subfolder else self.name


@dataclass(frozen=True, slots=True)
class RemoteJob:
    """A prompt's state as the agent reports it over HTTP."""

    state: str
    """``pending``, ``running``, ``done`` or ``unknown`` (the agent has never heard of it)."""
    success: bool = False
    outputs: Mapping[str, Any] = field(default_factory=dict)
    messages: Sequence[Any] = ()
    """History status messages: ``[event, data]`` pairs (execution_error and the like)."""


class ComfyClient:
    """HTTP + websocket access to one ComfyUI agent."""

    def __init__(
        self,
        name: str,
        url: str,
        *,
        api_key: str = "",
        timeouts: ComfyTimeouts | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        self.url = url.rstrip("/")
        self.timeouts = timeouts or ComfyTimeouts()
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers=self._headers,
            timeout=httpx.Timeout(self.timeouts.request_s, connect=self.timeouts.connect_s),
            transport=transport,
        )
        self._jobs_api: bool | None = None  # /api/jobs exists (newer servers); None: unknown
        self._background: set[asyncio.Task[None]] = set()

    async def aclose(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self._http.aclose()

    # ---- plain API ------------------------------------------------------------------------

    async def system_stats(self) -> dict[str, Any]:
        return self._json(await self._get_ok("/system_stats"), "/system_stats")

    async def object_info(self) -> dict[str, Any]:
        return self._json(await self._get_ok("/object_info"), "/object_info")

    async def upload_image(self, data: bytes, file_name: str, mime_type: str) -> UploadedFile:
        response = await self._request(
            "POST",
            "/upload/image",
            files={"image": (file_name, data, mime_type)},
            data={"type": "input"},
        )
        if response.status_code != 200:
            raise self.unavailable(f"upload of {file_name} answered {response.status_code}")
        body = self._json(response, "/upload/image")
        return UploadedFile(
            str(body.get("name", file_name)),
            str(body.get("subfolder", "")),
            str(body.get("type", "input")),
        )

    async def post_prompt(self, body: Mapping[str, Any]) -> tuple[bool, dict[str, Any]]:
        """``POST /prompt``: ``(True, answer)`` when queued, ``(False, error body)`` on a 400."""
        response = await self._request("POST", "/prompt", json=body)
        if response.status_code == 400:
            try:
                error = response.json()
            except ValueError:
                error = None
            if not isinstance(error, dict):
                error = {"error": {"type": "", "message": response.text[:500]}, "node_errors": {}}
            return False, error
        if response.status_code != 200:
            raise self.unavailable(f"POST /prompt answered {response.status_code}")
        return True, self._json(response, "/prompt")

    async def delete_pending(self, prompt_ids: Iterable[str]) -> None:
        """``POST /queue {delete}``: removes prompts that have not started (no-op otherwise)."""
        await self._request("POST", "/queue", json={"delete": list(prompt_ids)})

    async def interrupt(self, prompt_id: str | None) -> None:
        """``POST /interrupt``; with a prompt id it stops only that prompt, if it is running."""
        await self._request(
            "POST", "/interrupt", json={"prompt_id": prompt_id} if prompt_id else {}
        )

    async def view(self, filename: str, subfolder: str, kind: str) -> tuple[bytes, str]:
        """An output file's bytes and content type."""
        response = await self._request(
            "GET", "/view", params={"filename": filename, "subfolder": subfolder, "type": kind}
        )
        if response.status_code != 200:
            raise self.unavailable(
                f"output {subfolder}/{filename} ({kind}) answered {response.status_code}",
                cause="output_missing",
            )
        return response.content, response.headers.get("content-type", "")

    async def queue_position(self, prompt_id: str) -> int | None:
        """Prompts ahead of ``prompt_id`` (running ones included); None if not pending."""
        body = self._json(await self._get_ok("/queue"), "/queue")
        running = [item for item in body.get("queue_running", []) if _queue_id(item)]
        pending = sorted(
            (item for item in body.get("queue_pending", []) if _queue_id(item)),
            key=lambda item: _number(item[0]),
        )
        ids = [_queue_id(item) for item in pending]
        if prompt_id not in ids:
            return None
        return len(running) + ids.index(prompt_id)

    async def remote_job(self, prompt_id: str) -> RemoteJob:
        """Where a prompt is: ``/api/jobs/{id}`` when the agent has it, else history + queue."""
        if self._jobs_api is not False:
            response = await self._request("GET", f"/api/jobs/{prompt_id}")
            if response.status_code == 200:
                self._jobs_api = True
                return _job_from_api(self._json(response, "/api/jobs"))
            if response.status_code == 404 and self._jobs_api is None:
                probe = await self._request("GET", "/api/jobs", params={"limit": 1})
                self._jobs_api = probe.status_code == 200
            if self._jobs_api:
                return RemoteJob("unknown")
        # The queue first: ComfyUI moves a prompt from running to history in one step, so a
        # prompt missing from the queue is in the history unless it is unknown.
        queue = self._json(await self._get_ok("/queue"), "/queue")
        if any(_queue_id(item) == prompt_id for item in queue.get("queue_running", [])):
            return RemoteJob("running")
        if any(_queue_id(item) == prompt_id for item in queue.get("queue_pending", [])):
            return RemoteJob("pending")
        history = self._json(await self._get_ok(f"/history/{prompt_id}"), "/history")
        entry = history.get(prompt_id)
        if isinstance(entry, dict):
            status = entry.get("status") or {}
            return RemoteJob(
                "done",
                success=status.get("status_str") == "success",
                outputs=entry.get("outputs") or {},
                messages=status.get("messages") or [],
            )
        return RemoteJob("unknown")

    # ---- running a job -------------------------------------------------------------------

    async def run(self, work: WorkItem, workflow: Workflow, sink: RunSink) -> None:
        """Run ``work`` here to the end; re-attaches when ``work.resume`` names this agent."""
        resume = work.resume if work.resume.get("agent") == self.name else {}
        await Run(self, work, workflow, sink, resume).execute()

    def unavailable(
        self, message: str, *, cause: str = "agent", **extra: str
    ) -> ProviderUnavailable:
        """A retryable error naming this agent."""
        error = ProviderUnavailable(f"ComfyUI agent {self.name}: {message}", agent=self.name)
        error.metadata = {"agent": self.name, "url": self.url, "cause": cause, **extra}
        return error

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` to the end even if the caller is cancelled (remote cleanup)."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ---- transport -----------------------------------------------------------------------

    def _json(self, response: httpx.Response, what: str) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError as exc:
            raise self.unavailable(f"{what} did not answer JSON", cause="protocol") from exc
        if not isinstance(body, dict):
            raise self.unavailable(f"{what} answered {type(body).__name__}", cause="protocol")
        return body

    async def _get_ok(self, path: str) -> httpx.Response:
        response = await self._request("GET", path)
        if response.status_code != 200:
            raise self.unavailable(f"GET {path} answered {response.status_code}")
        return response

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        if self._http.is_closed:
            raise self.unavailable(f"{method} {path}: the client is closed", cause="closed")
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise self.unavailable(f"{method} {path} timed out", cause="timeout") from exc
        except httpx.HTTPError as exc:
            raise self.unavailable(
                f"{method} {path} failed: {type(exc).__name__}: {exc}", cause="connection"
            ) from exc
        if response.status_code >= 500:
            raise self.unavailable(
                f"{method} {path} answered {response.status_code}: {response.text[:200]}",
                cause="server_error",
                status=str(response.status_code),
            )
        if response.status_code in (401, 403, 407):
            raise self.unavailable(
                f"{method} {path} was refused ({response.status_code}): check the agent's api key",
                cause="auth",
                status=str(response.status_code),
            )
        return response

    async def open_websocket(self, client_id: str) -> ClientConnection:
        parts = urlsplit(self.url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        path = parts.path.rstrip("/") + "/ws"
        ws_url = urlunsplit((scheme, parts.netloc, path, f"clientId={client_id}", ""))
        try:
            return await connect(
                ws_url,
                additional_headers=self._headers,
                open_timeout=self.timeouts.connect_s,
                max_size=64 * 1024 * 1024,  # preview frames can be large
                close_timeout=1,
            )
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise self.unavailable(
                f"websocket failed: {type(exc).__name__}: {exc}", cause="websocket"
            ) from exc


def _job_from_api(job: Mapping[str, Any]) -> RemoteJob:
    status = job.get("status")
    if status == "pending":
        return RemoteJob("pending")
    if status == "in_progress":
        return RemoteJob("running")
    execution = job.get("execution_status") or {}
    messages = list(execution.get("messages") or []) if isinstance(execution, dict) else []
    if status == "failed" and not messages and isinstance(job.get("execution_error"), dict):
        messages = [["execution_error", job["execution_error"]]]
    return RemoteJob(
        "done",
        success=status == "completed",
        outputs=job.get("outputs") or {},
        messages=messages,
    )


def _queue_id(item: Any) -> str:
    return str(item[1]) if isinstance(item, list) and len(item) > 1 else ""


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0
