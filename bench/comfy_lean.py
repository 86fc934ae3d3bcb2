"""The floor of the service's exchange with an agent: a lean direct ComfyUI client doing, per
job, exactly what the service does with the agent, and nothing else.

Per job the service sends two HTTP requests (``POST /upload/image``, ``POST /prompt``) and
reads the job's frames on one websocket per agent, shared by every job on it, taking the output
image from a binary frame (``SaveImageWebsocket``, frames naming their prompt: the agent is
asked for ``supports_preview_metadata``), so no ``/history`` or ``/view`` per job
(``agent_requests_per_job`` in the orchestration results). :mod:`bench.comfy_direct` is the
hand-written script's way (a websocket per job, four requests); this is the same exchange as the
service's, done as cheaply as this machine's Python measured: the HTTP requests through
``aiserver.providers.comfy.agent_http`` (42-44 µs of CPU a request against aiohttp's client's
130-141: bench/README.md, the provider's section), the upload's multipart body joined by
hand, the prompt and frames in orjson, the socket read by aiohttp's C frame reader and
handed to the job's future in the reader's step.
No persistence, retries, progress or placement: what a process pays for the protocol alone.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import time
import uuid
from typing import Any

import aiohttp
import orjson

from aiserver.providers.comfy.agent_http import AgentHttp
from bench.client_loop import JobFailed
from bench.comfy_direct import UPSCALE_GRAPH, DirectResult

JOB_TIMEOUT_S = 120.0  # as the bench's gRPC callers' deadline: a lost end fails the job
_META = 4  # binary frame: [u32 4][u32 len][JSON naming prompt_id][image]


class _Job:
    __slots__ = ("done", "outputs")

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.outputs: list[bytes] = []


class LeanComfy:
    """One agent, one shared websocket. ``await start()`` in the loop that uses it."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.client_id = uuid.uuid4().hex
        self.http = AgentHttp(self.url, headers={}, connect_s=10.0, request_s=60.0)
        self.graph = json.loads(UPSCALE_GRAPH.read_text())
        self.boundary = uuid.uuid4().hex
        self.count = itertools.count()
        self.jobs: dict[str, _Job] = {}
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        ws_url = "ws" + self.url.removeprefix("http") + f"/ws?clientId={self.client_id}"
        self._ws = await self._session.ws_connect(ws_url, max_msg_size=0)
        flags = {"type": "feature_flags", "data": {"supports_preview_metadata": True}}
        await self._ws.send_str(orjson.dumps(flags).decode())
        async for frame in self._ws:  # the agent's answer: its binary frames now name prompts
            if frame.type is aiohttp.WSMsgType.TEXT and b"feature_flags" in frame.data.encode():
                break
        self._reader = asyncio.create_task(self._read(self._ws))

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        await self.http.close()

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        jobs = self.jobs
        async for frame in ws:
            if frame.type is aiohttp.WSMsgType.BINARY:
                data = frame.data
                if int.from_bytes(data[:4], "big") != _META:
                    continue
                size = int.from_bytes(data[4:8], "big")
                meta = orjson.loads(data[8 : 8 + size])
                job = jobs.get(str(meta.get("prompt_id")))
                if job is not None:
                    job.outputs.append(data[8 + size :])
                continue
            if frame.type is not aiohttp.WSMsgType.TEXT:
                break
            message = orjson.loads(frame.data)
            body = message.get("data") or {}
            job = jobs.get(str(body.get("prompt_id")))
            # ComfyUI still sends ``executing`` null after ``execution_error``: a job's first
            # end decides it (a second set_result would raise and end this reader).
            if job is None or job.done.done():
                continue
            kind = message.get("type")
            if kind == "executing" and body.get("node") is None:
                job.done.set_result(None)
            elif kind == "execution_error":
                job.done.set_exception(JobFailed(f"agent: {body.get('exception_message')}"))
        for job in jobs.values():  # the socket ended: every job in flight fails
            if not job.done.done():
                job.done.set_exception(JobFailed("the agent's websocket ended"))

    def upscale_graph(self, image_name: str, width: int, height: int, prompt_id: str) -> Any:
        graph = copy.copy(self.graph)  # only nodes 1, 4 and 5 change: new dicts for those
        graph["1"] = {"class_type": "LoadImage", "inputs": {"image": image_name}}
        scale = dict(graph["4"]["inputs"], width=width * 2, height=height * 2)
        graph["4"] = {"class_type": "ImageScale", "inputs": scale}
        graph["5"] = {
            "class_type": "SaveImageWebsocket",
            "inputs": {"images": ["4", 0], "aiserver_run": prompt_id},
        }
        return graph

    async def upscale(self, png: bytes, width: int, height: int) -> DirectResult:
        prompt_id = str(uuid.uuid4())
        boundary = f"{self.boundary}{next(self.count):x}"
        form = b"".join(
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image";'
                f' filename="{prompt_id}.png"\r\nContent-Type: image/png\r\n\r\n'.encode(),
                png,
                f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="type"\r\n\r\n'
                f"input\r\n--{boundary}--\r\n".encode(),
            )
        )
        up = await self.http.request(
            "POST",
            "/upload/image",
            body=form,
            content_type=f"multipart/form-data; boundary={boundary}",
        )
        if up.status != 200:
            raise JobFailed(f"upload: HTTP {up.status}")
        name = orjson.loads(up.body)["name"]
        job = _Job(asyncio.get_running_loop().create_future())
        self.jobs[prompt_id] = job
        try:
            body = {
                "prompt": self.upscale_graph(name, width, height, prompt_id),
                "client_id": self.client_id,
                "prompt_id": prompt_id,
            }
            queued = await self.http.request(
                "POST", "/prompt", body=orjson.dumps(body), content_type="application/json"
            )
            if queued.status != 200:
                raise JobFailed(f"prompt: HTTP {queued.status}")
            try:
                async with asyncio.timeout(JOB_TIMEOUT_S):
                    await job.done
            except TimeoutError:
                raise JobFailed(f"no end of the prompt within {JOB_TIMEOUT_S:.0f} s") from None
        finally:
            del self.jobs[prompt_id]
        done_at = time.perf_counter()
        return DirectResult(prompt_id, job.outputs, done_at, done_at)
