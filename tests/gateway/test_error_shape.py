"""Every 4xx from the shim is the JSON error shape, and malformed requests never get a 5xx: a
walk of many malformed requests over every route, against the real service."""

from __future__ import annotations

import gzip
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from aiserver.gateway import Gateway
from aiserver.gateway.app import ROUTES, TASKS
from tests.support.images import encode, quadrant_image

IMAGE = encode(quadrant_image(16, 12), "PNG")
FIXED = ["/healthz", "/openapi.json", "/metrics", "/api/jobs/x/events", "/artifacts/x/y.png"]


def paths(gw: Gateway) -> list[str]:
    assert gw.app is not None
    found = set(FIXED)
    for route in gw.app[ROUTES]:
        path = route.template.openapi_path
        for var in route.template.variables:
            path = path.replace("{" + var + "}", "x")
        found.add(path)
    for task in gw.app[TASKS].values():
        found.add(f"/api/{task.name}")
    return sorted(found)


def form(name: bytes = b"image", file_name: bytes = b"a.png", body: bytes = IMAGE) -> bytes:
    return (
        b'--B\r\nContent-Disposition: form-data; name="'
        + name
        + b'"; filename="'
        + file_name
        + b'"\r\nContent-Type: image/png\r\n\r\n'
        + body
        + b"\r\n--B--\r\n"
    )


MULTIPART = "multipart/form-data; boundary=B"


def malformed() -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(label, HTTP method, httpx request arguments)."""
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
        yield method, method, {}
    for label, body in (
        ("json null", b"null"),
        ("json number", b"1"),
        ("json array", b"[1]"),
        ("json broken", b'{"a": '),
        ("json unknown field", b'{"no_such_field": 1}'),
        ("json not utf-8", b'{"name": "\xff\xfe"}'),
    ):
        yield label, "POST", {"content": body, "headers": {"Content-Type": "application/json"}}
    yield (
        "ndjson broken",
        "POST",
        {
            "content": b'{"params": {}}\n{"chunk": \n',
            "headers": {"Content-Type": "application/x-ndjson"},
        },
    )
    yield "text body", "POST", {"content": b"hello", "headers": {"Content-Type": "text/plain"}}
    yield "xml body", "POST", {"content": b"<a/>", "headers": {"Content-Type": "application/xml"}}
    yield (
        "multipart without boundary",
        "POST",
        {
            "content": form(),
            "headers": {"Content-Type": "multipart/form-data"},
        },
    )
    yield (
        "multipart wrong boundary",
        "POST",
        {
            "content": form().replace(b"--B", b"--C"),
            "headers": {"Content-Type": MULTIPART},
        },
    )
    yield (
        "multipart truncated",
        "POST",
        {
            "content": form()[:-12],
            "headers": {"Content-Type": MULTIPART},
        },
    )
    yield (
        "multipart file name not utf-8",
        "POST",
        {
            "content": form(file_name=b"\xff\xfe.png"),
            "headers": {"Content-Type": MULTIPART},
        },
    )
    yield (
        "multipart field name not utf-8",
        "POST",
        {
            "content": form(name=b"im\xffage"),
            "headers": {"Content-Type": MULTIPART},
        },
    )
    yield (
        "multipart part without name",
        "POST",
        {
            "content": form().replace(b'name="image"; ', b""),
            "headers": {"Content-Type": MULTIPART},
        },
    )
    for ctype in (MULTIPART, "application/json", "application/x-ndjson"):
        yield (
            f"bad gzip {ctype}",
            "POST",
            {
                "content": gzip.compress(form())[:-10] + b"junk",
                "headers": {"Content-Type": ctype, "Content-Encoding": "gzip"},
            },
        )
    yield (
        "unknown content encoding",
        "POST",
        {
            "content": form(),
            "headers": {"Content-Type": MULTIPART, "Content-Encoding": "zstd-but-not"},
        },
    )
    for params in (
        {"pageSize": "٣"},
        {"pageSize": "1_0"},
        {"pageSize": ""},
        {"no_such": "1"},
        {"name": "\x00"},
        {"spec": "width=abc"},
    ):
        yield f"query {params}", "GET", {"params": params}
        yield (
            f"post query {params}",
            "POST",
            {"params": params, "content": form(), "headers": {"Content-Type": MULTIPART}},
        )


def check_shape(res: httpx.Response, where: str) -> None:
    assert res.status_code < 500, (where, res.status_code, res.text[:300])
    if res.status_code < 400:
        return
    assert res.headers["content-type"].startswith("application/json"), (where, res.text[:200])
    status = res.json()["responseStatus"]
    assert isinstance(status["errorCode"], str) and status["errorCode"], where
    assert isinstance(status["message"], str), where
    assert isinstance(status["errors"], list), where
    if res.status_code == 405:
        assert res.headers.get("allow"), where


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"rate_limit_per_s": 0.0}


async def test_malformed_requests_on_every_route_answer_the_json_error_shape(
    gateway: Gateway, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    walked = 0
    for path in paths(gateway):
        for label, method, kwargs in malformed():
            res = await http.request(method, path, **kwargs)
            check_shape(res, f"{method} {path} ({label})")
            walked += 1
    for path in ("/v1/%ff", "/v1/jobs/%00", "/api/%2e%2e/x", "/" + "a" * 4000, "/v1/jobs/x:nope"):
        for method in ("GET", "POST", "HEAD"):
            res = await http.request(method, path)
            if method != "HEAD":
                check_shape(res, f"{method} {path}")
            else:
                assert res.status_code < 500
            walked += 1
    assert walked > 500
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


async def test_allow_names_what_each_path_takes(gateway: Gateway, http: httpx.AsyncClient) -> None:
    for path, allow in (
        ("/v1/jobs/x:cancel", "POST"),  # not GET: that would be GetJob on a job "x:cancel"
        ("/v1/jobs/x:watch", "GET, HEAD"),
        ("/v1/jobs/x", "GET, HEAD"),
        ("/healthz", "GET, HEAD"),
        ("/openapi.json", "GET, HEAD"),
    ):
        for method in ("OPTIONS", "PUT", "DELETE") + (("GET",) if "GET" not in allow else ()):
            res = await http.request(method, path)
            assert res.status_code == 405, (method, path, res.text)
            assert res.headers["allow"] == allow, (method, path)
            assert res.json()["responseStatus"]["errorCode"] == "METHOD_NOT_ALLOWED"
