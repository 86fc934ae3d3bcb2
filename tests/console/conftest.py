"""A GPU farm in miniature for the console: the real service and shim, ComfyUI stand-ins, and
Debian's chromium driven by Playwright (never a browser the tool downloads)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright

from aiserver.config import load_settings
from aiserver.server import Service
from tests.support.comfy_standin import ComfyStandIn
from tests.support.images import encode, quadrant_image

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
KEYS = {
    "ops": "ops-key-0123456789abcdef",
    "alice": "alice-key-0123456789abcdef",
    "bob": "bob-key-0123456789abcdef",
}
KSAMPLER = "7"  # in workflows/image_to_image.json
UPSCALER = "3"  # in workflows/image_upscale.json
DOCS = Path(__file__).resolve().parents[2] / "docs"
# The browser reports a refused fetch as a console error; the console asks the API which
# key it holds (401/403 are answers there), so those, and only those, are expected.
_EXPECTED = (
    "the server responded with a status of 401",
    "the server responded with a status of 403",
)


@dataclass
class Farm:
    service: Service
    agents: dict[str, ComfyStandIn]
    url: str
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def workflows(self) -> Path:
        """The operator's workflows folder (polled: a file written here is served)."""
        folder = self.service.settings.workflows_dir
        assert folder is not None
        return folder

    def http(self, who: str | None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.keys[who]}"} if who else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30)

    async def queue(self, who: str | None, task: str, **fields: str) -> str:
        """A job made by another client (the plain HTTP API); its id."""
        files = {"image": ("photo.png", encode(quadrant_image(64, 48), "png"), "image/png")}
        async with self.http(who) as http:
            resp = await http.post(f"/api/{task}", data=fields, files=files)
        assert resp.status_code == 200, resp.text
        return str(resp.json()["jobId"])


async def start_farm(tmp_path: Path, *, keyed: bool) -> tuple[Service, dict[str, ComfyStandIn]]:
    agents = {
        "gpu-1": ComfyStandIn(tmp_path / "gpu-1", step_delay_s=0.05),
        # Lacks the captioning node: the Agents page says why it cannot serve ImageToText.
        "gpu-2": ComfyStandIn(
            tmp_path / "gpu-2", step_delay_s=0.05, missing_nodes=["Florence2Run"]
        ),
    }
    for agent in agents.values():
        await agent.start()
    listed = [
        {"name": n, "url": a.url, "priority": 1 if n == "gpu-1" else 0} for n, a in agents.items()
    ]
    keys = ",".join(f"{who}:{key}{':admin' if who == 'ops' else ''}" for who, key in KEYS.items())
    env = {
        "AISERVER_AGENTS": json.dumps(listed),
        "AISERVER_AGENT_PROBE_INTERVAL_S": "0.3",
        "AISERVER_API_KEYS": keys if keyed else "",
    }
    workflows = tmp_path / "workflows"  # the operator's folder, empty at first
    workflows.mkdir()
    settings = load_settings(
        env=env,
        overrides={
            "grpc_port": 0,
            "http_port": 0,
            "data_dir": tmp_path / "data",
            "workflows_dir": workflows,
            "workflows_poll_s": 0.1,
            "local_upscale": "fallback",  # listed on the Agents page; ComfyUI runs upscales
        },
    )
    service = Service(settings)
    await service.start()
    return service, agents


async def _farm(tmp_path: Path, *, keyed: bool) -> AsyncIterator[Farm]:
    service, agents = await start_farm(tmp_path, keyed=keyed)
    try:
        yield Farm(service, agents, f"http://127.0.0.1:{service.http_port}", KEYS if keyed else {})
    finally:
        await service.stop(grace_s=1)
        for agent in agents.values():
            await agent.close()


@pytest_asyncio.fixture(loop_scope="module")
async def farm(tmp_path: Path) -> AsyncIterator[Farm]:
    """Keys on: `ops` (admin), `alice`, `bob`; agents gpu-1 (preferred) and gpu-2."""
    async for f in _farm(tmp_path, keyed=True):
        yield f


@pytest_asyncio.fixture(loop_scope="module")
async def open_farm(tmp_path: Path) -> AsyncIterator[Farm]:
    """No keys: open mode."""
    async for f in _farm(tmp_path, keyed=False):
        yield f


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            yield b
        finally:
            await b.close()


@dataclass
class Console:
    page: Page
    url: str
    problems: list[str]

    async def open(self, hash_path: str = "#/jobs") -> None:
        await self.page.goto(f"{self.url}/{hash_path}")

    async def sign_in(self, key: str) -> None:
        await self.open("#/signin")
        await self.page.fill("#api-key", key)
        await self.page.click("form.signin button[type=submit]")
        await self.page.wait_for_url("**/#/jobs")


def _watch(page: Page, problems: list[str]) -> None:
    def on_console(msg: ConsoleMessage) -> None:
        if msg.type in ("error", "warning") and not any(e in msg.text for e in _EXPECTED):
            problems.append(f"console {msg.type}: {msg.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))


async def _console(browser: Browser, url: str, viewport: dict[str, int]) -> AsyncIterator[Console]:
    context = await browser.new_context(viewport=viewport, accept_downloads=True)  # type: ignore[arg-type]
    page = await context.new_page()
    page.set_default_timeout(15_000)
    problems: list[str] = []
    _watch(page, problems)
    try:
        yield Console(page, url, problems)
    finally:
        await context.close()
    assert not problems, problems


@pytest.fixture
def viewport() -> dict[str, int]:
    return {"width": 1280, "height": 800}


@pytest_asyncio.fixture(loop_scope="module")
async def console(browser: Browser, farm: Farm, viewport: dict[str, int]) -> AsyncIterator[Console]:
    """A fresh browser context (own session storage) on ``farm``; fails the test on any
    console error (a CSP violation is one) or uncaught page error."""
    async for c in _console(browser, farm.url, viewport):
        yield c


@pytest_asyncio.fixture(loop_scope="module")
async def open_console(
    browser: Browser, open_farm: Farm, viewport: dict[str, int]
) -> AsyncIterator[Console]:
    async for c in _console(browser, open_farm.url, viewport):
        yield c
