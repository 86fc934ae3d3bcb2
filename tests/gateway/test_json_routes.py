"""The /v1 JSON routes of the annotations, and Server-Sent Events, against the fake backend."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from imagetasks.v1 import common_pb2, job_pb2

from aiserver.gateway import Gateway
from tests.gateway.fake_backend import FakeBackend, png


def _image_job(fake: FakeBackend, **kw: Any) -> job_pb2.Job:
    return fake.state.add_job(task=common_pb2.TASK_IMAGE_TO_IMAGE, outputs=[png((9, 9, 9))], **kw)


async def test_get_job_not_found_is_404_with_response_status(fake_http: httpx.AsyncClient) -> None:
    res = await fake_http.get("/v1/jobs/NOPE")
    assert res.status_code == 404
    assert res.json() == {
        "responseStatus": {
            "errorCode": "JOB_NOT_FOUND",
            "message": "job 'jobs/NOPE' not found",
            "errors": [],
            "meta": {"grpcCode": "NOT_FOUND", "domain": "aiserver.imagetasks.v1"},
        }
    }


async def test_get_job_is_the_json_mapping(fake: FakeBackend, fake_http: httpx.AsyncClient) -> None:
    job = _image_job(fake, ref_id="r1")
    res = await fake_http.get(f"/v1/{job.name}")
    assert res.status_code == 200
    body = res.json()["job"]
    assert body["name"] == job.name and body["refId"] == "r1"
    assert body["state"] == "STATE_SUCCEEDED"
    assert body["outputs"][0]["sizeBytes"] == str(job.outputs[0].size_bytes)


async def test_list_jobs_with_query_parameters(
    fake: FakeBackend, fake_http: httpx.AsyncClient
) -> None:
    _image_job(fake, ref_id="a")
    _image_job(fake, ref_id="b", state=job_pb2.Job.STATE_RUNNING)
    res = await fake_http.get("/v1/jobs")
    assert [j["refId"] for j in res.json()["jobs"]] == ["b", "a"]
    res = await fake_http.get("/v1/jobs", params={"refId": "a"})
    assert [j["refId"] for j in res.json()["jobs"]] == ["a"]
    res = await fake_http.get("/v1/jobs", params=[("states", "STATE_RUNNING"), ("page_size", "5")])
    assert [j["refId"] for j in res.json()["jobs"]] == ["b"]


async def test_list_jobs_bad_query(fake_http: httpx.AsyncClient) -> None:
    res = await fake_http.get("/v1/jobs", params={"pageSize": "lots", "colour": "red"})
    assert res.status_code == 400
    errors = res.json()["responseStatus"]["errors"]
    assert {(e["fieldName"], e["errorCode"]) for e in errors} == {
        ("pageSize", "INVALID_VALUE"),
        ("colour", "UNKNOWN_FIELD"),
    }


async def test_server_violations_and_retry_after(fake_http: httpx.AsyncClient) -> None:
    res = await fake_http.get("/v1/jobs", params={"pageSize": "5000"})
    assert res.status_code == 400
    status = res.json()["responseStatus"]
    assert status["errorCode"] == "INVALID_PAGE_SIZE"
    assert status["errors"] == [
        {"fieldName": "page_size", "errorCode": "INVALID_PAGE_SIZE", "message": "must be 0..1000"}
    ]
    res = await fake_http.get("/v1/jobs", params={"tag": "busy"})
    assert res.status_code == 429
    assert res.headers["retry-after"] == "3"


async def test_cancel_job_post_with_json_body(
    fake: FakeBackend, fake_http: httpx.AsyncClient
) -> None:
    job = _image_job(fake, state=job_pb2.Job.STATE_QUEUED)
    res = await fake_http.post(f"/v1/{job.name}:cancel", json={})
    assert res.status_code == 200
    assert res.json()["job"]["state"] == "STATE_CANCELLED"
    res = await fake_http.post(
        f"/v1/{job.name}:cancel", content=b"<x/>", headers={"Content-Type": "application/xml"}
    )
    assert res.status_code == 415
    res = await fake_http.post(
        f"/v1/{job.name}:cancel", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert res.status_code == 400
    assert res.json()["responseStatus"]["errorCode"] == "INVALID_JSON"


async def test_unknown_route_and_wrong_method(fake_http: httpx.AsyncClient) -> None:
    res = await fake_http.get("/v2/jobs")
    assert res.status_code == 404
    assert res.json()["responseStatus"]["errorCode"] == "ROUTE_NOT_FOUND"
    res = await fake_http.delete("/v1/jobs/x")
    assert res.status_code == 405
    assert res.headers["allow"] == "GET, HEAD"


async def test_metadata_is_forwarded(fake: FakeBackend, fake_http: httpx.AsyncClient) -> None:
    job = _image_job(fake)
    await fake_http.get(
        f"/v1/{job.name}", headers={"Authorization": "Bearer sk-1", "X-Request-Id": "abc"}
    )
    md = fake.state.metadata[-1]
    assert md["authorization"] == "Bearer sk-1"
    assert md["x-request-id"] == "abc"


def _sse(text: str) -> list[dict[str, str]]:
    events = []
    for block in text.split("\n\n"):
        if not block.strip() or block.startswith(":"):
            continue
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            key, _, value = line.partition(": ")
            fields[key] = fields[key] + "\n" + value if key in fields else value
        events.append(fields)
    return events


async def test_watch_as_sse(fake: FakeBackend, fake_http: httpx.AsyncClient) -> None:
    job = _image_job(fake)
    res = await fake_http.get(f"/v1/{job.name}:watch", headers={"Accept": "text/event-stream"})
    assert res.status_code == 200
    assert res.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert res.headers["cache-control"] == "no-cache"
    assert res.text.endswith("\n\n")
    events = _sse(res.text)
    assert [e["event"] for e in events] == [
        "accepted",
        "progress",
        "progress",
        "output",
        "finished",
    ]
    assert [int(e["id"]) for e in events] == [1, 2, 3, 4, 5]
    data = [json.loads(e["data"]) for e in events]
    assert all(d["job"] == job.name for d in data)
    assert data[3]["output"]["artifact"]["name"] == job.outputs[0].name
    assert data[4]["finished"]["job"]["state"] == "STATE_SUCCEEDED"


async def test_watch_sse_resumes_after_last_event_id(
    fake: FakeBackend, fake_http: httpx.AsyncClient
) -> None:
    job = _image_job(fake)
    res = await fake_http.get(
        f"/api/jobs/{job.name.removeprefix('jobs/')}/events", headers={"Last-Event-ID": "3"}
    )
    assert res.headers["content-type"].startswith("text/event-stream")
    assert [e["event"] for e in _sse(res.text)] == ["output", "finished"]


async def test_watch_as_ndjson_by_default(fake: FakeBackend, fake_http: httpx.AsyncClient) -> None:
    job = _image_job(fake)
    res = await fake_http.get(f"/v1/{job.name}:watch")
    assert res.headers["content-type"] == "application/x-ndjson; charset=utf-8"
    lines = [json.loads(line) for line in res.text.splitlines()]
    assert [next(iter(set(x["event"]) - {"job", "sequence"})) for x in lines] == [
        "accepted",
        "progress",
        "progress",
        "output",
        "finished",
    ]


async def test_watch_unknown_job_fails_before_the_stream(fake_http: httpx.AsyncClient) -> None:
    res = await fake_http.get("/api/jobs/NOPE/events")
    assert res.status_code == 404
    assert res.headers["content-type"].startswith("application/json")
    assert res.json()["responseStatus"]["errorCode"] == "JOB_NOT_FOUND"


@pytest.mark.parametrize("gateway_overrides", [{"keepalive_s": 0.2}])
async def test_sse_keepalive_and_stop_ends_open_watches(
    fake: FakeBackend, fake_gateway: Gateway
) -> None:
    job = _image_job(fake, state=job_pb2.Job.STATE_RUNNING)  # its watch stays open
    async with (
        httpx.AsyncClient(base_url=fake_gateway.url, timeout=10) as client,
        client.stream("GET", f"/api/jobs/{job.name[5:]}/events") as res,
    ):
        assert res.status_code == 200
        chunks = res.aiter_text()
        got = ""
        while ": keep-alive\n\n" not in got:
            got += await anext(chunks)
        assert got.startswith("event: accepted\nid: 1\ndata: ")
        assert [e["event"] for e in _sse(got)] == ["accepted", "progress", "progress", "output"]
        # Stopping the gateway ends the open watch at once (not after the grace period).
        async with asyncio.timeout(3):
            await fake_gateway.stop()
            rest = "".join([c async for c in chunks])
    assert "finished" not in rest
    last = _sse(rest)[-1]
    assert last["event"] == "error"
    assert json.loads(last["data"])["responseStatus"]["errorCode"] == "GATEWAY_STOPPING"
