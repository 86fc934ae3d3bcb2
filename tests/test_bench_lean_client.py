"""The bench's lean ComfyUI client (the floor of the service's exchange with an agent) keeps
reading its shared websocket after a failed prompt: ComfyUI sends ``executing`` null after
``execution_error``, and a second end of the same job must not end the reader."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web

from bench.client_loop import JobFailed
from bench.comfy_lean import LeanComfy

_IMAGE = b"\x89PNG-output"


class _Agent:
    """Only what the lean client uses: ``/ws``, ``/upload/image``, ``POST /prompt``. The first
    prompt fails (``execution_error`` then ``executing`` null, as ComfyUI sends them); later
    ones send their output in a binary frame naming the prompt, then ``executing`` null."""

    def __init__(self) -> None:
        self.ws: web.WebSocketResponse | None = None
        self.prompts = 0

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.ws = ws
        async for frame in ws:
            if "feature_flags" in frame.data:
                await ws.send_str(json.dumps({"type": "feature_flags", "data": {}}))
        return ws

    async def upload(self, request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"name": f"in{self.prompts}.png"})

    async def prompt(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = json.loads(await request.read())
        prompt_id = body["prompt_id"]
        ws = self.ws
        assert ws is not None
        self.prompts += 1
        if self.prompts == 1:
            error = {"prompt_id": prompt_id, "exception_message": "boom"}
            await ws.send_str(json.dumps({"type": "execution_error", "data": error}))
        else:
            meta = json.dumps({"prompt_id": prompt_id}).encode()
            head = (4).to_bytes(4, "big") + len(meta).to_bytes(4, "big")
            await ws.send_bytes(head + meta + _IMAGE)
        done = {"node": None, "prompt_id": prompt_id}
        await ws.send_str(json.dumps({"type": "executing", "data": done}))
        return web.json_response({"prompt_id": prompt_id, "number": self.prompts})


async def test_a_failed_prompt_fails_its_job_and_the_next_job_still_ends() -> None:
    agent = _Agent()
    app = web.Application()
    app.router.add_get("/ws", agent.websocket)
    app.router.add_post("/upload/image", agent.upload)
    app.router.add_post("/prompt", agent.prompt)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    client = LeanComfy(f"http://127.0.0.1:{port}")
    try:
        await client.start()
        async with asyncio.timeout(10):
            with pytest.raises(JobFailed, match="boom"):
                await client.upscale(b"png", 32, 32)
            result = await client.upscale(b"png", 32, 32)  # the reader still runs
        assert result.outputs == [_IMAGE]
    finally:
        await client.aclose()
        await runner.cleanup()
