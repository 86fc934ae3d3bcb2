"""A minimal direct ComfyUI client: the baseline that the service's orchestration is measured
against. It does what a hand-written script does, and nothing more:

1. open ``/ws?clientId=<new id>`` (ComfyUI sends a prompt's messages only to its client);
2. ``POST /upload/image`` the input;
3. ``POST /prompt`` the graph with that ``client_id`` and a ``prompt_id`` of our own;
4. read the websocket until ``executing`` with ``node: null`` for our prompt (the end marker);
5. ``GET /history/{prompt_id}`` for the outputs, and ``GET /view`` each image's bytes.

No retries, no progress tracking, no persistence. (Step 5's ``/view`` is there because the
service downloads and stores every output too; without it the comparison would charge the
service for a download the baseline never makes.)
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
from websockets.asyncio.client import connect

from bench import ROOT

UPSCALE_GRAPH = ROOT / "workflows" / "image_upscale.json"


@dataclass(slots=True)
class DirectResult:
    prompt_id: str
    outputs: list[bytes]
    done_at: float
    """``perf_counter`` when the outputs were in hand."""
    end_marker_at: float
    """``perf_counter`` when ``executing`` null arrived."""


class DirectComfy:
    """One agent, shared by concurrent callers (one HTTP connection pool)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.ws_url = "ws" + self.url.removeprefix("http") + "/ws"
        self.http = httpx.AsyncClient(
            base_url=self.url,
            timeout=60,
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=256),
        )
        self.graph = json.loads(UPSCALE_GRAPH.read_text())

    async def aclose(self) -> None:
        await self.http.aclose()

    def upscale_graph(self, image_name: str, width: int, height: int, label: str) -> Any:
        graph = copy.deepcopy(self.graph)
        graph["1"]["inputs"]["image"] = image_name
        graph["4"]["inputs"]["width"] = width * 2
        graph["4"]["inputs"]["height"] = height * 2
        graph["5"]["inputs"]["filename_prefix"] = f"bench/ImageUpscale/{label}"
        return graph

    async def upscale(self, png: bytes, width: int, height: int) -> DirectResult:
        client_id = uuid.uuid4().hex
        prompt_id = str(uuid.uuid4())
        label = uuid.uuid4().hex
        async with connect(
            f"{self.ws_url}?clientId={client_id}", max_size=None, max_queue=None
        ) as ws:
            up = await self.http.post(
                "/upload/image",
                files={"image": (f"{label}.png", png, "image/png")},
                data={"type": "input"},
            )
            up.raise_for_status()
            name = up.json()["name"]
            body = {
                "prompt": self.upscale_graph(name, width, height, label),
                "client_id": client_id,
                "prompt_id": prompt_id,
            }
            queued = await self.http.post("/prompt", json=body)
            queued.raise_for_status()
            async for raw in ws:
                if isinstance(raw, bytes):
                    continue
                message = json.loads(raw)
                data = message.get("data") or {}
                if data.get("prompt_id") != prompt_id:
                    continue
                if message.get("type") == "execution_error":
                    raise RuntimeError(f"prompt failed: {data.get('exception_message')}")
                if message.get("type") == "executing" and data.get("node") is None:
                    break
            end_marker_at = time.perf_counter()
        history = (await self.http.get(f"/history/{prompt_id}")).json()[prompt_id]
        outputs = []
        for output in history["outputs"].values():
            for image in output.get("images", []):
                view = await self.http.get(
                    "/view",
                    params={
                        "filename": image["filename"],
                        "subfolder": image["subfolder"],
                        "type": image["type"],
                    },
                )
                view.raise_for_status()
                outputs.append(view.content)
        return DirectResult(prompt_id, outputs, time.perf_counter(), end_marker_at)
