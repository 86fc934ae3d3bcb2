"""Workflows on the console: a workflow the operator adds is a Run form of its own, built from
its parameter schema, without a restart; its jobs are named after it."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from playwright.async_api import expect

from aiserver.providers.comfy.workflows import default_workflows_dir
from tests.console.conftest import KEYS, Console, Farm

pytestmark = pytest.mark.asyncio(loop_scope="module")

SAMPLER = "5"  # the KSampler of workflows/text_to_image.json


def write_postcard(farm: Farm) -> None:
    """``postcard``: text_to_image's graph with fewer parameters, in the operator's folder."""
    builtin = default_workflows_dir()
    graph = json.loads((builtin / "text_to_image.json").read_text(encoding="utf-8"))
    binding = json.loads((builtin / "text_to_image.binding.json").read_text(encoding="utf-8"))
    keep = ("prompt", "steps", "seed", "sampler")
    binding |= {
        "title": "Postcard",
        "description": "A small picture from a prompt.",
        "graph": "postcard.json",
        "params": {k: v for k, v in binding["params"].items() if k in keep},
    }
    binding.pop("$schema", None)
    folder = farm.workflows
    (folder / "postcard.json").write_text(json.dumps(graph), encoding="utf-8")
    (folder / "postcard.binding.json").write_text(json.dumps(binding), encoding="utf-8")


async def until_listed(farm: Farm, name: str) -> None:
    async with farm.http("ops") as http, asyncio.timeout(15):
        while True:
            listed = (await http.get("/v1/workflows")).json().get("workflows", [])
            if any(w["name"] == f"workflows/{name}" and w.get("version") for w in listed):
                return
            await asyncio.sleep(0.1)


async def test_a_workflow_added_to_the_folder_runs_from_its_own_form(
    console: Console, farm: Farm
) -> None:
    for agent in farm.agents.values():
        agent.hold_after_step(SAMPLER, 2)
    await console.sign_in(KEYS["ops"])
    page = console.page
    await console.open("#/run")
    tabs = page.locator("nav.tabs a")
    await expect(tabs.filter(has_text=re.compile("^text_to_image$"))).to_have_count(1)
    await expect(tabs.filter(has_text="postcard")).to_have_count(0)
    # RunWorkflow's generic form (free-form parameters) is not offered: each workflow is.
    await expect(tabs.filter(has_text=re.compile("^workflows"))).to_have_count(0)
    await expect(tabs.filter(has_text="ImageUpscale")).to_have_count(1)

    write_postcard(farm)
    await until_listed(farm, "postcard")
    await console.open("#/run/postcard")  # the same page: no reload, no restart
    await expect(page.locator("nav.tabs a[aria-current=page]")).to_have_text("postcard")
    await expect(page.locator("#run-form")).to_contain_text("Postcard")
    await expect(page.locator("#f-steps")).to_have_attribute("max", "150")
    await expect(page.locator("#f-steps")).to_have_value("20")  # the binding's default
    await expect(page.locator("#f-sampler option[value=heun]")).to_have_count(1)
    await expect(page.locator("#f-prompt")).to_have_attribute("required", "")
    for option in ("Tag", "RefId", "OutputFormat", "Quality"):  # the job options, as for tasks
        await expect(page.locator(f"#f-{option}")).to_have_count(1)
    await expect(page.locator("#f-width")).to_have_count(0)

    await page.fill("#f-prompt", "a lighthouse at dusk")
    await page.fill("#f-steps", "6")
    await page.select_option("#f-sampler", "heun")
    await page.fill("#f-Tag", "cards")
    await page.click("#run-submit")
    await expect(page.locator("#run-state")).to_have_text("running")
    await expect(page.locator(".result .where")).to_contain_text("KSampler 5 step 2/6")
    for agent in farm.agents.values():
        agent.release(SAMPLER)
    await expect(page.locator("#run-state")).to_have_text("succeeded")
    await expect(page.locator("#run-progress progress")).to_have_attribute("value", "100")
    thumb = page.locator(".result section.outputs img").first
    await expect(thumb).to_have_attribute("src", re.compile("^blob:"))
    link = page.locator(".result a[href^='#/jobs/']")
    job = (await link.inner_text()).removeprefix("job ")

    # The job page names the workflow and shows what it ran with.
    await link.click()
    await expect(page.locator("h1")).to_contain_text("postcard")
    await expect(page.locator("dl.summary")).to_contain_text("Taskpostcard")
    await expect(page.locator("dl.summary")).to_contain_text(re.compile("Version[0-9a-f]{16}"))
    await expect(page.locator("section.inputs pre")).to_contain_text("a lighthouse at dusk")

    # Run again: the workflow's form, with the job's parameters and tag.
    await page.click("#run-again")
    await expect(page.locator("nav.tabs a[aria-current=page]")).to_have_text("postcard")
    await expect(page.locator("#f-prompt")).to_have_value("a lighthouse at dusk")
    await expect(page.locator("#f-steps")).to_have_value("6")
    await expect(page.locator("#f-sampler")).to_have_value("heun")
    await expect(page.locator("#f-Tag")).to_have_value("cards")

    # The list: named after the workflow, and found by the task filter.
    await console.open("#/jobs")
    row = page.locator(f"tr[data-job='{job}']")
    await expect(row.locator("td").nth(1)).to_have_text("postcard")
    await expect(page.locator("#task option[value=TASK_WORKFLOW]")).to_have_text("Workflow")
    await farm.queue("alice", "ImageUpscale")
    await page.select_option("#task", "TASK_WORKFLOW")
    await expect(page.locator("tbody tr")).to_have_count(1)
    await expect(row).to_have_attribute("data-state", "succeeded")
