"""HTTP and websocket access to one ComfyUI agent: the transport, nothing of a run.

Upload, queue, history and ``/api/jobs``, view, interrupt, queue delete, ``object_info``, and
opening the websocket (its frames are read with :func:`~aiserver.providers.comfy.messages.decode`).
Agent trouble (refused, 5xx, auth, timeouts, not JSON) is a
:class:`~aiserver.providers.failures.ProviderUnavailable` naming this agent and its
:class:`~aiserver.providers.failures.Cause`. A run over this client is
:class:`~aiserver.providers.comfy.run.Run`, driven by the pool.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from aiserver.providers.comfy.errors import agent_unavailable
from aiserver.providers.comfy.messages import Message, decode, decode_event
from aiserver.providers.failures import Cause, ProviderUnavailable

__all__ = ["AgentSocket", "ComfyClient", "RemoteJob", "SocketLost", "UploadedFile"]

logger = logging.getLogger(__name__)


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
    messages: Sequence[Message] = ()
    """History status messages, decoded (execution_error and the like)."""


class ComfyClient:
    """HTTP + websocket access to one ComfyUI agent."""

    def __init__(
        self,
        name: str,
        url: str,
        *,
        api_key: str = "",
        connect_s: float = 5.0,
        request_s: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        self.url = url.rstrip("/")
        self._connect_s = connect_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers=self._headers,
            timeout=httpx.Timeout(request_s, connect=connect_s),
            transport=transport,
        )
        self._jobs_api: bool | None = None  # /api/jobs exists (newer servers); None: unknown

    async def aclose(self) -> None:
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
            raise self.unavailable(
                f"upload of {file_name} answered {response.status_code}", cause=Cause.PROTOCOL
            )
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
            raise self.unavailable(
                f"POST /prompt answered {response.status_code}", cause=Cause.PROTOCOL
            )
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
                cause=Cause.OUTPUT_MISSING,
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
                messages=_events(status.get("messages")),
            )
        return RemoteJob("unknown")

    def unavailable(self, message: str, *, cause: Cause, **extra: str) -> ProviderUnavailable:
        """A retryable failure naming this agent."""
        return agent_unavailable(self.name, self.url, message, cause=cause, **extra)

    # ---- transport -----------------------------------------------------------------------

    def _json(self, response: httpx.Response, what: str) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError as exc:
            raise self.unavailable(f"{what} did not answer JSON", cause=Cause.PROTOCOL) from exc
        if not isinstance(body, dict):
            raise self.unavailable(f"{what} answered {type(body).__name__}", cause=Cause.PROTOCOL)
        return body

    async def _get_ok(self, path: str) -> httpx.Response:
        response = await self._request("GET", path)
        if response.status_code != 200:
            raise self.unavailable(
                f"GET {path} answered {response.status_code}", cause=Cause.PROTOCOL
            )
        return response

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        if self._http.is_closed:
            raise self.unavailable(
                f"{method} {path}: the client is closed", cause=Cause.CLIENT_CLOSED
            )
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise self.unavailable(f"{method} {path} timed out", cause=Cause.TIMEOUT) from exc
        except httpx.HTTPError as exc:
            raise self.unavailable(
                f"{method} {path} failed: {type(exc).__name__}: {exc}", cause=Cause.CONNECTION
            ) from exc
        if response.status_code >= 500:
            raise self.unavailable(
                f"{method} {path} answered {response.status_code}: {response.text[:200]}",
                cause=Cause.SERVER_ERROR,
                status=str(response.status_code),
            )
        if response.status_code in (401, 403, 407):
            raise self.unavailable(
                f"{method} {path} was refused ({response.status_code}): check the agent's api key",
                cause=Cause.AUTH,
                status=str(response.status_code),
            )
        return response

    async def open_websocket(self, client_id: str) -> AgentSocket:
        """``/ws?clientId=``: open it before queueing, ComfyUI drops messages for absent clients."""
        parts = urlsplit(self.url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        path = parts.path.rstrip("/") + "/ws"
        ws_url = urlunsplit((scheme, parts.netloc, path, f"clientId={client_id}", ""))
        try:
            ws = await connect(
                ws_url,
                additional_headers=self._headers,
                open_timeout=self._connect_s,
                max_size=64 * 1024 * 1024,  # preview frames can be large
                close_timeout=1,
            )
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise self.unavailable(
                f"websocket failed: {type(exc).__name__}: {exc}", cause=Cause.WEBSOCKET
            ) from exc
        return AgentSocket(ws)


class SocketLost(Exception):
    """The websocket dropped (the agent went away, or the network did)."""


class AgentSocket:
    """One websocket to an agent, read as decoded messages."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws

    async def recv(self) -> Message:
        """The next frame; :class:`SocketLost` when the connection dropped."""
        try:
            frame = await self._ws.recv()
        except ConnectionClosed as exc:
            raise SocketLost(str(exc)) from exc
        return decode(frame)

    async def close(self) -> None:
        """Close without waiting on the agent (errors ignored: the job is over)."""
        with contextlib.suppress(Exception):
            await self._ws.close()


def _job_from_api(job: Mapping[str, Any]) -> RemoteJob:
    status = job.get("status")
    if status == "pending":
        return RemoteJob("pending")
    if status == "in_progress":
        return RemoteJob("running")
    execution = job.get("execution_status") or {}
    messages = _events(execution.get("messages")) if isinstance(execution, dict) else ()
    if status == "failed" and not messages and isinstance(job.get("execution_error"), dict):
        messages = (decode_event("execution_error", job["execution_error"]),)
    return RemoteJob(
        "done",
        success=status == "completed",
        outputs=job.get("outputs") or {},
        messages=messages,
    )


def _events(pairs: Any) -> tuple[Message, ...]:
    """History's ``[event, data]`` pairs, decoded; other entries are skipped."""
    if not isinstance(pairs, list):
        return ()
    return tuple(
        decode_event(entry[0], entry[1])
        for entry in pairs
        if isinstance(entry, list | tuple) and len(entry) >= 2
    )


def _queue_id(item: Any) -> str:
    return str(item[1]) if isinstance(item, list) and len(item) > 1 else ""


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0
