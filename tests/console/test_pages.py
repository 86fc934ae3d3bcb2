"""The console in headless chromium against the real service, shim and ComfyUI stand-ins."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.async_api import expect

from tests.console.conftest import DOCS, KEYS, KSAMPLER, UPSCALER, Console, Farm
from tests.support.images import encode, quadrant_image

pytestmark = pytest.mark.asyncio(loop_scope="module")


def photo_file(tmp_path: Path) -> Path:
    photo = tmp_path / "photo.png"
    photo.write_bytes(encode(quadrant_image(64, 48), "png"))
    return photo


async def test_upscale_from_the_run_page_progress_to_done_then_output_and_variant(
    console: Console, farm: Farm, tmp_path: Path
) -> None:
    for agent in farm.agents.values():
        agent.set_node_delay(UPSCALER, 1.0)
    await console.sign_in(KEYS["ops"])
    page = console.page
    await console.open("#/run")
    await page.click("nav.tabs >> text=ImageUpscale")
    await page.wait_for_selector(".drop")  # the form is built once /openapi.json is read
    # Dropped, as a person drags a file onto the zone.
    data = encode(quadrant_image(64, 48), "png")
    await page.evaluate(
        """bytes => {
            const dt = new DataTransfer();
            dt.items.add(new File([new Uint8Array(bytes)], "photo.png", {type: "image/png"}));
            const drop = new DragEvent("drop", {dataTransfer: dt});
            document.querySelector(".drop").dispatchEvent(drop);
        }""",
        list(data),
    )
    await expect(page.locator(".drop-label")).to_contain_text("photo.png")
    await page.click("#run-submit")
    bar = page.locator("#run-progress progress")
    await expect(page.locator("#run-state")).to_have_text("running")
    assert int(await bar.get_attribute("value") or 0) < 100
    await expect(page.locator("#run-state")).to_have_text("succeeded")
    await expect(bar).to_have_attribute("value", "100")
    thumb = page.locator("section.outputs img").first
    await expect(thumb).to_have_attribute("src", re.compile("^blob:"))
    assert await thumb.evaluate("img => img.complete && img.naturalWidth") == 128

    # The job page: timeline, inputs beside outputs, size, download, run again.
    await page.click(".result a[href^='#/jobs/']")
    timeline = page.locator("ol.timeline")
    await expect(timeline.locator("li[data-kind=finished]")).to_contain_text("succeeded")
    for kind in ("accepted", "output"):  # a finished job's replay keeps no progress
        await expect(timeline.locator(f"li[data-kind={kind}]").first).to_be_visible()
    await expect(page.locator("section.inputs")).to_contain_text("photo.png")
    output = page.locator("section.outputs figure").first
    await expect(output).to_contain_text("128x96")
    await expect(output).to_contain_text(re.compile(r"\d+ B · image/png"))
    await expect(output.locator("img")).to_have_attribute("src", re.compile("^blob:"))
    async with page.expect_download() as download_info:
        await output.locator("button", has_text="Download").click()
    download = await download_info.value
    saved = tmp_path / "out.png"
    await download.save_as(saved)
    assert saved.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    await page.wait_for_function(
        "() => [...document.querySelectorAll('section.outputs img')].every(i => i.naturalWidth)"
    )
    await page.locator("body").screenshot(path=str(DOCS / "console-job.png"))

    await page.click("#run-again")
    await expect(page.locator("#run-form")).to_be_visible()
    await expect(page.locator("nav.tabs a[aria-current=page]")).to_have_text("ImageUpscale")


async def test_jobs_list_shows_a_running_img2img_live_and_cancels_it(
    console: Console, farm: Farm
) -> None:
    for agent in farm.agents.values():
        agent.hold_after_step(KSAMPLER, 2)
    await console.sign_in(KEYS["ops"])
    page = console.page
    await expect(page.locator("p.empty")).to_have_text("No jobs.")
    # Made by another client after the page loaded: rows arrive through WatchJobs.
    done = await farm.queue("alice", "ImageUpscale", Tag="batch-7")
    job = await farm.queue("alice", "ImageToImage", PositivePrompt="a lighthouse", Tag="batch-7")
    row = page.locator(f"tr[data-job='{job}']")
    await expect(row).to_have_attribute("data-state", "running")
    await expect(row.locator(".where")).to_contain_text("step 2/")
    await expect(page.locator(f"tr[data-job='{done}']")).to_have_attribute(
        "data-state", "succeeded"
    )
    await expect(row).to_contain_text("alice")  # the admin sees owners
    running_for = await row.locator("td.duration").inner_text()
    await expect(row.locator("td.duration")).not_to_have_text(running_for)  # it ticks
    agent = farm.agents[await row.locator("td.agent").inner_text()]
    await page.locator("body").screenshot(path=str(DOCS / "console-jobs.png"))
    await row.get_by_role("button", name=f"Cancel job {job}").click()
    await expect(row).to_have_attribute("data-state", "cancelled")
    assert agent.received.interrupts or agent.received.deletes

    # Filters: by state, then by tag.
    await page.select_option("#state", "STATE_CANCELLED")
    await expect(page.locator("tbody tr")).to_have_count(1)
    await page.select_option("#state", "")
    await page.fill("#tag", "no-such-tag")
    await page.click(".filters button")
    await expect(page.locator("p.empty")).to_have_text("No jobs.")


async def test_a_failed_job_shows_its_reason_and_comfyuis_node_and_message(
    console: Console, farm: Farm
) -> None:
    for agent in farm.agents.values():
        agent.fail_node(KSAMPLER, "RuntimeError", "CUDA out of memory (stand-in)")
    job = await farm.queue("bob", "ImageToImage", PositivePrompt="a cat")
    await console.sign_in(KEYS["bob"])
    page = console.page
    row = page.locator(f"tr[data-job='{job}']")
    await expect(row).to_have_attribute("data-state", "failed")
    await row.locator("a.state").click()
    failure = page.locator("section.failure")
    await expect(failure.locator(".reason")).to_have_text(re.compile("COMFYUI"))
    await expect(failure).to_contain_text("CUDA out of memory (stand-in)")
    await expect(failure.locator("dl.meta")).to_contain_text(KSAMPLER)

    # Run again: the form comes back with the job's parameters.
    await page.click("#run-again")
    await expect(page.locator("#f-PositivePrompt")).to_have_value("a cat")
    # Ranges come from the OpenAPI document's form schema.
    await expect(page.locator("#f-Steps")).to_have_attribute("max", "150")
    await expect(page.locator(".field", has=page.locator("#f-Denoise"))).to_contain_text(
        "more than 0, max 1"
    )
    await expect(page.locator("nav.tabs a[aria-current=page]")).to_have_text("ImageToImage")


async def test_a_light_task_answers_with_its_image(
    console: Console, farm: Farm, tmp_path: Path
) -> None:
    await console.sign_in(KEYS["alice"])
    page = console.page
    await console.open("#/run/CropImage")
    await page.set_input_files("#f-image", str(photo_file(tmp_path)))
    for name, value in {"X": "8", "Y": "8", "Width": "20", "Height": "10"}.items():
        await page.fill(f"#f-{name}", value)
    await page.click("#run-submit")
    result = page.locator(".result img")
    await expect(result).to_have_attribute("src", re.compile("^blob:"))
    await page.wait_for_function("() => document.querySelector('.result img').naturalWidth")
    assert await result.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [20, 10]

    await page.fill("#f-Width", "999")
    await page.click("#run-submit")
    await expect(page.locator(".result .error")).to_contain_text("CROP_OUT_OF_BOUNDS")
    expected = [p for p in console.problems if "status of 400" in p]  # the refused crop
    assert len(expected) == 1
    console.problems.remove(expected[0])


async def test_the_browser_enforces_the_policy(console: Console, farm: Farm) -> None:
    """An inline script is refused and reported: the check every other test relies on."""
    page = console.page
    await console.open("#/signin")
    await expect(page.locator("#api-key")).to_be_visible()
    await page.evaluate(
        """() => {
            const s = document.createElement("script");
            s.textContent = "window.injected = true";
            document.body.append(s);
        }"""
    )
    assert await page.evaluate("window.injected === undefined")
    await page.wait_for_timeout(200)
    refused = [p for p in console.problems if "Content Security Policy" in p]
    assert refused, console.problems
    console.problems.clear()


async def test_an_agent_goes_offline_live_when_its_standin_is_killed(
    console: Console, farm: Farm
) -> None:
    await console.sign_in(KEYS["ops"])
    page = console.page
    await console.open("#/agents")
    gpu2 = page.locator("[data-agent='gpu-2']")
    await expect(gpu2.locator(".state")).to_have_text("online")
    await expect(gpu2).to_contain_text("ImageUpscale")
    await expect(gpu2.locator(".why")).to_contain_text("ImageToText")
    await expect(gpu2.locator(".why")).to_contain_text("Florence2Run")
    local = page.locator("[data-agent=local]")
    await expect(local).to_contain_text("ImageUpscale")
    await expect(local.locator(".state")).to_have_text("online")
    requests_before = len(farm.agents["gpu-2"].received.requests)
    await farm.agents["gpu-2"].kill()
    await expect(gpu2.locator(".state")).to_have_text("offline")
    await expect(gpu2.locator(".why")).not_to_contain_text("Florence2Run")
    await expect(page.locator("[data-agent='gpu-1'] .state")).to_have_text("online")
    assert requests_before  # the stand-in was probed by the service, not by the page


async def test_sign_in_with_a_key_and_each_key_sees_its_own_jobs(
    console: Console, farm: Farm
) -> None:
    mine = await farm.queue("alice", "ImageUpscale", Tag="alice-job")
    theirs = await farm.queue("bob", "ImageUpscale", Tag="bob-job")
    page = console.page
    await console.open("#/jobs")
    await expect(page).to_have_url(re.compile("#/signin$"))
    await page.fill("#api-key", "not-a-valid-key-0123456789")
    await page.click("form.signin button[type=submit]")
    await expect(page.locator("#signin-status")).to_have_text("That key was refused.")

    await expect(page.locator("#signin-link")).to_have_text("Sign in")
    await console.sign_in(KEYS["alice"])
    await expect(page.locator("#signin-link")).to_have_text("Signed in")
    await expect(page.locator(f"tr[data-job='{mine}']")).to_be_visible()
    await expect(page.locator(f"tr[data-job='{theirs}']")).to_have_count(0)
    await expect(page.locator("th", has_text="Owner")).to_have_count(0)
    assert await page.evaluate("sessionStorage.getItem('aiserver.apiKey')") == KEYS["alice"]
    # Live: alice's next job appears, bob's does not.
    bobs_next = await farm.queue("bob", "ImageUpscale")
    alices_next = await farm.queue("alice", "ImageUpscale")
    await expect(page.locator(f"tr[data-job='{alices_next}']")).to_be_visible()
    await expect(page.locator(f"tr[data-job='{bobs_next}']")).to_have_count(0)
    await console.open("#/agents")
    await expect(page.locator("#main [role=status]")).to_have_text(re.compile("admin keys only"))

    await console.sign_in(KEYS["ops"])
    await expect(page.locator("#signin-link")).to_have_text("Admin key")
    await expect(page.locator(f"tr[data-job='{theirs}']")).to_contain_text("bob")
    await expect(page.locator(f"tr[data-job='{mine}']")).to_contain_text("alice")


async def test_open_mode_needs_no_key(open_console: Console, open_farm: Farm) -> None:
    job = await open_farm.queue(None, "ImageUpscale")
    page = open_console.page
    await open_console.open("#/jobs")
    await expect(page.locator(f"tr[data-job='{job}']")).to_be_visible()
    await expect(page.locator("#signin-link")).to_have_text("Open mode")
    await open_console.open("#/agents")
    await expect(page.locator("[data-agent='gpu-1'] .state")).to_have_text("online")


async def test_the_job_page_follows_a_running_job_to_its_outputs(
    console: Console, farm: Farm
) -> None:
    for agent in farm.agents.values():
        agent.hold_after_step(KSAMPLER, 3)
    job = await farm.queue("alice", "ImageToImage", PositivePrompt="a harbour", Seed="42")
    await console.sign_in(KEYS["alice"])
    page = console.page
    await console.open(f"#/jobs/{job}")
    await expect(page.locator("#job-state")).to_have_text("running")
    await expect(page.locator("p.where")).to_contain_text("KSampler 7 step 3/")
    timeline = page.locator("ol.timeline")
    await expect(timeline.locator("li[data-kind=progress]")).to_have_count(1)  # collapsed
    for agent in farm.agents.values():
        agent.release(KSAMPLER)
    await expect(page.locator("#job-state")).to_have_text("succeeded")
    await expect(timeline.locator("li").last).to_have_text(re.compile("finished: succeeded"))
    await expect(page.locator("section.outputs figure")).to_contain_text("seed 42")
    await expect(page.locator("section.inputs pre")).to_contain_text("a harbour")


async def test_a_job_whose_agent_dies_shows_the_retry_and_finishes_elsewhere(
    console: Console, farm: Farm
) -> None:
    for agent in farm.agents.values():
        agent.hold_after_step(KSAMPLER, 2)
    job = await farm.queue("alice", "ImageToImage", PositivePrompt="a mill")
    await console.sign_in(KEYS["ops"])
    page = console.page
    await console.open(f"#/jobs/{job}")
    await expect(page.locator("p.where")).to_contain_text("step 2/")
    async with farm.http("ops") as http:
        first = (await http.get(f"/v1/jobs/{job}")).json()["job"]["agent"]
    other = next(name for name in farm.agents if name != first)
    farm.agents[other].release(KSAMPLER)
    await farm.agents[first].kill()
    timeline = page.locator("ol.timeline")
    # The run waits for its websocket to come back (30 s) before giving the job up.
    retrying = timeline.locator("li[data-kind=retrying]")
    await expect(retrying).to_contain_text(f"agent {first}", timeout=60_000)
    await expect(page.locator("#job-state")).to_have_text("succeeded")
    await expect(page.locator("dl.summary")).to_contain_text(other)
    await expect(page.locator("dl.summary")).to_contain_text("Attempts2")
    await expect(page.locator("section.outputs figure")).to_have_count(1)
