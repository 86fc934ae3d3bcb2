"""The shim's OpenAPI document: valid, carrying the contract's limits, and true to the server.

The fuzz pass generates schema-valid requests with schemathesis against a real shim in front of
a real service (ComfyUI stand-in agent), and fails on any 5xx and on any rejection for a reason
the document could have stated.
"""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import protovalidate
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from imagetasks.v1 import workflow_service_pb2 as wpb
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import OpenAPIV30SpecValidator
from PIL import Image
from schemathesis.specs.openapi import checks as oc

from aiserver.gateway import Gateway, GatewaySettings
from tests.support.generation import comfy_service

EXAMPLES_PER_OPERATION = 6

# Rejections that depend on state or data no schema can describe. Anything else a
# schema-valid request is refused for means a limit is missing from the document.
DATA_DEPENDENT = {
    "CROP_OUT_OF_BOUNDS": "the rectangle is checked against the uploaded image's size",
    "UNKNOWN_MODEL": "the models are the agents' (GET /v1/agents)",
    "COMFYUI_MODEL_MISSING": "the models are the agents' (GET /v1/agents)",
    "COMFYUI_PROMPT_INVALID": "sampler and scheduler names are the agent's (its /object_info)",
    "UNKNOWN_VARIANT_PRESET": "presets are the operator's",
    "VARIANT_TOO_LARGE": "the largest side is the operator's setting",
    "UNSUPPORTED_FORMAT": "AVIF needs a Pillow that writes it",
    "INVALID_PAGE_TOKEN": "page tokens are opaque, handed out by a previous page",
    "INVALID_REPLY_TO": "what the host is, or resolves to, decides (a loopback host is refused)",
}
# GetVariant's `spec` and the separate fields exclude each other (a CEL rule on the message),
# and a spec's keys may appear once: neither fits a query parameter's schema.
CROSS_FIELD = {
    ("INVALID_VARIANT_SPEC", "/v1/artifacts/{name}:variant"),
    ("INVALID_VARIANT_SPEC", "/variants/{spec}/{path}"),
    # "jobId or refId": one of two query parameters, documented in the description.
    ("INVALID_PARAMETERS", "/api/GetArtifactGenerationStatus"),
    ("INVALID_PARAMETERS", "/api/GetTextGenerationStatus"),
}
# Streams that end only when the caller leaves (WatchJobs, WatchAgents): a request cannot be
# fuzzed to an answer; tests/api/test_watch_jobs.py and test_watch_agents.py cover them.
ENDLESS = {"/v1/jobs:watch", "/v1/agents:watch"}


CONFORMANCE = [
    oc.response_schema_conformance,
    oc.status_code_conformance,
    oc.content_type_conformance,
]


def _png(side: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (120, 30, 200)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
async def shim_url(tmp_path: Path) -> AsyncIterator[str]:
    async with comfy_service(tmp_path) as (service, _stand_ins):
        settings = GatewaySettings.from_settings(service.settings, spool_dir=tmp_path)
        gw = Gateway(f"127.0.0.1:{service.grpc_port}", host="127.0.0.1", port=0, settings=settings)
        await gw.start()
        try:
            yield gw.url
        finally:
            await gw.stop()


async def _document(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        res = await http.get("/openapi.json")
    assert res.status_code == 200
    doc: dict[str, Any] = res.json()
    return doc


async def test_document_validates(shim_url: str) -> None:
    doc = await _document(shim_url)
    errors = [e.message for e in OpenAPIV30SpecValidator(doc).iter_errors()]
    assert errors == []


async def test_document_carries_the_contract_limits(shim_url: str) -> None:
    doc = await _document(shim_url)
    schemas = doc["components"]["schemas"]
    i2i = schemas["imagetasks.v1.ImageToImageParams"]["properties"]
    assert i2i["steps"] | {} == {"type": "integer", "format": "int32", "minimum": 1, "maximum": 150}
    assert (i2i["batchSize"]["minimum"], i2i["batchSize"]["maximum"]) == (1, 10)
    assert i2i["positivePrompt"]["pattern"] == "\\S"
    assert i2i["positivePrompt"]["maxLength"] == 4000
    assert 0 < i2i["denoise"]["minimum"] < 1e-30 and i2i["denoise"]["maximum"] == 1
    assert re.fullmatch(i2i["seed"]["pattern"], str(2**63 - 1))
    assert not re.fullmatch(i2i["seed"]["pattern"], str(2**63))
    assert not re.fullmatch(i2i["seed"]["pattern"], "-1")
    convert = schemas["imagetasks.v1.ConvertImageParams"]
    assert convert["required"] == ["outputFormat"]
    assert "IMAGE_FORMAT_UNSPECIFIED" not in convert["properties"]["outputFormat"]["enum"]
    options = schemas["imagetasks.v1.JobOptions"]["properties"]
    assert options["refId"]["maxLength"] == 128
    paths = doc["paths"]
    (name,) = paths["/v1/jobs/{name}"]["get"]["parameters"]
    assert name["schema"]["pattern"] == "^[A-Za-z0-9_-]{1,64}$"
    page_size = next(p for p in paths["/v1/jobs"]["get"]["parameters"] if p["name"] == "pageSize")
    assert (page_size["schema"]["minimum"], page_size["schema"]["maximum"]) == (0, 1000)
    form = paths["/api/CropImage"]["post"]["requestBody"]["content"]["multipart/form-data"]
    props = form["schema"]["properties"]
    assert props["Width"]["minimum"] == 1 and props["Quality"]["maximum"] == 100
    form = paths["/api/ImageWithMask"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert {"image", "mask"} <= set(form["schema"]["required"])


def _schemas_in(node: Any) -> list[dict[str, Any]]:
    if isinstance(node, list):
        return [s for item in node for s in _schemas_in(item)]
    if not isinstance(node, dict):
        return []
    own = [node] if isinstance(node.get("pattern"), str) else []
    # (a `not` holds what a value may not match: not a schema's own pattern)
    return own + [s for k, v in node.items() if k != "not" for s in _schemas_in(v)]


async def test_patterns_mean_for_python_what_they_mean_for_ecma_and_re2(shim_url: str) -> None:
    """Python's `$` also matches before a final newline (ECMA's and RE2's do not): every
    end-anchored pattern comes with a ban on one, so Python fuzzers and validators agree."""
    doc = await _document(shim_url)
    anchored = [s for s in _schemas_in(doc) if s["pattern"].endswith("$")]
    assert len(anchored) > 10
    for schema in anchored:
        assert re.search(schema["not"]["pattern"], "x\n"), schema
    form = doc["paths"]["/api/workflows/text_to_image"]["post"]["requestBody"]["content"]
    props = form["multipart/form-data"]["schema"]["properties"]
    # The job options, as POST /api/workflows/{name} takes them.
    assert {"RefId", "Tag", "ReplyTo", "OutputFormat", "Quality", "Sync"} <= set(props)
    ref_id = OAS30Validator(props["RefId"])
    assert ref_id.is_valid("batch-7")
    assert re.search(props["RefId"]["pattern"], "batch-7\n")  # what the fuzzer drew
    assert not ref_id.is_valid("batch-7\n")
    refused = wpb.RunWorkflowParams(workflow="text_to_image")
    refused.options.ref_id = "batch-7\n"
    with pytest.raises(protovalidate.ValidationError):  # as the server's rules (RE2) say
        protovalidate.validate(refused)
    assert OAS30Validator(props["prompt"]).is_valid("two lines\nof prompt\n")
    assert not OAS30Validator(props["prompt"]).is_valid("nul \x00")


async def test_sync_and_queued_answers_are_told_apart(shim_url: str) -> None:
    doc = await _document(shim_url)
    answer = doc["paths"]["/api/ImageToImage"]["post"]["responses"]["200"]["content"]
    one_of = answer["application/json"]["schema"]
    # Each answer the shim gives matches exactly one branch of the oneOf.
    sync = {"jobId": "j", "refId": "r", "jobState": "Completed", "status": "Completed"}
    sync |= {"outputs": [], "results": [{"fileName": "a.png", "url": "/a"}], "textOutputs": []}
    queued = {"jobId": "j", "refId": "r", "jobState": "Queued", "status": "Queued"}
    queued |= {"statusUrl": "http://h/api/GetArtifactGenerationStatus?jobId=j"}
    for body, branch in ((sync, "GenerationResponse"), (queued, "QueueGenerationResponse")):
        matches = [
            ref["$ref"].rsplit("/", 1)[1]
            for ref in one_of["oneOf"]
            if OAS30Validator({**ref, "components": doc["components"]}).is_valid(body)
        ]
        assert matches == [branch]


@dataclass
class Findings:
    calls: int = 0
    problems: list[str] = field(default_factory=list)


def _status_of(response: Any) -> dict[str, Any]:
    try:
        return dict(response.json()["responseStatus"])
    except (ValueError, KeyError, TypeError):
        return {}


def _check(findings: Findings, method: str, path: str, response: Any) -> None:
    findings.calls += 1
    status, body = response.status_code, _status_of(response)
    reason = body.get("errorCode", "")
    where = f"{method} {path} -> {status} {reason} ({body.get('message', '')[:200]})"
    if status >= 500 and not (path == "/healthz" and status == 503):
        findings.problems.append(f"{where}: server error")
    elif (
        status in (400, 412, 422)
        and reason not in DATA_DEPENDENT
        and (reason, path) not in CROSS_FIELD
    ):
        findings.problems.append(f"{where}: a schema-valid request was rejected")


def _fuzz_operation(operation: Any, base_url: str, findings: Findings) -> None:
    path, method = operation.path, operation.method.upper()
    # Uploads are fuzzed as forms: the NDJSON body is a sequence of messages (params, then
    # chunks) that a one-message schema can only describe line by line.
    forms = any(b.media_type == "multipart/form-data" for b in operation.body)
    image = _png()

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(media_type="multipart/form-data" if forms else None))
    def run(case: Any) -> None:
        if isinstance(case.body, dict):
            # Any bytes fit the schema: make them an image, sent after the text fields (the
            # form's documented order).
            files = [n for n in ("image", "mask") if n in case.body]
            case.body = {k: v for k, v in case.body.items() if k not in files}
            case.body.update(dict.fromkeys(files, image))
        response = case.call(base_url=base_url, timeout=60)
        _check(findings, method, path, response)
        try:  # and the answer is what the document says it is
            case.validate_response(response, checks=CONFORMANCE)
        except AssertionError as exc:
            findings.problems.append(f"{method} {path}: {str(exc)[:300]}")

    try:
        run()
    except Unsatisfiable:
        findings.problems.append(f"{method} {path}: no request can be generated from the schema")


def _fuzz(doc: dict[str, Any], base_url: str, findings: Findings) -> None:
    """Run in a thread: schemathesis' calls are blocking."""
    for result in schemathesis.openapi.from_dict(doc).get_all_operations():
        operation = result.ok()
        if operation.path != "/openapi.json" and operation.path not in ENDLESS:
            _fuzz_operation(operation, base_url, findings)


# schemathesis' own strategies draw from `random` (its path-parameter bias); not ours to fix.
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
async def test_schema_valid_requests_are_accepted(shim_url: str) -> None:
    doc = await _document(shim_url)
    findings = Findings()
    await asyncio.wait_for(asyncio.to_thread(_fuzz, doc, shim_url, findings), timeout=110)
    assert findings.calls >= 150, findings.calls
    assert findings.problems == [], "\n".join(sorted(set(findings.problems)))
