"""Warm variants through the in-process shim's local calls: the same access rules as gRPC
(key, owner, signature, rate), nothing leaked (stream count), and the network never used."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx

from aiserver.api.local_calls import LocalCalls
from tests.security.conftest import auth, channel_to, http_base, keyed_service, upscale

SECRET = "signing-secret-0123456789"


def _variant_path(url: str, spec: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(url)
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    return f"/variants/{spec}/" + parts.path.removeprefix("/artifacts/"), q


async def test_warm_variants_keep_the_keys_and_owners(tmp_path: Path) -> None:
    async with (
        keyed_service(tmp_path) as (service, _),
        channel_to(service) as ch,
        httpx.AsyncClient(base_url=http_base(service), timeout=30) as http,
    ):
        assert service.gateway is not None and service.gateway.backend is not None
        assert isinstance(service.gateway.backend.local, LocalCalls)
        got = await upscale(ch, "alice")
        path, _ = _variant_path(got.final.outputs[0].url, "width=8")
        first = await http.get(path, headers=auth("alice"))
        assert first.status_code == 200 and first.headers["content-type"] == "image/webp"
        assert len(service.variants.memory) == 1  # warm from now on
        again = await http.get(path, headers=auth("alice"))
        assert again.status_code == 200 and again.content == first.content
        assert again.headers["etag"] == first.headers["etag"]
        assert again.headers["x-request-id"]
        cached = await http.get(
            path, headers=auth("alice") | {"If-None-Match": first.headers["etag"]}
        )
        assert cached.status_code == 304
        res = await http.get(path)  # no key
        assert res.status_code == 401
        assert res.json()["responseStatus"]["errorCode"] == "API_KEY_MISSING"
        res = await http.get(path, headers={"Authorization": "Bearer nope"})
        assert res.status_code == 401
        assert res.json()["responseStatus"]["errorCode"] == "API_KEY_INVALID"
        res = await http.get(path, headers=auth("bob"))  # someone else's: not found
        assert res.status_code == 404
        res = await http.get(path, headers=auth("ops"))  # an admin's
        assert res.status_code == 200 and res.content == first.content
        res = await http.get(path.replace("width=8", "width=0"), headers=auth("alice"))
        assert res.status_code == 400
        assert service.variants.computations == 1
        guard = service.gateway.backend.local.interceptor
        for _ in range(100):  # closed calls finish in the background
            if guard.active_streams == 0:
                break
            await asyncio.sleep(0.01)
        assert guard.active_streams == 0


async def test_warm_variants_keep_the_signatures(tmp_path: Path) -> None:
    signed = {"artifact_access": "signed", "url_signing_secrets": (SECRET,)}
    async with (
        keyed_service(tmp_path, **signed) as (service, _),
        channel_to(service) as ch,
        httpx.AsyncClient(base_url=http_base(service), timeout=30) as http,
    ):
        got = await upscale(ch, "alice")
        path, q = _variant_path(got.final.outputs[0].url, "width=8")
        assert (await http.get(path, params=q)).status_code == 200
        assert len(service.variants.memory) == 1
        assert (await http.get(path, params=q)).status_code == 200  # warm
        bad = q | {"signature": ("A" if q["signature"][0] != "A" else "B") + q["signature"][1:]}
        res = await http.get(path, params=bad)
        assert res.status_code == 403
        assert res.json()["responseStatus"]["errorCode"] == "SIGNATURE_INVALID"
        res = await http.get(path)
        assert res.status_code == 401
