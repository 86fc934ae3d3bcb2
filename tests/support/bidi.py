"""Debian's firefox-esr driven over W3C WebDriver BiDi: Playwright drives only its own patched
Firefox (a browser download) and Debian has no geckodriver, but Firefox speaks BiDi natively
on the websocket it opens for ``--remote-debugging-port``."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection

FIREFOX = "/usr/bin/firefox-esr"
_LISTENING = re.compile(rb"WebDriver BiDi listening on (ws://\S+)")

# Keeps a fresh profile off the network: only loopback pages are loaded in the tests.
_PREFS: dict[str, bool | int | str] = {
    "app.update.auto": False,
    "app.update.disabledForTesting": True,
    "browser.aboutwelcome.enabled": False,
    "browser.newtabpage.enabled": False,
    "browser.ping-centre.telemetry": False,
    "browser.safebrowsing.blockedURIs.enabled": False,
    "browser.safebrowsing.downloads.enabled": False,
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "browser.safebrowsing.provider.google4.updateURL": "",
    "browser.safebrowsing.provider.mozilla.updateURL": "",
    "browser.search.update": False,
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.homepage": "about:blank",
    "browser.startup.homepage_override.mstone": "ignore",
    "browser.startup.page": 0,
    "browser.tabs.warnOnClose": False,
    "datareporting.healthreport.uploadEnabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "extensions.getAddons.cache.enabled": False,
    "extensions.update.enabled": False,
    "geo.provider.network.url": "",
    "media.gmp-manager.updateEnabled": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "network.dns.disablePrefetch": True,
    "network.http.speculative-parallel-limit": 0,
    "network.prefetch-next": False,
    "network.proxy.type": 0,  # direct: no system or environment proxy for loopback
    "services.settings.server": "data:,#remote-settings-off",
    "toolkit.telemetry.enabled": False,
    "toolkit.telemetry.server": "",
    "toolkit.telemetry.unified": False,
}


class ScriptError(Exception):
    """A script evaluated in the page threw."""


class BiDiError(Exception):
    """The browser refused a command."""


def _prefs_js(prefs: dict[str, bool | int | str]) -> str:
    return "".join(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in prefs.items())


def from_remote(value: dict[str, Any]) -> Any:
    """A BiDi RemoteValue as Python: primitives, arrays and plain objects; other values
    (nodes, functions, ...) stay as the protocol's dict."""
    kind = value["type"]
    if kind in ("undefined", "null"):
        return None
    if kind in ("string", "boolean"):
        return value["value"]
    if kind == "number":
        v = value["value"]
        return float(v) if isinstance(v, str) else v  # "NaN", "Infinity", "-0"
    if kind in ("array", "set"):
        return [from_remote(v) for v in value.get("value", [])]
    if kind in ("object", "map"):
        return {
            (k if isinstance(k, str) else from_remote(k)): from_remote(v)
            for k, v in value.get("value", [])
        }
    return value


def to_local(value: Any) -> dict[str, Any]:
    """A Python value as a BiDi LocalValue argument."""
    if value is None:
        return {"type": "null"}
    if isinstance(value, bool):
        return {"type": "boolean", "value": value}
    if isinstance(value, int | float):
        return {"type": "number", "value": value}
    if isinstance(value, str):
        return {"type": "string", "value": value}
    if isinstance(value, list | tuple | bytes):
        return {"type": "array", "value": [to_local(v) for v in value]}
    if isinstance(value, dict):
        return {"type": "object", "value": [[str(k), to_local(v)] for k, v in value.items()]}
    raise TypeError(f"no BiDi LocalValue for {type(value).__name__}")


@dataclass
class LogEntry:
    kind: str  # "console", or "javascript": an uncaught error or a CSP refusal
    level: str  # "debug", "info", "warn", "error"
    text: str


@dataclass
class Session:
    """One BiDi session on one websocket; commands by id, events into ``logs``."""

    ws: ClientConnection
    logs: list[LogEntry] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _waiting: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    _reader: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                message = json.loads(raw)
                if "id" in message and message["id"] in self._waiting:
                    self._waiting.pop(message["id"]).set_result(message)
                elif message.get("method") == "log.entryAdded":
                    p = message["params"]
                    self.logs.append(LogEntry(p.get("type", ""), p.get("level", ""), p["text"]))
        finally:
            for waiter in self._waiting.values():
                if not waiter.done():
                    waiter.set_exception(BiDiError("the browser closed the connection"))

    async def send(self, method: str, params: dict[str, Any], timeout: float = 30) -> Any:
        command_id = next(self._ids)
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[command_id] = waiter
        await self.ws.send(json.dumps({"id": command_id, "method": method, "params": params}))
        reply = await asyncio.wait_for(waiter, timeout)
        if reply.get("type") == "error":
            raise BiDiError(f"{method}: {reply.get('error')}: {reply.get('message')}")
        return reply["result"]

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.send("session.end", {}, timeout=5)
        await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, BiDiError):
                await self._reader


@dataclass
class Tab:
    """A top-level browsing context (a tab): navigate, run scripts, type, click, capture."""

    session: Session
    context: str
    user_context: str

    async def navigate(self, url: str) -> None:
        await self.session.send(
            "browsingContext.navigate", {"context": self.context, "url": url, "wait": "complete"}
        )

    async def call(self, function: str, *args: Any) -> Any:
        """``function`` (JS source of a function) called with ``args``; awaits a promise."""
        result = await self.session.send(
            "script.callFunction",
            {
                "functionDeclaration": function,
                "arguments": [to_local(a) for a in args],
                "target": {"context": self.context},
                "awaitPromise": True,
                "userActivation": True,
            },
        )
        if result["type"] == "exception":
            raise ScriptError(result["exceptionDetails"]["text"])
        return from_remote(result["result"])

    async def evaluate(self, expression: str) -> Any:
        return await self.call(f"() => ({expression})")

    async def wait_for(self, expression: str, timeout: float = 15) -> Any:
        """Polls ``expression`` until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        error: ScriptError | None = None
        while True:
            try:
                value = await self.evaluate(expression)
                if value:
                    return value
            except ScriptError as e:  # e.g. mid-navigation; reported if it lasts
                error = e
            if time.monotonic() > deadline:
                raise TimeoutError(f"still falsy after {timeout} s: {expression}") from error
            await asyncio.sleep(0.1)

    async def _center(self, selector: str) -> tuple[int, int]:
        box = await self.wait_for(
            f"""(() => {{
              const e = document.querySelector({json.dumps(selector)});
              if (!e) return null;
              e.scrollIntoView({{block: "center"}});
              const r = e.getBoundingClientRect();
              return r.width && r.height ? [r.x + r.width / 2, r.y + r.height / 2] : null;
            }})()"""
        )
        return round(box[0]), round(box[1])

    async def click(self, selector: str) -> None:
        """A real mouse click (pointer actions) in the middle of the element."""
        x, y = await self._center(selector)
        pointer = [
            {"type": "pointerMove", "x": x, "y": y},
            {"type": "pointerDown", "button": 0},
            {"type": "pointerUp", "button": 0},
        ]
        await self._act({"type": "pointer", "id": "mouse", "actions": pointer})

    async def type(self, selector: str, text: str) -> None:
        """Clicks into the field, then types ``text`` key by key."""
        await self.click(selector)
        keys = [{"type": kind, "value": ch} for ch in text for kind in ("keyDown", "keyUp")]
        await self._act({"type": "key", "id": "keyboard", "actions": keys})

    async def _act(self, source: dict[str, Any]) -> None:
        await self.session.send(
            "input.performActions", {"context": self.context, "actions": [source]}
        )
        await self.session.send("input.releaseActions", {"context": self.context})

    async def screenshot(self) -> bytes:
        """The viewport as PNG bytes."""
        result = await self.session.send(
            "browsingContext.captureScreenshot", {"context": self.context}
        )
        return base64.b64decode(result["data"])

    async def close(self) -> None:
        await self.session.send("browsingContext.close", {"context": self.context})
        await self.session.send("browser.removeUserContext", {"userContext": self.user_context})


@dataclass
class Firefox:
    process: asyncio.subprocess.Process
    session: Session

    async def new_tab(self) -> Tab:
        """A tab in its own user context (own cookies and storage)."""
        user_context = await self.session.send("browser.createUserContext", {})
        created = await self.session.send(
            "browsingContext.create",
            {"type": "tab", "userContext": user_context["userContext"]},
        )
        return Tab(self.session, created["context"], user_context["userContext"])

    def problems(self, expected: Callable[[LogEntry], bool] = lambda _: False) -> list[str]:
        """Console errors and warnings and uncaught errors so far, less the expected ones."""
        return [
            f"{e.kind} {e.level}: {e.text}"
            for e in self.session.logs
            if e.level in ("error", "warn") and not expected(e)
        ]


async def _listening_url(stderr: asyncio.StreamReader, timeout: float) -> str:
    """The websocket URL from the browser's stderr line (the port is chosen by the OS)."""
    seen = b""
    async with asyncio.timeout(timeout):
        while line := await stderr.readline():
            seen += line
            if match := _LISTENING.search(line):
                return match.group(1).decode()
    raise RuntimeError(f"firefox did not open WebDriver BiDi: {seen.decode(errors='replace')}")


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


@asynccontextmanager
async def launch_firefox(profile: Path, timeout: float = 30) -> AsyncIterator[Firefox]:
    """A headless firefox-esr on a fresh ``profile`` with a BiDi session; always killed."""
    profile.mkdir(parents=True, exist_ok=True)
    (profile / "user.js").write_text(_prefs_js(_PREFS))
    env = {**os.environ, "MOZ_CRASHREPORTER_DISABLE": "1", "MOZ_HEADLESS": "1"}
    args = ["--headless", "--no-remote", "--remote-debugging-port=0", "--profile", str(profile)]
    process = await asyncio.create_subprocess_exec(
        FIREFOX,
        *args,
        "about:blank",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert process.stderr is not None
    drained: asyncio.Task[None] | None = None
    try:
        url = await _listening_url(process.stderr, timeout)
        # Keep reading its log so the pipe never fills up and blocks the browser.
        drained = asyncio.create_task(_drain(process.stderr))
        ws = await websockets.connect(f"{url}/session", max_size=64 * 2**20)
        session = Session(ws)
        session.start()
        await session.send("session.new", {"capabilities": {}})
        await session.send("session.subscribe", {"events": ["log.entryAdded"]})
        try:
            yield Firefox(process, session)
        finally:
            await session.close()
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        if drained is not None:
            await drained
