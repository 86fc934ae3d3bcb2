"""HTTP and websocket access to one ComfyUI agent: the transport, nothing of a run.

HTTP goes through :mod:`~aiserver.providers.comfy.agent_http`, a kept-alive HTTP/1.1 exchange
of its own: every job makes two requests, and aiohttp's client took about three times its CPU
per request (httpx, measured earlier, three times aiohttp's).

Upload, queue, history and ``/api/jobs``, view, interrupt, queue delete, ``object_info``, and
opening the websocket (its frames are read with :func:`~aiserver.providers.comfy.messages.decode`).
Agent trouble (refused, 5xx, auth, timeouts, not JSON) is a
:class:`~aiserver.providers.failures.ProviderUnavailable` naming this agent and its
:class:`~aiserver.providers.failures.Cause`. A run over this client is
:class:`~aiserver.providers.comfy.run.Run`, driven by the pool.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from aiserver import fast_json
from aiserver.providers.comfy.agent_http import AgentHttp, ConnectFailed, HttpError
from aiserver.providers.comfy.agent_socket import AgentSocket, SocketLost
from aiserver.providers.comfy.channel import AgentChannel
from aiserver.providers.comfy.errors import agent_unavailable
from aiserver.providers.comfy.input_names import InputNames
from aiserver.providers.comfy.messages import Message, decode_event
from aiserver.providers.failures import Cause, ProviderUnavailable

__all__ = ["AgentSocket", "ComfyClient", "RemoteJob", "Reply", "SocketLost", "UploadedFile"]
# AgentSocket and SocketLost live in agent_socket.py; they are re-exported here for callers of
# open_websocket.

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
    graph: Mapping[str, Any] | None = None
    """The graph as queued, when the agent reports it (a prompt that has ended)."""


@dataclass(frozen=True, slots=True)
class Reply:
    """An HTTP answer, read whole (the agent's answers are small, ``/view`` aside)."""

    status_code: int
    content: bytes = field(repr=False)
    content_type: str

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        """The body as JSON; ValueError when it is not."""
        return fast_json.loads(self.content)


def _upload_form(
    data: bytes, file_name: str, mime_type: str, boundary: str, *, overwrite: bool
) -> tuple[bytes, str]:
    """The ``multipart/form-data`` body of an upload, and its content type.

    Written out rather than through ``aiohttp.FormData``: measured on the stand-in (300 uploads
    of a 64 px PNG), 0.96-1.18 ms of CPU per upload, client and stand-in together, against
    1.5-2.0 ms with FormData, and every job uploads. ``boundary`` must not occur in ``data``:
    a random part no caller can know, and a count (:meth:`ComfyClient.upload_image`).
    """
    # Quotes and line breaks cannot end the header early (browsers escape them the same way).
    quoted = file_name.replace("\r", "%0D").replace("\n", "%0A").replace('"', "%22")
    fields = {"type": "input", **({"overwrite": "true"} if overwrite else {})}
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="image"; filename="{quoted}"\r\n'
        f"Content-Type: {mime_type}\r\n\r\n"
    )
    tail = "".join(
        f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}'
        for name, value in fields.items()
    )
    body = b"".join((head.encode(), data, f"{tail}\r\n--{boundary}--\r\n".encode()))
    return body, f"multipart/form-data; boundary={boundary}"


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
    ) -> None:
        self.name = name
        self.url = url.rstrip("/")
        self._connect_s = connect_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = AgentHttp(
            self.url, headers=self._headers, connect_s=connect_s, request_s=request_s
        )
        self._closed = False
        self._boundary = uuid.uuid4().hex  # multipart boundaries: this and a count
        self._uploads = itertools.count()
        self._jobs_api: bool | None = None  # /api/jobs exists (newer servers); None: unknown
        self.channel = AgentChannel(name, self.open_websocket, uuid.uuid4().hex)
        """The websocket shared by every run this process starts on the agent."""
        self._adopted: dict[str, tuple[AgentChannel, int]] = {}
        self.input_names = InputNames()
        """Upload names reused once their job ended (runs that opt in)."""

    def adopt(self, client_id: str) -> AgentChannel:
        """The websocket under an earlier process's ``client_id``, for the runs re-attaching to
        its prompts: one, shared by them all (ComfyUI keeps one socket per client id; a second
        would take the first one's messages). Hand it back with :meth:`let_go`."""
        channel, users = self._adopted.get(client_id, (None, 0))
        if channel is None:
            channel = AgentChannel(self.name, self.open_websocket, client_id)
        self._adopted[client_id] = (channel, users + 1)
        return channel

    def let_go(self, channel: AgentChannel) -> bool:
        """A run is done with an adopted channel; True when it was the last (close it then)."""
        _, users = self._adopted.get(channel.client_id, (channel, 1))
        if users > 1:
            self._adopted[channel.client_id] = (channel, users - 1)
            return False
        self._adopted.pop(channel.client_id, None)
        return True

    async def aclose(self) -> None:
        self._closed = True
        await self.channel.aclose()
        for channel, _ in list(self._adopted.values()):
            await channel.aclose()
        await self._http.close()

    # ---- plain API ------------------------------------------------------------------------

    async def system_stats(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        """``GET /system_stats``: is the agent there. ``timeout_s`` bounds it instead of the
        request timeout (a liveness probe must not wait as long as an upload may take)."""
        return self._json(await self._get_ok("/system_stats", timeout_s), "/system_stats")

    async def object_info(self) -> dict[str, Any]:
        return self._json(await self._get_ok("/object_info"), "/object_info")

    async def upload_image(
        self, data: bytes, file_name: str, mime_type: str, *, overwrite: bool = False
    ) -> UploadedFile:
        """``POST /upload/image``; without ``overwrite`` a clash with other bytes is renamed."""
        boundary = f"{self._boundary}{next(self._uploads):x}"
        form, content_type = _upload_form(data, file_name, mime_type, boundary, overwrite=overwrite)
        response = await self._request("POST", "/upload/image", form, content_type)
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
        response = await self._post_json("/prompt", body)
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
        await self._post_json("/queue", {"delete": list(prompt_ids)})

    async def interrupt(self, prompt_id: str | None) -> None:
        """``POST /interrupt``; with a prompt id it stops only that prompt, if it is running."""
        await self._post_json("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    async def withdraw(self, prompt_id: str, *, started: bool = False) -> None:
        """Take a prompt off the agent: delete it while it waits in the queue, interrupt it if
        it runs (``started``: known to run already)."""
        if not started:
            await self.delete_pending([prompt_id])
            if (await self.remote_job(prompt_id)).state != "running":
                return
        await self.interrupt(prompt_id)

    async def view(self, filename: str, subfolder: str, kind: str) -> tuple[bytes, str]:
        """An output file's bytes and content type."""
        response = await self._request(
            "GET", "/view", query={"filename": filename, "subfolder": subfolder, "type": kind}
        )
        if response.status_code != 200:
            raise self.unavailable(
                f"output {subfolder}/{filename} ({kind}) answered {response.status_code}",
                cause=Cause.OUTPUT_MISSING,
            )
        return response.content, response.content_type

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
                probe = await self._request("GET", "/api/jobs", query={"limit": 1})
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
            queued = entry.get("prompt")
            return RemoteJob(
                "done",
                success=status.get("status_str") == "success",
                outputs=entry.get("outputs") or {},
                messages=_events(status.get("messages")),
                # The queue tuple: [number, prompt_id, graph, extra_data, outputs].
                graph=_mapping(queued[2] if isinstance(queued, list) and len(queued) > 2 else None),
            )
        return RemoteJob("unknown")

    def unavailable(self, message: str, *, cause: Cause, **extra: str) -> ProviderUnavailable:
        """A retryable failure naming this agent."""
        return agent_unavailable(self.name, self.url, message, cause=cause, **extra)

    # ---- transport -----------------------------------------------------------------------

    def _json(self, response: Reply, what: str) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError as exc:
            raise self.unavailable(f"{what} did not answer JSON", cause=Cause.PROTOCOL) from exc
        if not isinstance(body, dict):
            raise self.unavailable(f"{what} answered {type(body).__name__}", cause=Cause.PROTOCOL)
        return body

    async def _get_ok(self, path: str, timeout_s: float | None = None) -> Reply:
        response = await self._request("GET", path, timeout_s=timeout_s)
        if response.status_code != 200:
            raise self.unavailable(
                f"GET {path} answered {response.status_code}", cause=Cause.PROTOCOL
            )
        return response

    async def _post_json(self, path: str, body: Any) -> Reply:
        return await self._request("POST", path, fast_json.dumps(body), "application/json")

    async def _request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        content_type: str = "",
        *,
        query: Mapping[str, str | int] | None = None,
        timeout_s: float | None = None,
    ) -> Reply:
        if self._closed:
            raise self.unavailable(
                f"{method} {path}: the client is closed", cause=Cause.CLIENT_CLOSED
            )
        try:
            answer = await self._http.request(
                method, path, body=body, content_type=content_type, query=query, timeout_s=timeout_s
            )
        except TimeoutError as exc:
            raise self.unavailable(f"{method} {path} timed out", cause=Cause.TIMEOUT) from exc
        except HttpError as exc:
            what = "connection failed" if isinstance(exc, ConnectFailed) else "failed"
            raise self.unavailable(
                f"{method} {path} {what}: {exc}", cause=Cause.CONNECTION
            ) from exc
        response = Reply(answer.status, answer.body, answer.headers.get("content-type", ""))
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
                # Output images come as frames (SaveImageWebsocket): a frame over the limit
                # drops the socket for every run on it, so the limit is an output's size.
                max_size=256 * 1024 * 1024,
                close_timeout=1,
                # No permessage-deflate: the frames are small JSON and already-compressed
                # images, and inflating each one cost the service CPU per frame (and the agent
                # the deflate of every output image it sends).
                compression=None,
            )
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise self.unavailable(
                f"websocket failed: {type(exc).__name__}: {exc}", cause=Cause.WEBSOCKET
            ) from exc
        return AgentSocket(ws)


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
    workflow = job.get("workflow")
    return RemoteJob(
        "done",
        success=status == "completed",
        outputs=job.get("outputs") or {},
        messages=messages,
        graph=_mapping(workflow.get("prompt") if isinstance(workflow, dict) else None),
    )


def _mapping(value: Any) -> Mapping[str, Any] | None:
    return value if isinstance(value, dict) else None


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
