"""A ComfyUI stand-in that speaks the recorded protocol, with fault injection for tests.

Every behaviour cites the recording it reproduces (``recordings/`` and
``/work/shared/reference/comfyui/README.md``). Graphs really execute: nodes are emulated with
Pillow (``engine.py``), outputs are files that ``/view`` serves.

Faults are set on the running object: :meth:`fail_http`, :meth:`drop_websockets_at`,
:meth:`drop_websockets`, :meth:`hang_at`, :meth:`set_queue_delay`, :meth:`pause_queue`,
:meth:`set_step_delay`, :meth:`fail_node`, :meth:`kill`. What arrived is in :attr:`received`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import io
import json
import os
import time
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from PIL import Image

from .catalogue import MODEL_INPUTS, Catalogue, PromptRejected
from .engine import NODES, ExecutionList, Interrupted, NodeContext, Signatures, is_link
from .wire import HttpRequest, HttpResponse, HttpServer, WsPeer, parse_multipart

__all__ = ["DEFAULT_MODELS", "ComfyStandIn", "QueueItem", "Received", "Upload"]

DEFAULT_MODELS: Mapping[str, Sequence[str]] = {
    "checkpoints": ["sd15_random.safetensors", "v1-5-pruned-emaonly.safetensors"],
    "upscale_models": ["RealESRGAN_x2.pth", "RealESRGAN_x4plus.pth", "corrupt_for_probe.pth"],
}
# aiohttp's body for an unhandled exception (errors.json: invalid_json_body).
_TROUBLE = "500 Internal Server Error\n\nServer got itself in trouble"
# http_samples.json "features" / the feature_flags reply in ws_trace_upscale_model.json.
_FEATURES = {
    "supports_preview_metadata": True,
    "max_upload_size": 104857600,
    "extension": {"manager": {"supports_v4": True}},
}


class _Frame:
    """A binary frame's image, encoded for a kind of peer only once one of them is sent it:
    the legacy frame (types 1/2: the image as RGB) and type 4's image bytes (the image as it
    is). ComfyUI encodes an output once, for the kind of client it serves; encoding both here
    for every frame charged a job on the service path (type 4 only) a second PNG encode, about
    1 ms of the stand-in's CPU for a 64 px output, that a client of ComfyUI never waits for.
    An RGB image's two encodings are the same bytes: made once, shared."""

    __slots__ = ("_encoded", "_fmt", "_legacy", "image", "mime")

    def __init__(self, image: Image.Image, fmt: str, mime: str) -> None:
        self.image = image
        self.mime = mime
        self._fmt = fmt
        self._legacy: bytes | None = None
        self._encoded: bytes | None = None

    def legacy(self) -> bytes:
        """Types 1/2: ``[u32 1][u32 1=JPEG 2=PNG][bytes]``."""
        if self._legacy is None:
            head = (1).to_bytes(4, "big") + (1 if self._fmt == "JPEG" else 2).to_bytes(4, "big")
            if self._encoded is not None and self.image.mode == "RGB":
                self._legacy = head + self._encoded
            else:
                self._legacy = _image_frame(self.image, self._fmt)
        return self._legacy

    def encoded(self) -> bytes:
        """The image bytes of a type 4 frame."""
        if self._encoded is None:
            if self._legacy is not None and self.image.mode == "RGB":
                self._encoded = self._legacy[8:]
            else:
                buffer = io.BytesIO()
                self.image.save(buffer, format=self._fmt)
                self._encoded = buffer.getvalue()
        return self._encoded


_GUARDED = True  # sent only when the prompt has a client_id (execution.py add_message)


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(slots=True)
class QueueItem:
    number: int | float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]
    seq: int = 0
    ready_at: float = 0.0

    def as_list(self) -> list[Any]:
        # The 5-element queue tuple of /queue and history (ws_trace_interrupt.json).
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


@dataclass(slots=True)
class Upload:
    route: str
    name: str
    subfolder: str
    type: str
    data: bytes
    overwrite: bool


@dataclass(slots=True)
class Received:
    """What the stand-in was sent, for assertions."""

    prompts: list[Any] = field(default_factory=list)
    """Every ``POST /prompt`` body, parsed (accepted or not)."""
    raw_prompts: list[bytes] = field(default_factory=list)
    uploads: list[Upload] = field(default_factory=list)
    interrupts: list[dict[str, Any]] = field(default_factory=list)
    queue_posts: list[dict[str, Any]] = field(default_factory=list)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    ws_connects: list[str] = field(default_factory=list)
    sent: list[tuple[str, str, Any]] = field(default_factory=list)
    """(client id, event type, data) of every websocket JSON message sent."""

    @property
    def deletes(self) -> list[str]:
        return [pid for body in self.queue_posts for pid in body.get("delete", [])]

    def queued(self, prompt_id: str) -> dict[str, Any]:
        """The verbatim ``POST /prompt`` body that queued ``prompt_id``."""
        for body in self.prompts:
            if isinstance(body, dict) and body.get("prompt_id") == prompt_id:
                return body
        raise KeyError(prompt_id)


class NotEmulated(RuntimeError):
    """A node the catalogue knows but the stand-in cannot run. Like any node that raises in
    real ComfyUI, it ends the prompt with an ``execution_error`` naming this type."""


class _Injected(Exception):
    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(message)
        self.type_name = type_name


class ComfyStandIn:
    """A fake ComfyUI agent on ``127.0.0.1:<free port>``."""

    def __init__(
        self,
        root: Path,
        *,
        models: Mapping[str, Sequence[str]] | None = None,
        jobs_api: bool = True,
        api_key: str | None = None,
        step_delay_s: float = 0.001,
        missing_nodes: Sequence[str] = (),
        version: str = "0.8.0",
        feature_flags: bool = True,
    ) -> None:
        self.root = root
        self.input_dir = root / "input"
        self.output_dir = root / "output"
        self.temp_dir = root / "temp"
        for folder in (self.input_dir, self.output_dir, self.temp_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.catalogue = Catalogue(
            {k: list(v) for k, v in (models if models is not None else DEFAULT_MODELS).items()},
            self._input_files,
        )
        for node in missing_nodes:
            self.catalogue.remove_node(node)
        self.jobs_api = jobs_api
        self.api_key = api_key
        self.version = version
        self.feature_flags = feature_flags
        """False: an older server that ignores the client's feature flags (no answer, no
        preview metadata: binary frames are type 1 and name no prompt)."""
        self.received = Received()
        self._http = self._new_http()
        self._peers: dict[str, WsPeer] = {}
        self._reset_state()
        # faults
        self._step_delay = step_delay_s
        self._queue_delay = 0.0
        self._paused = False
        self._http_faults: dict[str, list[int | None]] = {}
        self._drop_at: dict[str, float] = {}
        self._ws_outage_until = 0.0
        self._hang_at: dict[str, bool] = {}
        self._hold_at: dict[str, int] = {}
        self._fail_at: dict[str, tuple[str, str]] = {}
        self._node_delay: dict[str, float] = {}
        self._repeat_steps: set[str] = set()
        self._worker: asyncio.Task[None] | None = None
        self.port = 0

    def _new_http(self) -> HttpServer:
        return HttpServer(
            self._handle, self._ws_open, self._ws_text, self._ws_close, ws_gate=self._ws_gate
        )

    def _ws_gate(self, request: HttpRequest) -> int | None:
        # During an injected outage websocket upgrades fail, as through a broken proxy.
        return 503 if time.monotonic() < self._ws_outage_until else None

    def _reset_state(self) -> None:
        # In-memory state a restart loses (README: history is in memory only).
        self._pending: list[QueueItem] = []
        self._running: QueueItem | None = None
        self._history: dict[str, dict[str, Any]] = {}
        self._cache: dict[str, tuple[tuple[Any, ...], dict[str, Any] | None]] = {}
        self._number = 0
        self._seq = 0
        self._interrupt = False
        self._last_node: str | None = None
        self._changed = asyncio.Event()

    # ---- lifecycle ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> None:
        await self._http.start("127.0.0.1", port)
        self.port = self._http.port
        self._worker = asyncio.create_task(self._work(), name=f"standin-{self.port}")

    async def close(self) -> None:
        await self._stop(abort=False)

    async def kill(self) -> None:
        """Stop abruptly: connections are cut, the port refuses, running work is lost."""
        await self._stop(abort=True)

    async def restart(self) -> None:
        """Come back on the same port with empty queue, history and cache (files stay)."""
        self._http = self._new_http()
        self._peers = {}
        self._reset_state()
        await self.start(self.port)

    async def _stop(self, *, abort: bool) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        await self._http.close(abort=abort)

    async def __aenter__(self) -> ComfyStandIn:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- fault injection ----------------------------------------------------------------

    def fail_http(self, route: str, *, status: int = 500, times: int | None = None) -> None:
        """Answer ``status`` on ``route`` (a path such as ``/view`` or ``/prompt``, without
        ``/api``); ``times=None`` until :meth:`clear_http_faults`."""
        self._http_faults[route] = [status, times]

    def clear_http_faults(self) -> None:
        self._http_faults.clear()

    def drop_websockets(self, *, outage_s: float = 0.0) -> None:
        """Cut every websocket now, without a close frame; refuse new ones for ``outage_s``."""
        self._ws_outage_until = time.monotonic() + outage_s
        for peer in list(self._peers.values()):
            peer.abort()

    def send_binary_frames(self, payload: bytes) -> None:
        """Send every websocket a binary frame carrying ``payload`` now."""
        for peer in list(self._peers.values()):
            peer.send_binary(payload)

    def cut_websockets_mid_frame(self) -> None:
        """Every websocket gets the head of a 1000-byte binary frame and 10 bytes of it, then
        its connection dies (a truncated frame)."""
        for peer in list(self._peers.values()):
            peer.writer.write(b"\x82\x7e\x03\xe8" + b"x" * 10)
            peer.abort()

    def drop_websockets_at(self, node: str, *, outage_s: float = 0.0) -> None:
        """Cut every websocket once, just before ``node`` starts; the job keeps running."""
        self._drop_at[node] = outage_s

    def hang_at(self, node: str, *, interruptible: bool = True) -> None:
        """The job stops at ``node`` until :meth:`release` (or an interrupt, if allowed)."""
        self._hang_at[node] = interruptible

    def hold_after_step(self, node: str, step: int) -> None:
        """Pause ``node`` right after it reports ``step`` until released or interrupted."""
        self._hold_at[node] = step

    def release(self, node: str) -> None:
        """End a :meth:`hang_at` or :meth:`hold_after_step`: the node runs on."""
        self._hang_at.pop(node, None)
        self._hold_at.pop(node, None)

    def fail_node(
        self,
        node: str,
        exception_type: str = "RuntimeError",
        message: str = "injected failure",
    ) -> None:
        """``node`` raises when it runs: an ``execution_error`` as in ws_trace_exec_error."""
        self._fail_at[node] = (exception_type, message)

    def repeat_steps(self, node: str) -> None:
        """``node`` reports its steps twice over (1..max, then 1..max again), as a second
        sampler pass or the next batch of a tiled upscale does: its raw fraction drops."""
        self._repeat_steps.add(node)

    def set_node_delay(self, node: str, seconds: float) -> None:
        self._node_delay[node] = seconds

    def set_step_delay(self, seconds: float) -> None:
        """Time per sampler step / upscale tile / caption."""
        self._step_delay = seconds

    def set_queue_delay(self, seconds: float) -> None:
        """Each job waits this long in ``queue_pending`` before it may start."""
        self._queue_delay = seconds

    def pause_queue(self) -> None:
        """Nothing starts until :meth:`resume_queue`; queued jobs stay pending."""
        self._paused = True

    def resume_queue(self) -> None:
        self._paused = False
        self._changed.set()

    def set_models(self, folder: str, names: Sequence[str]) -> None:
        self.catalogue.models[folder] = list(names)

    # ---- state for tests -----------------------------------------------------------------

    @property
    def running_prompt(self) -> str | None:
        return self._running.prompt_id if self._running else None

    @property
    def pending_prompts(self) -> list[str]:
        return [item.prompt_id for item in self._ordered_pending()]

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        return self._history.get(prompt_id)

    def add_input(self, name: str, data: bytes) -> None:
        (self.input_dir / name).write_bytes(data)

    async def wait_for(self, predicate: Callable[[], bool], within: float = 5.0) -> None:
        """Poll ``predicate`` until true; TimeoutError after ``within`` seconds."""
        async with asyncio.timeout(within):
            while not predicate():
                await asyncio.sleep(0.005)

    # ---- websocket ------------------------------------------------------------------------

    async def _ws_open(self, request: HttpRequest, peer: WsPeer) -> None:
        if self.api_key is not None and not self._authorized(request):
            peer.abort()
            return
        if not peer.sid:
            peer.sid = uuid.uuid4().hex
        self._peers[peer.sid] = peer
        self.received.ws_connects.append(peer.sid)
        # server.py websocket_handler: status with the sid first ...
        self._send_to(peer, "status", {"status": self._queue_info(), "sid": peer.sid})
        # ... and, to the running prompt's client reconnecting, the node it is on.
        running = self._running
        if running and running.extra_data.get("client_id") == peer.sid and self._last_node:
            self._send_to(peer, "executing", {"node": self._last_node})

    async def _ws_text(self, peer: WsPeer, text: str) -> None:
        first, peer.received_first = not peer.received_first, True
        with contextlib.suppress(ValueError, AttributeError):
            message = json.loads(text)
            if first and message.get("type") == "feature_flags" and self.feature_flags:
                # ws_trace_upscale_model.json: the server answers with its own flags.
                peer.feature_flags = dict(message.get("data") or {})
                self._send_to(peer, "feature_flags", _FEATURES)

    def _ws_close(self, peer: WsPeer) -> None:
        # As ComfyUI (server.py websocket_handler's finally): the sid is popped whichever
        # socket holds it now, so closing a replaced socket unregisters its successor.
        self._peers.pop(peer.sid, None)

    def _send_to(self, peer: WsPeer, event: str, data: Any) -> None:
        if peer.writer.is_closing():
            return  # a dropped socket: the message is lost
        self.received.sent.append((peer.sid, event, copy.deepcopy(data)))
        peer.send_json(event, data)

    def _send(self, event: str, data: Any, client_id: str | None, *, guarded: bool) -> None:
        if client_id is None:
            if guarded:
                return
            targets = list(self._peers.values())  # progress to everyone (README)
        else:
            peer = self._peers.get(client_id)
            targets = [peer] if peer else []  # absent clients miss it: nothing is buffered
        for peer in targets:
            self._send_to(peer, event, data)

    def _broadcast_status(self) -> None:
        for peer in list(self._peers.values()):
            self._send_to(peer, "status", {"status": self._queue_info()})

    def _queue_info(self) -> dict[str, Any]:
        remaining = len(self._pending) + (1 if self._running else 0)
        return {"exec_info": {"queue_remaining": remaining}}

    # ---- HTTP -------------------------------------------------------------------------------

    def _authorized(self, request: HttpRequest) -> bool:
        return request.headers.get("authorization") == f"Bearer {self.api_key}"

    async def _handle(self, request: HttpRequest) -> HttpResponse:
        self.received.requests.append((request.method, request.path, dict(request.headers)))
        if self.api_key is not None and not self._authorized(request):
            return HttpResponse.text("401: Unauthorized", 401)  # an auth proxy in front
        if self._origin_mismatch(request):
            return HttpResponse(403)
        path = request.path
        if path.startswith("/api/jobs"):
            if not self.jobs_api:
                return HttpResponse.text("404: Not Found", 404)  # older servers (README)
        elif path.startswith("/api/"):
            path = path[4:]  # every route is also under /api
        for route in (path, path.rsplit("/", 1)[0]):
            fault = self._http_faults.get(route)
            if fault is None:
                continue
            status, times = fault
            if times is not None:
                if times <= 1:
                    del self._http_faults[route]
                else:
                    fault[1] = times - 1
            return HttpResponse.text(_TROUBLE, int(status or 500))
        try:
            return await self._route(request.method, path, request)
        except Exception:
            traceback.print_exc()
            return HttpResponse.text(_TROUBLE, 500)

    def _origin_mismatch(self, request: HttpRequest) -> bool:
        # server.py origin_only_middleware (README: Host and Origin differ on loopback -> 403).
        host, origin = request.headers.get("host"), request.headers.get("origin")
        if not host or not origin:
            return False
        host_name = urlsplit("//" + host).hostname or ""
        origin_name = urlsplit(origin).hostname or ""
        loopback = host_name in ("127.0.0.1", "localhost", "::1")
        return loopback and bool(origin_name) and host_name != origin_name

    async def _route(self, method: str, path: str, request: HttpRequest) -> HttpResponse:
        q = request.query
        if method == "POST" and path == "/prompt":
            return self._post_prompt(request)
        if method == "GET" and path == "/prompt":
            return HttpResponse.json(self._queue_info())
        if method == "POST" and path in ("/upload/image", "/upload/mask"):
            return self._upload(request, mask=path == "/upload/mask")
        if method == "GET" and path == "/view":
            return self._view(q)
        if method == "GET" and path == "/history":
            items = list(self._history.items())
            if "max_items" in q:
                items = items[-int(q["max_items"]) :]
            return HttpResponse.json(dict(items))
        if method == "GET" and path.startswith("/history/"):
            pid = path.removeprefix("/history/")
            entry = self._history.get(pid)
            return HttpResponse.json({pid: entry} if entry is not None else {})
        if method == "POST" and path == "/history":
            body = request.json()
            if body.get("clear"):
                self._history.clear()
            for pid in body.get("delete", []):
                self._history.pop(pid, None)
            return HttpResponse()
        if method == "GET" and path == "/queue":
            running = [self._running.as_list()] if self._running else []
            pending = [item.as_list() for item in self._ordered_pending()]
            return HttpResponse.json({"queue_running": running, "queue_pending": pending})
        if method == "POST" and path == "/queue":
            return self._post_queue(request)
        if method == "POST" and path == "/interrupt":
            return self._post_interrupt(request)
        if method == "POST" and path == "/free":
            return HttpResponse()
        if method == "GET" and path == "/object_info":
            return HttpResponse.json(self.catalogue.all_info())
        if method == "GET" and path.startswith("/object_info/"):
            name = path.removeprefix("/object_info/")
            return HttpResponse.json(
                {name: self.catalogue.info(name)} if self.catalogue.has(name) else {}
            )
        if method == "GET" and path == "/system_stats":
            return HttpResponse.json(self._system_stats())
        if method == "GET" and path == "/features":
            return HttpResponse.json(_FEATURES)
        if method == "GET" and path == "/models":
            return HttpResponse.json(sorted({*self.catalogue.models, *MODEL_INPUTS.values()}))
        if method == "GET" and path.startswith("/models/"):
            folder = path.removeprefix("/models/")
            if folder not in self.catalogue.models and folder not in MODEL_INPUTS.values():
                return HttpResponse(404)
            return HttpResponse.json(sorted(self.catalogue.models.get(folder, [])))
        if method == "GET" and path == "/api/jobs":
            return self._jobs(q)
        if method == "GET" and path.startswith("/api/jobs/"):
            job = self._job(path.removeprefix("/api/jobs/"), include_outputs=True)
            if job is None:
                return HttpResponse.json({"error": "Job not found"}, 404)
            return HttpResponse.json(job)
        return HttpResponse.text("404: Not Found", 404)

    def _system_stats(self) -> dict[str, Any]:
        # http_samples.json system_stats, trimmed to its shape.
        return {
            "system": {
                "os": "linux",
                "ram_total": 25276059648,
                "ram_free": 24028008448,
                "comfyui_version": self.version,
                "python_version": "3.11.7",
                "pytorch_version": "2.13.0+cpu",
                "embedded_python": False,
                "argv": ["main.py", "--cpu"],
            },
            "devices": [
                {
                    "name": "cpu",
                    "type": "cpu",
                    "index": None,
                    "vram_total": 25276059648,
                    "vram_free": 24028008448,
                    "torch_vram_total": 25276059648,
                    "torch_vram_free": 24028008448,
                }
            ],
        }

    def _post_prompt(self, request: HttpRequest) -> HttpResponse:
        self.received.raw_prompts.append(request.body)
        try:
            data = json.loads(request.body)
        except ValueError:
            self.received.prompts.append(None)
            return HttpResponse.text(_TROUBLE, 500)  # errors.json invalid_json_body
        self.received.prompts.append(copy.deepcopy(data))
        if "number" in data:
            number: int | float = float(data["number"])
        else:
            number = -self._number if data.get("front") else self._number
            self._number += 1
        if "prompt" not in data:
            return HttpResponse.json(
                {
                    "error": {
                        "type": "no_prompt",
                        "message": "No prompt provided",
                        "details": "No prompt provided",
                        "extra_info": {},
                    },
                    "node_errors": {},
                },
                400,
            )
        prompt = data["prompt"]
        try:
            result = self.catalogue.validate(prompt)
        except PromptRejected as rejected:
            return HttpResponse.json(rejected.body, 400)
        extra = dict(data.get("extra_data") or {})
        if "client_id" in data:
            extra["client_id"] = data["client_id"]
        extra["create_time"] = _now_ms()
        prompt_id = str(data.get("prompt_id") or uuid.uuid4())  # the client's id is honoured
        self._seq += 1
        self._pending.append(
            QueueItem(
                number,
                prompt_id,
                prompt,
                extra,
                result.outputs,
                self._seq,
                time.monotonic() + self._queue_delay,
            )
        )
        self._broadcast_status()
        self._changed.set()
        return HttpResponse.json(
            {"prompt_id": prompt_id, "number": number, "node_errors": result.node_errors}
        )

    def _ordered_pending(self) -> list[QueueItem]:
        return sorted(self._pending, key=lambda item: (item.number, item.seq))

    def _post_queue(self, request: HttpRequest) -> HttpResponse:
        body = request.json()
        self.received.queue_posts.append(copy.deepcopy(body))
        if body.get("clear"):
            self._pending.clear()
            self._broadcast_status()
        for pid in body.get("delete", []):
            for item in list(self._pending):
                if item.prompt_id == pid:
                    if len(self._pending) == 1:
                        # delete_queue_item wipes a one-item queue, and both notify:
                        # two status messages (ws_trace_interrupt.json at 1816 ms).
                        self._pending.clear()
                        self._broadcast_status()
                    else:
                        self._pending.remove(item)
                    self._broadcast_status()
                    break
        self._changed.set()
        return HttpResponse()

    def _post_interrupt(self, request: HttpRequest) -> HttpResponse:
        try:
            body = request.json() if request.body else {}
        except ValueError:
            body = {}
        self.received.interrupts.append(copy.deepcopy(body) if isinstance(body, dict) else {})
        target = body.get("prompt_id") if isinstance(body, dict) else None
        # README: with a prompt_id only that prompt, and only if it is the running one.
        if not target or (self._running is not None and self._running.prompt_id == target):
            self._interrupt = True
        return HttpResponse()

    def _input_files(self) -> list[str]:
        names = []
        for path in self.input_dir.rglob("*"):
            if path.is_file():
                names.append(path.relative_to(self.input_dir).as_posix())
        return sorted(names)

    def _file_hash(self, name: str) -> str:
        path = self.input_dir / name
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""

    def _dir_for(self, kind: str | None) -> Path | None:
        return {"input": self.input_dir, "output": self.output_dir, "temp": self.temp_dir}.get(
            kind or "input"
        )

    def _upload(self, request: HttpRequest, *, mask: bool) -> HttpResponse:
        form = parse_multipart(request)
        if "image" not in form.files or not form.files["image"][0]:
            return HttpResponse(400)
        file_name, data = form.files["image"]
        kind = form.fields.get("type") or "input"
        base = self._dir_for(kind)
        if base is None:
            return HttpResponse(400)
        subfolder = form.fields.get("subfolder", "")
        folder = (base / os.path.normpath(subfolder)).resolve() if subfolder else base.resolve()
        target = (folder / file_name).resolve()
        if os.path.commonpath((str(base.resolve()), str(target))) != str(base.resolve()):
            return HttpResponse(400)
        folder.mkdir(parents=True, exist_ok=True)
        overwrite = form.fields.get("overwrite") in ("true", "1")
        stem, ext = os.path.splitext(file_name)
        duplicate = False
        counter = 1
        if not overwrite:
            # README: a clash with different bytes is saved as "name (1).png"; same bytes reuse.
            while target.exists():
                if target.read_bytes() == data:
                    duplicate = True
                    break
                file_name = f"{stem} ({counter}){ext}"
                target = folder / file_name
                counter += 1
        if not duplicate:
            if mask:
                ref = json.loads(form.fields.get("original_ref", "{}"))
                original_dir = self._dir_for(ref.get("type", "output"))
                if original_dir is None or ".." in ref.get("filename", "/"):
                    return HttpResponse(400)
                source = original_dir / ref.get("subfolder", "") / ref["filename"]
                with Image.open(source) as original, Image.open(io.BytesIO(data)) as alpha:
                    merged = original.convert("RGBA")
                    merged.putalpha(alpha.convert("RGBA").getchannel("A"))
                    merged.save(target, compress_level=4)
            else:
                target.write_bytes(data)
        self.received.uploads.append(
            Upload(request.path, file_name, subfolder, kind, data, overwrite)
        )
        return HttpResponse.json({"name": file_name, "subfolder": subfolder, "type": kind})

    def _view(self, q: Mapping[str, str]) -> HttpResponse:
        # server.py view_image; http_samples.json view_missing (404, no type), view_traversal.
        if "filename" not in q:
            return HttpResponse(404)
        file_name = q["filename"]
        if not file_name or file_name[0] == "/" or ".." in file_name:
            return HttpResponse(400)
        base = self._dir_for(q.get("type", "output"))
        if base is None:
            return HttpResponse(400)
        folder = base.resolve()
        if "subfolder" in q:
            folder = (base / q["subfolder"]).resolve()
            if os.path.commonpath((str(base.resolve()), str(folder))) != str(base.resolve()):
                return HttpResponse(403)
        path = folder / os.path.basename(file_name)
        if not path.is_file():
            return HttpResponse(404)
        data = path.read_bytes()
        if "preview" in q:
            fmt = q["preview"].split(";")[0]
            fmt = fmt if fmt in ("webp", "jpeg") else "webp"
            buffer = io.BytesIO()
            with Image.open(io.BytesIO(data)) as img:
                (img.convert("RGB") if fmt == "jpeg" else img).save(buffer, format=fmt)
            return HttpResponse(200, buffer.getvalue(), f"image/{fmt}")
        content_type = {".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp"}.get(
            path.suffix.lower(), "application/octet-stream"
        )
        return HttpResponse(
            200, data, content_type, {"Content-Disposition": f'filename="{path.name}"'}
        )

    # ---- /api/jobs (comfy_execution/jobs.py) ----------------------------------------------

    def _job(self, prompt_id: str, *, include_outputs: bool) -> dict[str, Any] | None:
        if prompt_id in self._history:
            return self._history_job(prompt_id, self._history[prompt_id], include_outputs)
        if self._running and self._running.prompt_id == prompt_id:
            return self._queue_job(self._running, "in_progress")
        for item in self._pending:
            if item.prompt_id == prompt_id:
                return self._queue_job(item, "pending")
        return None

    @staticmethod
    def _queue_job(item: QueueItem, status: str) -> dict[str, Any]:
        return {
            "id": item.prompt_id,
            "status": status,
            "priority": item.number,
            "create_time": item.extra_data.get("create_time"),
            "outputs_count": 0,
        }

    @staticmethod
    def _history_job(prompt_id: str, entry: dict[str, Any], include: bool) -> dict[str, Any]:
        status = entry["status"]
        job: dict[str, Any] = {
            "id": prompt_id,
            # An interrupted job is "failed" too (http_samples.json api_jobs_limit_3).
            "status": "completed" if status["status_str"] == "success" else "failed",
            "priority": entry["prompt"][0],
            "create_time": entry["prompt"][3].get("create_time"),
        }
        for event, data in status["messages"]:
            if event == "execution_start":
                job["execution_start_time"] = data["timestamp"]
            elif event in ("execution_success", "execution_error", "execution_interrupted"):
                job["execution_end_time"] = data["timestamp"]
                if event == "execution_error":
                    job["execution_error"] = data
        count, preview = 0, None
        for node, output in entry["outputs"].items():
            for media, items in output.items():
                if not isinstance(items, list):
                    continue
                for item in items:
                    if isinstance(item, dict):
                        count += 1
                        if preview is None and media == "images":
                            preview = {**item, "nodeId": node, "mediaType": media}
        job["outputs_count"] = count
        if preview is not None:
            job["preview_output"] = preview
        if include:
            job["outputs"] = entry["outputs"]
            job["execution_status"] = status
            job["workflow"] = {"prompt": entry["prompt"][2], "extra_data": entry["prompt"][3]}
        return job

    def _jobs(self, q: Mapping[str, str]) -> HttpResponse:
        wanted = q.get("status", "").split(",") if q.get("status") else None
        jobs = []
        if self._running:
            jobs.append(self._queue_job(self._running, "in_progress"))
        jobs += [self._queue_job(item, "pending") for item in self._pending]
        jobs += [self._history_job(pid, e, False) for pid, e in self._history.items()]
        if wanted is not None:
            jobs = [j for j in jobs if j["status"] in wanted]
        jobs.sort(
            key=lambda j: j.get("create_time") or 0, reverse=q.get("sort_order", "desc") == "desc"
        )
        total = len(jobs)
        offset = int(q.get("offset", 0))
        limit = int(q["limit"]) if "limit" in q else None
        jobs = jobs[offset:]
        if limit is not None:
            jobs = jobs[:limit]
        return HttpResponse.json(
            {
                "jobs": jobs,
                "pagination": {
                    "offset": offset,
                    "limit": limit,
                    "total": total,
                    "has_more": offset + len(jobs) < total,
                },
            }
        )

    # ---- the queue worker and execution (main.py prompt_worker, execution.py) ------------

    async def _work(self) -> None:
        while True:
            self._changed.clear()
            ordered = self._ordered_pending()
            if not ordered or self._paused:
                await self._changed.wait()
                continue
            head = ordered[0]
            wait = head.ready_at - time.monotonic()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._changed.wait()
                continue
            self._pending.remove(head)
            self._running = head
            self._broadcast_status()  # queue.get() notifies (the second status in every trace)
            try:
                await self._execute(head)
            finally:
                self._running = None
                self._last_node = None

    async def _execute(self, item: QueueItem) -> None:
        self._interrupt = False  # PromptExecutor.execute resets the flag
        pid, prompt = item.prompt_id, item.prompt
        client = item.extra_data.get("client_id")
        previews = item.extra_data.get("preview_method") not in (None, "", "none")
        messages: list[list[Any]] = []

        def add_message(event: str, data: dict[str, Any]) -> None:
            data = {**data, "timestamp": _now_ms()}
            messages.append([event, data])
            self._send(event, data, client, guarded=_GUARDED)

        states: dict[str, dict[str, Any]] = {}

        def progress_state(node: str, state: str, value: float, maximum: float) -> None:
            states[node] = {
                "value": value,
                "max": maximum,
                "state": state,
                "node_id": node,
                "prompt_id": pid,
                "display_node_id": node,
                "parent_node_id": None,
                "real_node_id": node,
            }
            self._send("progress_state", {"prompt_id": pid, "nodes": states}, client, guarded=False)

        add_message("execution_start", {"prompt_id": pid})
        signature = Signatures(prompt, self._file_hash)
        cached = [n for n in prompt if signature(n) in self._cache]
        add_message("execution_cached", {"nodes": cached, "prompt_id": pid})
        order = ExecutionList(
            prompt,
            lambda n: signature(n) in self._cache,
            lambda n: self.catalogue.is_output(prompt[n]["class_type"]),
        )
        for output in item.outputs:
            order.add_node(output)
        values: dict[str, tuple[Any, ...]] = {}
        ui_outputs: dict[str, dict[str, Any]] = {}
        executed: list[str] = []
        success = False
        node = ""
        try:
            while not order.is_empty():
                node = order.next()
                class_type = prompt[node]["class_type"]
                key = signature(node)
                if key in self._cache:
                    # A cached output node: its old output again (ws_trace_scale_cached.json).
                    outputs, ui = self._cache[key]
                    values[node] = outputs
                    self._send(
                        "executed",
                        {"node": node, "display_node": node, "output": ui, "prompt_id": pid},
                        client,
                        guarded=_GUARDED,
                    )
                    if ui is not None:
                        ui_outputs[node] = ui
                    progress_state(node, "finished", 1, 1)
                    order.complete(node)
                    continue
                if self._interrupt:
                    raise Interrupted
                if node in self._drop_at:
                    self.drop_websockets(outage_s=self._drop_at.pop(node))
                progress_state(node, "running", 0.0, 1.0)
                self._last_node = node
                self._send(
                    "executing",
                    {"node": node, "display_node": node, "prompt_id": pid},
                    client,
                    guarded=_GUARDED,
                )
                result = await self._run_node(
                    item, node, class_type, values, signature, progress_state, previews
                )
                self._cache[key] = (result.outputs, result.ui)
                values[node] = result.outputs
                if result.ui:
                    ui_outputs[node] = result.ui
                    self._send(
                        "executed",
                        {"node": node, "display_node": node, "output": result.ui, "prompt_id": pid},
                        client,
                        guarded=_GUARDED,
                    )
                # finish_progress: value = max, types kept (2, 2 after steps; 1.0, 1.0 without).
                top = states[node]["max"]
                progress_state(node, "finished", top, top)
                executed.append(node)
                order.complete(node)
            add_message("execution_success", {"prompt_id": pid})
            success = True
        except Interrupted:
            add_message(
                "execution_interrupted",
                {
                    "prompt_id": pid,
                    "node_id": node,
                    "node_type": prompt[node]["class_type"],
                    "executed": list(executed),
                },
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            type_name = exc.type_name if isinstance(exc, _Injected) else _type_name(exc)
            current = {
                name: [value if not is_link(value) else f"<output of node {value[0]}>"]
                for name, value in prompt[node]["inputs"].items()
            }
            add_message(
                "execution_error",
                {
                    "prompt_id": pid,
                    "node_id": node,
                    "node_type": prompt[node]["class_type"],
                    "executed": list(executed),
                    "exception_message": f"{exc}\n",
                    "exception_type": type_name,
                    "traceback": traceback.format_tb(exc.__traceback__),
                    "current_inputs": current,
                    "current_outputs": [*executed, node, *order.pending],
                },
            )
        # Keep what the next prompt may reuse (the classic cache keeps the last prompt's nodes).
        keep = {signature(n) for n in prompt}
        self._cache = {k: v for k, v in self._cache.items() if k in keep}
        # task_done writes history, then notifies; "executing null" follows (main.py).
        self._history[pid] = {
            "prompt": item.as_list(),
            "outputs": ui_outputs,
            "status": {
                "status_str": "success" if success else "error",
                "completed": success,
                "messages": messages,
            },
            "meta": {
                n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n}
                for n in ui_outputs
            },
        }
        self._running = None
        self._last_node = None
        self._broadcast_status()
        self._send("executing", {"node": None, "prompt_id": pid}, client, guarded=False)

    async def _run_node(
        self,
        item: QueueItem,
        node: str,
        class_type: str,
        values: dict[str, tuple[Any, ...]],
        signature: Signatures,
        progress_state: Callable[[str, str, float, float], None],
        previews: bool,
    ) -> Any:
        pid = item.prompt_id
        client = item.extra_data.get("client_id")
        if delay := self._node_delay.get(node):
            await asyncio.sleep(delay)
        while node in self._hang_at:  # until released (or interrupted, if allowed)
            if self._hang_at[node] and self._interrupt:
                raise Interrupted
            await asyncio.sleep(0.01)
        if node in self._fail_at:
            raise _Injected(*self._fail_at[node])
        inputs: dict[str, Any] = {}
        for name, value in item.prompt[node]["inputs"].items():
            if is_link(value):
                source = value[0]
                outputs = values.get(source)
                if outputs is None:
                    outputs = self._cache[signature(source)][0]
                inputs[name] = outputs[value[1]]
            else:
                inputs[name] = value

        first_pass = node in self._repeat_steps

        async def progress(value: int, maximum: int, preview: Image.Image | None) -> None:
            nonlocal first_pass
            if first_pass:  # a whole earlier pass over the same steps
                first_pass = False
                for earlier in range(1, maximum + 1):
                    await report(earlier, maximum, None)
            await report(value, maximum, preview)

        async def report(
            value: int, maximum: int, preview: Image.Image | None, *, work: bool = True
        ) -> None:
            if self._step_delay and work:
                await asyncio.sleep(self._step_delay)
            if self._interrupt:  # the progress hook checks (README: ~1 s on CPU)
                raise Interrupted
            frame = self._preview_frame(preview) if preview is not None and previews else None
            step(value, maximum, frame)
            while self._hold_at.get(node) == value and not self._interrupt:
                await asyncio.sleep(0.005)

        def step(value: int, maximum: int, frame: _Frame | None) -> None:
            # ComfyUI's progress hook, in its order (comfy_execution/progress.py, main.py;
            # recordings saveimagewebsocket_metadata and _legacy): progress_state, the frame
            # for clients that asked for preview metadata (type 4), progress, then the frame
            # for the others (types 1/2).
            progress_state(node, "running", value, maximum)
            if frame is not None:
                self._send_binary(client, frame, pid, node, metadata=True)
            self._send(
                "progress",
                {"value": value, "max": maximum, "prompt_id": pid, "node": node},
                client,
                guarded=False,
            )
            if frame is not None:
                self._send_binary(client, frame, pid, node, metadata=False)

        async def send_image(image: Image.Image, value: int, maximum: int) -> None:
            # Sending a frame is no sampler step: no step delay (it costs ComfyUI a PNG encode).
            if self._interrupt:
                raise Interrupted
            step(value, maximum, _Frame(image, "PNG", "image/png"))
            while self._hold_at.get(node) == value and not self._interrupt:
                await asyncio.sleep(0.005)

        handler = NODES.get(class_type)
        if handler is None:
            raise NotEmulated(f"the stand-in does not emulate {class_type}")
        ctx = NodeContext(
            node,
            class_type,
            self.input_dir,
            self.output_dir,
            self.temp_dir,
            progress,
            send_image,
        )
        return await handler(ctx, inputs)

    @staticmethod
    def _preview_frame(image: Image.Image) -> _Frame:
        small = image.copy()
        small.thumbnail((64, 64))
        return _Frame(small, "JPEG", "image/jpeg")

    def _send_binary(
        self,
        client: str | None,
        frame: _Frame,
        pid: str,
        node: str,
        *,
        metadata: bool | None = None,
    ) -> None:
        """To the client (or everyone); ``metadata`` True/False: only to the peers that did /
        did not ask for preview metadata."""
        targets = (
            list(self._peers.values())
            if client is None
            else [p for p in [self._peers.get(client)] if p]
        )
        if metadata is not None:
            targets = [
                p
                for p in targets
                if bool(p.feature_flags.get("supports_preview_metadata")) is metadata
            ]
        for peer in targets:
            if peer is None:
                continue
            if peer.feature_flags.get("supports_preview_metadata"):
                # Type 4: [u32 4][u32 len][JSON metadata][image] (saveimagewebsocket_metadata).
                meta = json.dumps(
                    {
                        "node_id": node,
                        "prompt_id": pid,
                        "display_node_id": node,
                        "parent_node_id": None,
                        "real_node_id": node,
                        "image_type": frame.mime,
                    }
                ).encode()
                payload = (
                    (4).to_bytes(4, "big") + len(meta).to_bytes(4, "big") + meta + frame.encoded()
                )
            else:
                payload = frame.legacy()
            if peer.writer.is_closing():
                continue
            self.received.sent.append((peer.sid, "<binary>", payload[:8]))
            peer.send_binary(payload)


def _image_frame(image: Image.Image, fmt: str) -> bytes:
    # Type 1: [u32 1][u32 1=JPEG 2=PNG][bytes] (ws_trace_saveimagewebsocket_legacy.json).
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=fmt)
    kind = 1 if fmt == "JPEG" else 2
    return (1).to_bytes(4, "big") + kind.to_bytes(4, "big") + buffer.getvalue()


def _type_name(exc: BaseException) -> str:
    # execution.full_type_name: builtins by bare name, others module-qualified.
    cls = type(exc)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )
