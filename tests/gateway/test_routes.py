"""Routes, field matching and the OpenAPI document, all derived from the descriptors."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from google.api import annotations_pb2
from imagetasks.v1 import common_pb2, job_service_pb2, tasks_pb2

from aiserver.gateway.compat import compat_field_name, compat_tasks, parse_range
from aiserver.gateway.errors import GatewayError
from aiserver.gateway.fields import FieldError, FieldErrors, apply_fields, resolve
from aiserver.gateway.openapi import build_openapi
from aiserver.gateway.routes import (
    RouteKind,
    RouteTable,
    TemplateError,
    contract_files,
    load_routes,
    parse_template,
)
from aiserver.gateway.schema_rules import INT64_PATTERN


def _annotated_methods() -> list[Any]:
    methods = []
    for file in contract_files():
        for service in file.services_by_name.values():
            for method in service.methods:
                if method.GetOptions().HasExtension(annotations_pb2.http):
                    methods.append(method)
    return methods


def test_every_annotated_rpc_has_a_route() -> None:
    methods = _annotated_methods()
    routes = load_routes(contract_files())
    assert len(methods) >= 14
    assert {r.method.full_name for r in routes} == {m.full_name for m in methods}
    for route in routes:
        rule = route.method.GetOptions().Extensions[annotations_pb2.http]
        pattern = rule.WhichOneof("pattern")
        assert route.http_method == pattern.upper()
        assert route.template.template == getattr(rule, pattern)
        assert route.body == rule.body


def test_route_table_finds_each_rpc() -> None:
    table = RouteTable(load_routes(contract_files()))
    cases = {
        ("GET", "/v1/jobs/01ABC"): ("GetJob", {"name": "jobs/01ABC"}),
        ("GET", "/v1/jobs"): ("ListJobs", {}),
        ("GET", "/v1/jobs/01ABC:watch"): ("WatchJob", {"name": "jobs/01ABC"}),
        ("POST", "/v1/jobs/01ABC:cancel"): ("CancelJob", {"name": "jobs/01ABC"}),
        ("GET", "/v1/agents"): ("ListAgents", {}),
        ("GET", "/v1/artifacts/2025/01/02/ab.png"): (
            "GetArtifact",
            {"name": "artifacts/2025/01/02/ab.png"},
        ),
        ("GET", "/v1/artifacts/2025/01/02/ab.png:read"): (
            "ReadArtifact",
            {"name": "artifacts/2025/01/02/ab.png"},
        ),
        ("GET", "/v1/artifacts/a%20b.png:variant"): ("GetVariant", {"name": "artifacts/a b.png"}),
        ("POST", "/v1/images:imageToImage"): ("ImageToImage", {}),
        ("POST", "/v1/images:crop"): ("CropImage", {}),
    }
    for (method, path), (rpc, variables) in cases.items():
        match, _ = table.find(method, path)
        assert match is not None, path
        assert (match.route.method.name, match.variables) == (rpc, variables)
    assert table.find("GET", "/v1/jobs/a/b")[0] is None
    match, allowed = table.find("DELETE", "/v1/jobs/x")
    assert match is None and allowed == ["GET"]
    match, _ = table.find("HEAD", "/v1/jobs")
    assert match is not None and match.route.method.name == "ListJobs"


def test_route_kinds() -> None:
    kinds = {r.method.name: r.kind for r in load_routes(contract_files())}
    assert kinds["GetJob"] is RouteKind.UNARY
    assert kinds["WatchJob"] is RouteKind.SERVER_STREAM
    assert kinds["ImageToImage"] is RouteKind.BIDI_STREAM


@pytest.mark.parametrize(
    ("template", "path", "expected"),
    [
        ("/v1/{name=shelves/*/books/*}", "/v1/shelves/1/books/2", {"name": "shelves/1/books/2"}),
        ("/v1/{a}/{b=x/**}:do", "/v1/1/x/y/z:do", {"a": "1", "b": "x/y/z"}),
        ("/v1/{a}/{b=x/**}:do", "/v1/1/x/y/z", None),
        ("/v1/*/items", "/v1/anything/items", {}),
        ("/v1/{p.id}", "/v1/7", {"p.id": "7"}),
    ],
)
def test_templates(template: str, path: str, expected: dict[str, str] | None) -> None:
    assert parse_template(template).match(path) == expected


def test_template_openapi_paths() -> None:
    assert parse_template("/v1/{name=jobs/*}:watch").openapi_path == "/v1/jobs/{name}:watch"
    assert parse_template("/v1/{name=artifacts/**}").openapi_path == "/v1/artifacts/{name}"
    assert parse_template("/v1/{n=a/*/b/*}").openapi_path == "/v1/a/{n_1}/b/{n_2}"


@pytest.mark.parametrize(
    "bad", ["v1/x", "/v1/{name", "/v1/{name=}", "/v1//x", "/v1/x:", "/v1/{1a}"]
)
def test_bad_templates(bad: str) -> None:
    with pytest.raises(TemplateError):
        parse_template(bad)


def test_field_names_match_every_spelling_and_reach_options() -> None:
    desc = tasks_pb2.ImageToImageParams.DESCRIPTOR
    for name in ("PositivePrompt", "positivePrompt", "positive_prompt", "POSITIVEPROMPT"):
        assert [f.name for f in resolve(desc, name) or []] == ["positive_prompt"]
    assert [f.name for f in resolve(desc, "RefId") or []] == ["options", "ref_id"]
    assert [f.name for f in resolve(desc, "options.replyTo") or []] == ["options", "reply_to"]
    assert resolve(desc, "RefId", flat=False) is None
    assert resolve(desc, "nothing") is None


def test_apply_fields_converts_like_the_json_mapping() -> None:
    msg = tasks_pb2.ImageToImageParams()
    ignored = apply_fields(
        msg,
        [
            ("PositivePrompt", "a, b"),
            ("Denoise", "0.25"),
            ("Seed", "9007199254740993"),
            ("BatchSize", "2"),
            ("Tag", "t1"),
            ("mode", "async"),
            ("Delivery", "OUTPUT_DELIVERY_REFERENCES"),
            ("NegativePrompt", ""),
            ("Unknown", "x"),
        ],
        strict=False,
    )
    assert ignored == ["Unknown"]
    assert msg.positive_prompt == "a, b"
    assert msg.denoise == pytest.approx(0.25)
    assert msg.seed == 9007199254740993
    assert msg.batch_size == 2
    assert msg.HasField("negative_prompt") and msg.negative_prompt == ""
    assert msg.options.tag == "t1"
    assert msg.options.mode == common_pb2.RESPONSE_MODE_ASYNC
    assert msg.options.delivery == common_pb2.OUTPUT_DELIVERY_REFERENCES


def test_apply_fields_reports_every_bad_value() -> None:
    with pytest.raises(FieldErrors) as caught:
        apply_fields(
            tasks_pb2.ImageToImageParams(),
            [("BatchSize", "99999999999"), ("Seed", "x"), ("Zzz", "1")],
            strict=True,
        )
    errors: list[FieldError] = caught.value.errors
    assert {(e.name, e.reason) for e in errors} == {
        ("Zzz", "UNKNOWN_FIELD"),
        ("BatchSize", "INVALID_VALUE"),
        ("Seed", "INVALID_VALUE"),
    }


def test_repeated_enums_from_query_values() -> None:
    msg = job_service_pb2.ListJobsRequest()
    apply_fields(
        msg,
        [("states", "queued,STATE_RUNNING"), ("states", "5"), ("allOwners", "True")],
        strict=True,
        flat=False,
    )
    assert list(msg.states) == [1, 2, 5]
    assert msg.all_owners is True


def test_compat_tasks_are_derived_from_upload_rpcs() -> None:
    tasks = compat_tasks(contract_files())
    names = sorted(t.name for t in tasks.values())
    assert names == [
        "ConvertImage",
        "CropImage",
        "ImageToImage",
        "ImageToText",
        "ImageUpscale",
        "ImageWithMask",
        "QueueImageToImage",
        "QueueImageToText",
        "QueueImageUpscale",
        "QueueImageWithMask",
    ]  # no RunWorkflow: a Struct cannot come from a flat form; /api/workflows/{name} serves it
    assert not tasks["cropimage"].generative and tasks["queueimagetoimage"].queued


def test_compat_field_names() -> None:
    assert compat_field_name("params.width") == "Width"
    assert compat_field_name("params.options.ref_id") == "RefId"
    assert compat_field_name("params.positive_prompt") == "PositivePrompt"
    assert compat_field_name("image") == "image"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-9", (0, 9)),
        ("bytes=10-", (10, 99)),
        ("bytes=-10", (90, 99)),
        ("bytes=90-500", (90, 99)),
        ("bytes=5-1", None),
        ("bytes=0-1,4-5", None),
        ("items=1-2", None),
    ],
)
def test_ranges(header: str, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, 100) == expected


def test_unsatisfiable_range() -> None:
    with pytest.raises(GatewayError) as caught:
        parse_range("bytes=100-", 100)
    assert caught.value.status == 416
    assert caught.value.headers["Content-Range"] == "bytes */100"


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _check_openapi(doc: dict[str, Any]) -> None:
    assert doc["openapi"].startswith("3.0")
    schemas = doc["components"]["schemas"]
    for ref in _refs(doc):
        assert ref.startswith("#/components/schemas/")
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
    op_ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert len(op_ids) == len(set(op_ids))
    for path, item in doc["paths"].items():
        params = {p for p in path.split("/") if p.startswith("{")}
        for op in item.values():
            assert "responses" in op
            declared = {
                "{" + p["name"] + "}" for p in op.get("parameters", []) if p["in"] == "path"
            }
            assert {p.split("}")[0] + "}" for p in params} == declared, path


def test_openapi_document_from_descriptors() -> None:
    files = contract_files()
    routes = load_routes(files)
    doc = build_openapi(routes, compat_tasks(files))
    _check_openapi(doc)
    paths = doc["paths"]
    for route in routes:
        assert route.http_method.lower() in paths[route.template.openapi_path]
    for path in (
        "/api/ImageToImage",
        "/api/QueueImageToImage",
        "/api/CropImage",
        "/api/GetArtifactGenerationStatus",
        "/artifacts/{path}",
        "/variants/{spec}/{path}",
        "/api/jobs/{id}/events",
    ):
        assert path in paths
    job = doc["components"]["schemas"]["imagetasks.v1.Job"]["properties"]
    assert job["state"]["enum"][:2] == ["STATE_UNSPECIFIED", "STATE_QUEUED"]
    assert job["createTime"] == {"type": "string", "format": "date-time"}
    artifact = doc["components"]["schemas"]["imagetasks.v1.Artifact"]["properties"]
    assert artifact["sizeBytes"] == {
        "type": "string",
        "format": "int64",
        "pattern": INT64_PATTERN,
        "not": {"pattern": "\\n$"},  # Python's `$` alone would take "12\n"
    }
    form = paths["/api/ImageToImage"]["post"]["requestBody"]["content"]["multipart/form-data"]
    props = form["schema"]["properties"]
    assert {"PositivePrompt", "RefId", "Sync", "image"} <= set(props)
    convert = paths["/api/ConvertImage"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert "webp" in convert["schema"]["properties"]["OutputFormat"]["enum"]


async def test_openapi_is_served(http: httpx.AsyncClient) -> None:
    res = await http.get("/openapi.json")
    assert res.status_code == 200
    assert res.headers["content-type"].startswith("application/json")
    doc = json.loads(res.text)
    _check_openapi(doc)
    assert "/v1/jobs/{name}:watch" in doc["paths"]


async def test_health(http: httpx.AsyncClient) -> None:
    res = await http.get("/healthz")
    assert res.status_code == 200
    assert res.json() == {"status": "SERVING"}


async def test_standalone_main_serves_and_stops_on_sigterm(service: Any) -> None:
    import asyncio
    import re
    import signal
    import subprocess
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import sys; from aiserver.gateway import main; sys.exit(main(sys.argv[1:]))",
        *("--target", f"127.0.0.1:{service.grpc_port}", "--port", "0"),
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(30):
            while True:
                line = (await proc.stderr.readline()).decode()
                assert line, "the gateway exited early"
                if m := re.search(r"HTTP gateway on (http://\S+)", line):
                    break
        async with httpx.AsyncClient(base_url=m.group(1)) as client:
            assert (await client.get("/healthz")).json() == {"status": "SERVING"}
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
