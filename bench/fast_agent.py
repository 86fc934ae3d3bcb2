"""A lighter fake ComfyUI agent for throughput: the stand-ins top out near 55 jobs/s.

    python -m bench.fast_agent --count 4

Speaks the routes and frames a job uses, in ComfyUI's shapes (the ``ws_trace_*`` recordings),
and nothing else: ``/system_stats``, ``/object_info`` (the stand-in's catalogue),
``/upload/image``, ``POST /prompt``, ``/ws`` (``status`` with ``sid``, ``feature_flags``
answered), ``/history/{id}``, ``/view``, ``GET``/``POST /queue``, ``/interrupt``. A prompt
"runs" at once, one at a time per agent as ComfyUI runs them: ``execution_start``,
``executing`` per output node, the output (``executed`` with the image's reference for
``SaveImage`` / ``PreviewImage``; a binary frame, type 4 with metadata or type 1, then
``progress`` for ``SaveImageWebsocket``), ``execution_success``, ``executing`` null. The
image is the input scaled to the ``ImageScale`` size, encoded once per size (PNG) and kept in
memory: no pixels are computed per job, no files are written.

Like :mod:`bench.standin_proc` it prints ``{"urls": [...]}``, then answers ``dump`` (success
times by prompt id, with the job label, and requests by route), ``reset`` and ``quit`` on
stdin, so :class:`bench.standin_proc.StandIns` drives it (``module="bench.fast_agent"``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from typing import Any

from aiohttp import WSMsgType, web
from PIL import Image

from tests.support.comfy_standin.catalogue import Catalogue
from tests.support.prompt_marks import job_label

_FEATURES = {"supports_preview_metadata": True, "max_upload_size": 104857600}
_MODELS = {"upscale_models": ["RealESRGAN_x2.pth"], "checkpoints": []}


class FastAgent:
    def __init__(self) -> None:
        catalogue = Catalogue(_MODELS, lambda: [])
        self.object_info = json.dumps(catalogue.all_info()).encode()
        self.peers: dict[str, tuple[web.WebSocketResponse, bool]] = {}
        self.inputs: dict[str, bytes] = {}
        self.files: dict[tuple[str, str], bytes] = {}
        self.history: dict[str, Any] = {}
        self.pending: list[tuple[str, dict[str, Any], str]] = []
        self.wake = asyncio.Event()
        self.pngs: dict[tuple[int, int], bytes] = {}
        self.success_at: dict[str, tuple[str, float]] = {}
        self.requests: Counter[str] = Counter()
        self.number = 0
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._worker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/ws", self.ws)
        app.router.add_get("/system_stats", self.system_stats)
        app.router.add_get("/object_info", self.get_object_info)
        app.router.add_post("/upload/image", self.upload)
        app.router.add_post("/prompt", self.prompt)
        app.router.add_get("/history/{id}", self.get_history)
        app.router.add_get("/view", self.view)
        app.router.add_get("/queue", self.get_queue)
        app.router.add_post("/queue", self.post_queue)
        app.router.add_post("/interrupt", self.interrupt)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        self._worker = asyncio.create_task(self._work())

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        if self._runner is not None:
            await self._runner.cleanup()

    def reset(self) -> None:
        self.inputs.clear()
        self.files.clear()
        self.history.clear()
        self.success_at.clear()

    # ---- HTTP ----------------------------------------------------------------------------

    def _count(self, request: web.Request) -> None:
        path = request.path
        for prefix in ("/history/",):
            if path.startswith(prefix):
                path = prefix + "*"
        self.requests[f"{request.method} {path}"] += 1

    async def system_stats(self, request: web.Request) -> web.Response:
        self._count(request)
        return web.json_response({"system": {"comfyui_version": "fast"}, "devices": []})

    async def get_object_info(self, request: web.Request) -> web.Response:
        self._count(request)
        return web.Response(body=self.object_info, content_type="application/json")

    async def upload(self, request: web.Request) -> web.Response:
        self._count(request)
        name, data = _form_image(await request.read(), request.content_type, request.headers)
        self.inputs[name] = data
        return web.json_response({"name": name, "subfolder": "", "type": "input"})

    async def prompt(self, request: web.Request) -> web.Response:
        self._count(request)
        body = await request.json()
        prompt_id = str(body.get("prompt_id") or uuid.uuid4())
        self.number += 1
        self.pending.append((prompt_id, body["prompt"], str(body.get("client_id") or "")))
        self.wake.set()
        await self._broadcast_status()
        return web.json_response({"prompt_id": prompt_id, "number": self.number, "node_errors": {}})

    async def get_history(self, request: web.Request) -> web.Response:
        self._count(request)
        pid = request.match_info["id"]
        entry = self.history.get(pid)
        return web.json_response({pid: entry} if entry is not None else {})

    async def view(self, request: web.Request) -> web.Response:
        self._count(request)
        key = (request.query.get("type", "output"), request.query.get("filename", ""))
        data = self.files.get(key)
        if data is None:
            raise web.HTTPNotFound()
        return web.Response(body=data, content_type="image/png")

    async def get_queue(self, request: web.Request) -> web.Response:
        self._count(request)
        pending = [[i, pid, {}, {}, []] for i, (pid, _, _) in enumerate(self.pending)]
        return web.json_response({"queue_running": [], "queue_pending": pending})

    async def post_queue(self, request: web.Request) -> web.Response:
        self._count(request)
        body = await request.json()
        drop = set(body.get("delete") or [])
        self.pending = [p for p in self.pending if p[0] not in drop]
        return web.json_response({})

    async def interrupt(self, request: web.Request) -> web.Response:
        self._count(request)
        return web.json_response({})

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        self._count(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        socket = web.WebSocketResponse(max_msg_size=0)
        await socket.prepare(request)
        self.peers[sid] = (socket, False)
        await socket.send_str(_frame("status", {"status": _queue(0), "sid": sid}))
        async for message in socket:
            if message.type is not WSMsgType.TEXT:
                continue
            data = json.loads(message.data)
            if data.get("type") == "feature_flags":
                flags = data.get("data") or {}
                self.peers[sid] = (socket, bool(flags.get("supports_preview_metadata")))
                await socket.send_str(_frame("feature_flags", _FEATURES))
        if self.peers.get(sid, (None,))[0] is socket:
            del self.peers[sid]
        return socket

    # ---- running -------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            if not self.pending:
                self.wake.clear()
                await self.wake.wait()
                continue
            pid, graph, client = self.pending.pop(0)
            await self._run(pid, graph, client)

    async def _run(self, pid: str, graph: dict[str, Any], client: str) -> None:
        peer = self.peers.get(client)
        send = peer[0].send_str if peer else None
        meta = bool(peer and peer[1])

        async def emit(kind: str, data: dict[str, Any]) -> None:
            if send is not None:
                await send(_frame(kind, {**data, "prompt_id": pid}))

        await emit("execution_start", {"timestamp": _ms()})
        await emit("execution_cached", {"nodes": [], "timestamp": _ms()})
        png = self._output(graph)
        outputs: dict[str, Any] = {}
        for node, entry in graph.items():
            kind = entry.get("class_type")
            if kind not in ("SaveImage", "PreviewImage", "SaveImageWebsocket"):
                continue
            await emit("executing", {"node": node, "display_node": node})
            if kind == "SaveImageWebsocket":
                if peer is not None:
                    if meta:
                        await peer[0].send_bytes(_meta_frame(pid, node, png))
                    else:
                        await peer[0].send_bytes(_legacy_frame(png))
                await emit("progress", {"value": 0, "max": 1, "node": node})
                continue
            folder = "output" if kind == "SaveImage" else "temp"
            name = f"{pid}_{node}.png"
            self.files[(folder, name)] = png
            ui = {"images": [{"filename": name, "subfolder": "", "type": folder}]}
            outputs[node] = ui
            await emit("executed", {"node": node, "display_node": node, "output": ui})
        self.history[pid] = {
            "prompt": [self.number, pid, graph, {"client_id": client}, list(outputs)],
            "outputs": outputs,
            "status": {"status_str": "success", "completed": True, "messages": []},
            "meta": {},
        }
        await emit("execution_success", {"timestamp": _ms()})
        self.success_at[pid] = (job_label(graph), time.perf_counter())
        await self._broadcast_status()
        await emit("executing", {"node": None})

    def _output(self, graph: dict[str, Any]) -> bytes:
        size = (64, 64)
        for entry in graph.values():
            if entry.get("class_type") == "ImageScale":
                inputs = entry.get("inputs", {})
                size = (int(inputs.get("width", 64)), int(inputs.get("height", 64)))
        png = self.pngs.get(size)
        if png is None:
            buffer = io.BytesIO()
            Image.new("RGB", size, (90, 120, 200)).save(buffer, format="PNG")
            png = self.pngs[size] = buffer.getvalue()
        return png

    async def _broadcast_status(self) -> None:
        frame = _frame("status", {"status": _queue(len(self.pending))})
        for socket, _ in list(self.peers.values()):
            if not socket.closed:
                with contextlib.suppress(ConnectionError):
                    await socket.send_str(frame)


_FILE_NAME = re.compile(rb'filename="([^"]*)"')


def _form_image(body: bytes, content_type: str, headers: Mapping[str, str]) -> tuple[str, bytes]:
    """The ``image`` part of a ``multipart/form-data`` upload: its file name and bytes.

    Split by hand: aiohttp's ``request.post()`` (header parsing through ``email``, a temporary
    file per file field) was half of this agent's CPU per job, which the bench charges to the
    2 cores the service is measured on.
    """
    if content_type != "multipart/form-data":
        raise web.HTTPBadRequest(text="expected multipart/form-data")
    boundary = headers["Content-Type"].partition("boundary=")[2].strip().strip('"')
    for part in body.split(b"--" + boundary.encode())[1:]:
        if part.startswith(b"--"):
            break
        head, _, data = part.partition(b"\r\n\r\n")
        if b'; name="image"' in head:
            found = _FILE_NAME.search(head)
            return (found.group(1).decode() if found else "image.png"), data[:-2]  # CRLF
    raise web.HTTPBadRequest(text="no image field")


def _frame(kind: str, data: Any) -> str:
    return json.dumps({"type": kind, "data": data})


def _queue(remaining: int) -> dict[str, Any]:
    return {"exec_info": {"queue_remaining": remaining}}


def _ms() -> int:
    return int(time.time() * 1000)


def _meta_frame(pid: str, node: str, png: bytes) -> bytes:
    meta = json.dumps(
        {
            "node_id": node,
            "prompt_id": pid,
            "display_node_id": node,
            "parent_node_id": None,
            "real_node_id": node,
            "image_type": "image/png",
        }
    ).encode()
    return (4).to_bytes(4, "big") + len(meta).to_bytes(4, "big") + meta + png


def _legacy_frame(png: bytes) -> bytes:
    return (1).to_bytes(4, "big") + (2).to_bytes(4, "big") + png


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--root", default="", help="unused: the fast agent keeps no files")
    args = parser.parse_args()
    agents = [FastAgent() for _ in range(args.count)]
    for agent in agents:
        await agent.start()
    print(json.dumps({"urls": [a.url for a in agents]}), flush=True)
    try:
        while True:
            command = (await asyncio.to_thread(sys.stdin.readline)).strip()
            if command in ("", "quit"):
                break
            if command == "dump":
                success: dict[str, Any] = {}
                requests: Counter[str] = Counter()
                for agent in agents:
                    success.update({k: list(v) for k, v in agent.success_at.items()})
                    agent.success_at.clear()
                    requests.update(agent.requests)
                    agent.requests.clear()
                print(json.dumps({"success": success, "requests": requests}), flush=True)
            elif command == "reset":
                for agent in agents:
                    agent.reset()
                print(json.dumps({"ok": True}), flush=True)
            else:
                print(json.dumps({"error": f"unknown command {command!r}"}), flush=True)
    finally:
        for agent in agents:
            await agent.close()


if __name__ == "__main__":
    asyncio.run(main())
