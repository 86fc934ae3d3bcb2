"""Phone width, keyboard reach with visible focus, and the headers that make the CSP strict."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from playwright.async_api import expect

from tests.console.conftest import KEYS, Console, Farm

pytestmark = pytest.mark.asyncio(loop_scope="module")

# Each page, and what shows it has rendered.
PAGES = {
    "#/jobs": "table.jobs",
    "#/run/ImageWithMask": "#run-form",
    "#/agents": "[data-agent=gpu-1]",
    "#/signin": "#api-key",
}
_WIDER = """() => [...document.querySelectorAll('body *')]
    .filter(e => e.clientWidth && e.scrollWidth > e.clientWidth + 1
        && getComputedStyle(e).overflowX === 'visible')
    .map(e => `${e.tagName}.${e.className}`)"""


@pytest.fixture
def viewport() -> dict[str, int]:
    return {"width": 390, "height": 844}


async def test_every_page_fits_a_phone_width(console: Console, farm: Farm, tmp_path: Path) -> None:
    job = await farm.queue("alice", "ImageToImage", PositivePrompt="x" * 300, Tag="t" * 60)
    await console.sign_in(KEYS["ops"])
    page = console.page
    pages = {**PAGES, f"#/jobs/{job}": "ol.timeline li[data-kind=finished]"}
    for target, shown in pages.items():
        await console.open(target)
        await expect(page.locator(shown)).to_be_visible()
        assert await page.evaluate("document.documentElement.scrollWidth") <= 390, (
            target,
            await page.evaluate(_WIDER),
        )

    # The jobs list at phone width: each job a card of labelled lines, not a scrolled table.
    await console.open("#/jobs")
    row = page.locator(f"tr[data-job='{job}']")
    box = await row.bounding_box()
    assert box is not None and box["width"] <= 390
    task = row.locator("td[data-label=Task]")
    await expect(task).to_be_visible()
    label = await task.evaluate("td => getComputedStyle(td, '::before').content")
    assert label == '"Task: "'
    await page.screenshot(path=str(tmp_path / "phone-jobs.png"), full_page=True)


async def test_main_controls_are_reachable_by_keyboard_with_visible_focus(
    console: Console, farm: Farm
) -> None:
    page = console.page
    await console.open("#/signin")
    await expect(page.locator("#api-key")).to_be_focused()
    await page.keyboard.type(KEYS["ops"])
    await page.keyboard.press("Enter")
    await page.wait_for_url("**/#/jobs")
    await page.evaluate("document.activeElement.blur()")
    reached: list[str] = []
    for _ in range(16):
        await page.keyboard.press("Tab")
        focused = await page.evaluate(
            """() => {
                const e = document.activeElement;
                if (e === document.body) return ['(page)', true];
                const style = getComputedStyle(e);
                return [e.getAttribute('href') || e.id || e.textContent.trim(),
                        e.matches(':focus-visible') && style.outlineStyle !== 'none'
                        && parseFloat(style.outlineWidth) >= 2];
            }"""
        )
        assert focused[1], f"{focused[0]} has no visible focus"
        reached.append(focused[0])
    for control in ("#main", "#/jobs", "#/run", "#/agents", "#/signin", "state", "task", "tag"):
        assert control in reached, (control, reached)
    # Keyboard only: to the Run page and one of its forms.
    await page.keyboard.press("Escape")
    await page.locator("a[href='#/run']").focus()
    await page.keyboard.press("Enter")
    await page.locator("nav.tabs a").first.focus()
    await page.keyboard.press("Enter")
    await expect(page.locator("#run-form")).to_be_visible()


async def test_console_responses_carry_a_strict_policy(farm: Farm) -> None:
    async with httpx.AsyncClient(base_url=farm.url) as http:
        for path in ("/", "/console", "/console/static/app.js", "/console/static/console.css"):
            resp = await http.get(path)
            assert resp.status_code == 200, path
            csp = resp.headers["content-security-policy"]
            assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
            assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
            assert resp.headers["x-content-type-options"] == "nosniff"
            assert resp.headers["referrer-policy"] == "no-referrer"
        page = (await http.get("/")).text
        assert "<script>" not in page and "style=" not in page and "<style" not in page
        assert (await http.get("/console/static/../app.py")).status_code == 404
        assert (await http.get("/console/static/nope.js")).status_code == 404
        refused = await http.post("/console")
        assert refused.status_code == 405 and "GET" in refused.headers["allow"]
        assert (
            (await http.get("/console/static/app.js"))
            .headers["content-type"]
            .startswith("text/javascript")
        )
