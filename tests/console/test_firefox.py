"""The console in Debian's firefox-esr (driven over WebDriver BiDi) against the real service,
shim and ComfyUI stand-ins: the Chromium tests' farm, a second browser engine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.console.conftest import KEYS, KSAMPLER, Farm
from tests.support.bidi import Firefox, LogEntry, Tab, launch_firefox
from tests.support.images import encode, quadrant_image

pytestmark = pytest.mark.asyncio(loop_scope="module")

# The console asks the API which key it holds (401/403 are answers there).
_EXPECTED = ("status of 401", "status of 403")


def _expected(entry: LogEntry) -> bool:
    return any(e in entry.text for e in _EXPECTED)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def firefox(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Firefox]:
    async with launch_firefox(tmp_path_factory.mktemp("firefox-profile")) as browser:
        yield browser


@pytest_asyncio.fixture(loop_scope="module")
async def tab(firefox: Firefox, farm: Farm) -> AsyncIterator[Tab]:
    """A fresh tab (own storage) on ``farm``; fails the test on any console error or warning
    (a CSP violation is one) or uncaught error."""
    firefox.session.logs.clear()
    t = await firefox.new_tab()
    try:
        yield t
    finally:
        await t.close()
    problems = firefox.problems(_expected)
    assert not problems, problems


def q(selector: str) -> str:
    """A JS expression for the first element matching ``selector``."""
    return f"document.querySelector({json.dumps(selector)})"


async def sign_in(tab: Tab, farm: Farm, key: str) -> None:
    await tab.navigate(f"{farm.url}/#/signin")
    await tab.type("#api-key", key)
    await tab.click("form.signin button[type=submit]")
    await tab.wait_for("location.hash === '#/jobs'")


async def test_signs_in_follows_a_job_live_to_done_shows_its_output_and_the_agents(
    tab: Tab, farm: Farm
) -> None:
    await sign_in(tab, farm, KEYS["ops"])
    await tab.wait_for(f"{q('#signin-link')}?.textContent === 'Admin key'")
    await tab.wait_for(f"{q('p.empty')}?.textContent === 'No jobs.'")
    # Made by another client after the page loaded: the row arrives and finishes live, over
    # the shim's server-sent events read as a fetch stream.
    job = await farm.queue("alice", "ImageUpscale", Tag="firefox")
    row = q(f"tr[data-job='{job}']")
    await tab.wait_for(f"{row}?.dataset.state === 'succeeded'")
    assert "alice" in await tab.evaluate(f"{row}.textContent")

    await tab.click(f"tr[data-job='{job}'] a.state")
    await tab.wait_for(f"location.hash === '#/jobs/{job}'")
    await tab.wait_for(f"{q('#job-state')}?.textContent === 'succeeded'")
    img = q("section.outputs figure img")
    # One condition: the view may render the outputs again when the watch's replay ends
    # (a new <img> whose blob is still being fetched).
    await tab.wait_for(f"{img}?.src.startsWith('blob:') && {img}.complete && {img}.naturalWidth")
    assert await tab.evaluate(f"[{img}.naturalWidth, {img}.naturalHeight]") == [128, 96]
    assert "128x96" in await tab.evaluate(f"{q('section.outputs figure')}.textContent")
    shot = await tab.screenshot()
    assert shot.startswith(b"\x89PNG\r\n\x1a\n")

    await tab.click("a[href='#/agents']")
    gpu1 = q("[data-agent='gpu-1'] .state")
    await tab.wait_for(f"{gpu1}?.textContent === 'online'")
    gpu2 = "[data-agent='gpu-2'] .why"
    await tab.wait_for(f"{q(gpu2)}?.textContent.includes('Florence2Run')")


async def test_an_upscale_dropped_on_the_run_page_runs_to_its_output(tab: Tab, farm: Farm) -> None:
    await sign_in(tab, farm, KEYS["alice"])
    await tab.navigate(f"{farm.url}/#/run/ImageUpscale")
    await tab.wait_for(q(".drop"))
    data = encode(quadrant_image(64, 48), "png")
    await tab.call(
        """bytes => {
            const dt = new DataTransfer();
            dt.items.add(new File([new Uint8Array(bytes)], "photo.png", {type: "image/png"}));
            const drop = new DragEvent("drop", {dataTransfer: dt});
            document.querySelector(".drop").dispatchEvent(drop);
        }""",
        list(data),
    )
    await tab.wait_for(f"{q('.drop-label')}?.textContent.includes('photo.png')")
    await tab.click("#run-submit")
    await tab.wait_for(f"{q('#run-state')}?.textContent === 'succeeded'")
    thumb = q("section.outputs img")
    await tab.wait_for(f"{thumb}?.complete && {thumb}.naturalWidth === 128")


async def test_the_browser_enforces_the_policy_and_the_test_sees_it(
    firefox: Firefox, tab: Tab, farm: Farm
) -> None:
    """An inline script is refused and reported: the check every other test relies on."""
    await tab.navigate(f"{farm.url}/#/signin")
    await tab.wait_for(q("#api-key"))
    await tab.evaluate(
        """(() => {
            const s = document.createElement("script");
            s.textContent = "window.injected = true";
            document.body.append(s);
        })()"""
    )
    assert await tab.evaluate("window.injected === undefined")
    for _ in range(20):  # the report is an event: it may trail the refusal
        if any("Content-Security-Policy" in p for p in firefox.problems(_expected)):
            break
        await asyncio.sleep(0.05)
    refused = [p for p in firefox.problems(_expected) if "Content-Security-Policy" in p]
    assert refused, firefox.session.logs
    firefox.session.logs.clear()


async def test_every_run_form_renders_and_a_failed_job_shows_its_reason(
    tab: Tab, farm: Farm
) -> None:
    for agent in farm.agents.values():
        agent.fail_node(KSAMPLER, "RuntimeError", "CUDA out of memory (stand-in)")
    job = await farm.queue("bob", "ImageToImage", PositivePrompt="a cat")
    await sign_in(tab, farm, KEYS["bob"])
    await tab.navigate(f"{farm.url}/#/run")
    tasks = await tab.wait_for("[...document.querySelectorAll('nav.tabs a')].map(a => a.hash)")
    assert "#/run/ImageUpscale" in tasks
    for task in tasks:
        await tab.click(f"nav.tabs a[href='{task}']")
        await tab.wait_for(f"{q('nav.tabs a[aria-current=page]')}?.hash === '{task}'")
        await tab.wait_for(f"{q('#run-form')} && {q('#run-submit')}")

    await tab.navigate(f"{farm.url}/#/jobs/{job}")
    failure = q("section.failure")
    await tab.wait_for(f"{failure}?.textContent.includes('CUDA out of memory (stand-in)')")
    assert "COMFYUI" in await tab.evaluate(f"{failure}.querySelector('.reason').textContent")
    await tab.click("#run-again")
    await tab.wait_for(f"{q('#f-PositivePrompt')}?.value === 'a cat'")
