"""Where the real agent's time goes for the service's form of a job against the direct client's.

    python -m bench.real_gap_probe [--url http://127.0.0.1:8199] [--cycles 60]

Paired cycles (order alternating) against one real ComfyUI, both arms on aiohttp: the direct
client's form (a new ``/ws`` per job, a unique upload name without ``overwrite``, the graph
ending in ``SaveImage``, wait for ``executing`` null) and the service's form (one shared
``/ws`` that asked for preview metadata, the slot name uploaded with ``overwrite``, the graph
ending in ``SaveImageWebsocket``, done at ``execution_success`` with the frame in hand). Per
step, the median over cycles of each arm and of service - direct: so what the agent itself
costs for the service's requests is told apart from the service's own work.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import io
import json
import statistics
import time
import uuid
from typing import Any

import aiohttp

from aiserver.providers.comfy.client import _upload_form
from bench import ROOT
from bench.common import photo_like

GRAPH = json.loads((ROOT / "workflows" / "image_upscale.json").read_text())
STEPS = ("ws_open", "upload", "prompt", "to_start", "run", "to_end", "total")


def graph(name: str, over_socket: bool) -> Any:
    g = copy.deepcopy(GRAPH)
    g["1"]["inputs"]["image"] = name
    g["4"]["inputs"]["width"] = g["4"]["inputs"]["height"] = 128
    if over_socket:
        g["5"] = {"class_type": "SaveImageWebsocket", "inputs": {"images": ["4", 0]}}
    return g


async def read_until(
    ws: Any, pid: str, end: str, stamps: dict[str, float], seen: list[str]
) -> None:
    frame_in = False
    async for frame in ws:
        now = time.perf_counter()
        if frame.type is aiohttp.WSMsgType.BINARY:
            seen.append("binary")
            frame_in = True
            continue
        m = json.loads(frame.data)
        data = m.get("data") or {}
        seen.append(m["type"])
        if data.get("prompt_id") != pid:
            continue
        if m["type"] == "execution_start":
            stamps["start"] = now
        if m["type"] == "execution_success":
            stamps["success"] = now
            if end == "execution_success" and frame_in:
                return
        if m["type"] == "executing" and data.get("node") is None and end == "executing":
            return
        if m["type"] == "execution_error":
            raise RuntimeError(str(data))


async def direct(http: aiohttp.ClientSession, png: bytes) -> tuple[dict[str, float], list[str]]:
    s: dict[str, float] = {"t0": time.perf_counter()}
    seen: list[str] = []
    cid, pid = uuid.uuid4().hex, str(uuid.uuid4())
    async with http.ws_connect(f"/ws?clientId={cid}", max_msg_size=0) as ws:
        s["ws"] = time.perf_counter()
        form = aiohttp.FormData()
        form.add_field("image", png, filename=f"{uuid.uuid4().hex}.png", content_type="image/png")
        form.add_field("type", "input")
        async with http.post("/upload/image", data=form) as up:
            name = (await up.json())["name"]
        s["up"] = time.perf_counter()
        body = {"prompt": graph(name, False), "client_id": cid, "prompt_id": pid}
        async with http.post("/prompt", json=body) as q:
            q.raise_for_status()
            await q.read()
        s["pr"] = time.perf_counter()
        await read_until(ws, pid, "executing", s, seen)
        s["end"] = time.perf_counter()
    return s, seen


class Shared:
    def __init__(self, http: aiohttp.ClientSession) -> None:
        self.http, self.cid = http, uuid.uuid4().hex
        self.ws: Any = None

    async def open(self) -> None:
        self.ws = await self.http.ws_connect(f"/ws?clientId={self.cid}", max_msg_size=0)
        await self.ws.send_json(
            {"type": "feature_flags", "data": {"supports_preview_metadata": True}}
        )

    async def job(self, png: bytes) -> tuple[dict[str, float], list[str]]:
        s: dict[str, float] = {"t0": time.perf_counter()}
        s["ws"] = s["t0"]
        seen: list[str] = []
        pid = str(uuid.uuid4())
        body_up, ctype = _upload_form(
            png, "aiserver-probe-0-image.png", "image/png", uuid.uuid4().hex, overwrite=True
        )
        async with self.http.post(
            "/upload/image", data=body_up, headers={"Content-Type": ctype}
        ) as up:
            name = (await up.json())["name"]
        s["up"] = time.perf_counter()
        body = {"prompt": graph(name, True), "client_id": self.cid, "prompt_id": pid}
        async with self.http.post("/prompt", json=body) as q:
            q.raise_for_status()
            await q.read()
        s["pr"] = time.perf_counter()
        await read_until(self.ws, pid, "execution_success", s, seen)
        s["end"] = time.perf_counter()
        return s, seen


def steps(s: dict[str, float]) -> dict[str, float]:
    ms = 1000.0
    return {
        "ws_open": (s["ws"] - s["t0"]) * ms,
        "upload": (s["up"] - s["ws"]) * ms,
        "prompt": (s["pr"] - s["up"]) * ms,
        "to_start": (s["start"] - s["pr"]) * ms,
        "run": (s["success"] - s["start"]) * ms,
        "to_end": (s["end"] - s["success"]) * ms,
        "total": (s["end"] - s["t0"]) * ms,
    }


async def run(url: str, cycles: int) -> None:
    buf = io.BytesIO()
    photo_like(64, 64).save(buf, "PNG")
    png = buf.getvalue()
    async with aiohttp.ClientSession(url) as http:
        shared = Shared(http)
        await shared.open()
        rows: dict[str, list[dict[str, float]]] = {"direct": [], "service": []}
        kinds: dict[str, list[str]] = {}
        for i in range(cycles + 2):
            order = ("direct", "service") if i % 2 else ("service", "direct")
            for arm in order:
                s, seen = await (direct(http, png) if arm == "direct" else shared.job(png))
                if i >= 2:  # warm-up cycles left out
                    rows[arm].append(steps(s))
                    kinds[arm] = seen
        print(f"{'step':10} {'direct':>9} {'service':>9} {'svc-dir (paired)':>18}")
        for k in STEPS:
            d = statistics.median(r[k] for r in rows["direct"])
            v = statistics.median(r[k] for r in rows["service"])
            p = statistics.median(
                b[k] - a[k] for a, b in zip(rows["direct"], rows["service"], strict=True)
            )
            print(f"{k:10} {d:9.2f} {v:9.2f} {p:+18.2f}")
        for arm, seen in kinds.items():
            print(arm, len(seen), "messages in the last job:", seen)
        await shared.ws.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", default="http://127.0.0.1:8199")
    p.add_argument("--cycles", type=int, default=60)
    a = p.parse_args()
    asyncio.run(run(a.url, a.cycles))


if __name__ == "__main__":
    main()
