"""Artifacts and variants: private (key and owner) or signed URLs; nothing outside the store."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
import httpx
import pytest
from imagetasks.v1 import artifact_service_pb2 as apb
from imagetasks.v1 import artifact_service_pb2_grpc
from PIL import Image

from aiserver.artifacts.links import UrlSigner
from aiserver.client._chunks import read_chunk
from aiserver.errors import ServiceError
from aiserver.jobs.model import ArtifactRef, Job, JobState
from aiserver.tasks import ImageUpscaleSpec, TaskKind
from aiserver.webhooks import payload_of
from tests.security.conftest import auth, bearer, channel_to, http_base, keyed_service, upscale
from tests.support.grpc_helpers import rich_status

SECRET = "signing-secret-0123456789"
OLD_SECRET = "old-signing-secret-0123456789"
SIGNED = {"artifact_access": "signed", "url_signing_secrets": (SECRET, OLD_SECRET)}


def _query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def _with(url: str, **params: str) -> str:
    q = _query(url) | params
    return urlsplit(url).path + "?" + "&".join(f"{k}={v}" for k, v in q.items())


# --- the signer ---------------------------------------------------------------------------


def test_signer_round_trip_rotation_and_tampering() -> None:
    now = [1_900_000_000.0]
    old = UrlSigner([OLD_SECRET], ttl_s=600, clock=lambda: now[0])
    new = UrlSigner([SECRET, OLD_SECRET], ttl_s=600, clock=lambda: now[0])
    only_new = UrlSigner([SECRET], ttl_s=600, clock=lambda: now[0])
    path = "/artifacts/2031/05/06/" + "a" * 64 + ".png"
    url = new.sign(path)
    q = _query(url)
    expires, signature = int(q["expires"]), q["signature"]
    assert urlsplit(url).path == path and expires % 60 == 0
    assert now[0] + 600 <= expires < now[0] + 660
    new.verify([path], expires, signature)
    only_new.verify([path], expires, signature)
    with pytest.raises(ServiceError) as caught:
        old.verify([path], expires, signature)  # the old secret alone does not know it
    assert caught.value.reason == "SIGNATURE_INVALID"
    legacy = _query(old.sign(path))
    new.verify([path], int(legacy["expires"]), legacy["signature"])  # rotation: still valid
    with pytest.raises(ServiceError):
        only_new.verify([path], int(legacy["expires"]), legacy["signature"])
    for bad in (
        ([path + "x"], expires, signature),
        ([path], expires + 60, signature),
        ([path], expires, signature[:-1] + ("A" if signature[-1] != "A" else "B")),
        ([path], expires, ""),
        ([path], 0, signature),
        ([path], -5, signature),
        ([path], expires, "ä" * 43),
    ):
        with pytest.raises(ServiceError) as caught:
            new.verify(*bad)
        assert caught.value.reason == "SIGNATURE_INVALID"
        assert caught.value.kind.value == "PERMISSION_DENIED"
    now[0] = expires + 1.0
    with pytest.raises(ServiceError) as caught:
        new.verify([path], expires, signature)
    assert caught.value.reason == "SIGNATURE_EXPIRED"


def test_webhook_urls_are_signed_too() -> None:
    signer = UrlSigner([SECRET], ttl_s=60)
    now = time.time()
    from datetime import UTC, datetime

    when = datetime.fromtimestamp(now, UTC)
    ref = ArtifactRef(
        name="artifacts/2031/05/06/" + "b" * 64 + ".png",
        url="/artifacts/2031/05/06/" + "b" * 64 + ".png",
        file_name="x.png",
        mime_type="image/png",
        width=1,
        height=1,
        size_bytes=1,
        sha256="b" * 64,
        seed=None,
        provider="p",
        created=when,
        job_id="j",
    )
    job = Job(
        id="j",
        task=TaskKind.IMAGE_UPSCALE,
        spec=ImageUpscaleSpec(),
        state=JobState.SUCCEEDED,
        created=when,
        updated=when,
        outputs=[ref],
    )
    url = payload_of(job, "https://img.example.com", signer.sign)["outputs"][0]["url"]
    assert url.startswith("https://img.example.com/artifacts/2031/05/06/")
    q = _query(url)
    signer.verify([urlsplit(url).path], int(q["expires"]), q["signature"])


# --- signed mode, end to end --------------------------------------------------------------


async def test_signed_urls_open_artifacts_and_variants_without_a_key(tmp_path: Path) -> None:
    async with (
        keyed_service(tmp_path, **SIGNED) as (service, _),
        channel_to(service) as ch,
        httpx.AsyncClient(base_url=http_base(service), timeout=30) as http,
    ):
        got = await upscale(ch, "alice")
        artifact = got.final.outputs[0]
        assert "signature=" in got.of("output")[0].artifact.url  # the stream's URLs too
        q = _query(artifact.url)
        assert set(q) == {"expires", "signature"}
        res = await http.get(artifact.url)  # no key
        assert res.status_code == 200 and res.content == got.output_bytes(0)
        max_age = int(res.headers["cache-control"].split("max-age=")[1].split(",")[0])
        assert 0 < max_age <= 3660
        # The contract's own route maps the query onto the request fields.
        path = urlsplit(artifact.url).path
        res = await http.get(f"/v1{path}:read", params=q)
        assert res.status_code == 200, res.text
        # gRPC: the fields, no key.
        arts = artifact_service_pb2_grpc.ArtifactServiceStub(ch)
        read = arts.ReadArtifact(
            apb.ReadArtifactRequest(
                name=artifact.name, expires=int(q["expires"]), signature=q["signature"]
            )
        )
        assert b"".join([r.data async for r in read]) == got.output_bytes(0)
        # A variant's URL comes signed; an artifact's signature also opens its variants.
        first = await anext(
            aiter(
                arts.GetVariant(
                    apb.GetVariantRequest(name=artifact.name, width=8), metadata=bearer("alice")
                )
            )
        )
        assert "signature=" in first.info.url
        res = await http.get(first.info.url)
        assert res.status_code == 200 and res.headers["content-type"] == "image/webp"
        rel = path.removeprefix("/artifacts/")
        res = await http.get(f"/variants/width=16/{rel}", params=q)
        assert res.status_code == 200
        # The shim's task outputs carry signed, absolute URLs.
        res = await http.post(
            "/api/ImageUpscale",
            files={"image": ("a.png", _png(20))},
            data={"Sync": "true"},
            headers=auth("bob"),
        )
        body = res.json()
        assert res.status_code == 200, body
        out = body["outputs"][0]["url"]
        assert out.startswith(http_base(service)) and "signature=" in out
        assert (await http.get(out)).status_code == 200


async def test_bad_signatures_are_refused(tmp_path: Path) -> None:
    async with (
        keyed_service(tmp_path, **SIGNED) as (service, _),
        channel_to(service) as ch,
        httpx.AsyncClient(base_url=http_base(service), timeout=30) as http,
    ):
        got = await upscale(ch, "alice")
        other = await upscale(ch, "alice", model="RealESRGAN_x4plus.pth")
        url = got.final.outputs[0].url
        q = _query(url)
        sig = q["signature"]
        expired = UrlSigner([SECRET], ttl_s=60, clock=lambda: time.time() - 3600).sign(
            urlsplit(url).path
        )
        cases = {
            _with(url, signature=("A" if sig[0] != "A" else "B") + sig[1:]): "SIGNATURE_INVALID",
            _with(url, expires=str(int(q["expires"]) + 60)): "SIGNATURE_INVALID",
            _with(url, signature=""): "SIGNATURE_INVALID",
            expired: "SIGNATURE_EXPIRED",
            # Another artifact's signature does not open this one.
            _with(other.final.outputs[0].url, **q): "SIGNATURE_INVALID",
        }
        for target, reason in cases.items():
            res = await http.get(target)
            assert res.status_code == 403, (target, res.text)
            assert res.json()["responseStatus"]["errorCode"] == reason
        res = await http.get(_with(url, expires="soon"))
        assert res.status_code == 400
        res = await http.get(urlsplit(url).path)  # neither key nor signature
        assert res.status_code == 401
        assert res.json()["responseStatus"]["errorCode"] == "API_KEY_MISSING"
        res = await http.get(urlsplit(url).path, headers=auth("alice"))  # the owner's key
        assert res.status_code == 200
        res = await http.get(urlsplit(url).path, headers=auth("bob"))  # someone else's
        assert res.status_code == 404
        arts = artifact_service_pb2_grpc.ArtifactServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await arts.GetArtifact(
                apb.GetArtifactRequest(
                    name=got.final.outputs[0].name, expires=int(q["expires"]), signature="x"
                )
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # Other services are not opened by a signature: they still need a key.
        from imagetasks.v1 import job_service_pb2 as jpb
        from imagetasks.v1 import job_service_pb2_grpc

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await job_service_pb2_grpc.JobServiceStub(ch).GetJob(
                jpb.GetJobRequest(name=got.final.name)
            )
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_private_mode_ignores_signatures(tmp_path: Path) -> None:
    async with (
        keyed_service(tmp_path) as (service, _),
        channel_to(service) as ch,
        httpx.AsyncClient(base_url=http_base(service), timeout=30) as http,
    ):
        got = await upscale(ch, "alice")
        url = got.final.outputs[0].url
        assert "?" not in url
        forged = UrlSigner([SECRET], ttl_s=60).sign(url)
        res = await http.get(forged)
        assert res.status_code == 401
        arts = artifact_service_pb2_grpc.ArtifactServiceStub(ch)
        q = _query(forged)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await arts.GetArtifact(
                apb.GetArtifactRequest(
                    name=got.final.outputs[0].name,
                    expires=int(q["expires"]),
                    signature=q["signature"],
                )
            )
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert rich_status(caught.value)[1]["ErrorInfo"].reason == "API_KEY_MISSING"


# --- nothing outside the store --------------------------------------------------------------


async def raw_get(port: int, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """An HTTP/1.1 GET of ``path`` exactly as written (no client-side normalisation)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}Connection: close\r\n\r\n".encode(
                "latin-1"
            )
        )
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, data


TRAVERSALS = [
    "/artifacts/../secret.txt",
    "/artifacts/..%2F..%2Fsecret.txt",
    "/artifacts/%2e%2e/%2e%2e/jobs.db",
    "/artifacts/%2E%2E%2F%2E%2E%2Fjobs.db",
    "/artifacts/%252e%252e%252fsecret.txt",
    "/artifacts/2031/05/06/..%2F..%2F..%2F..%2Fsecret.txt",
    "/artifacts/....//....//secret.txt",
    "/artifacts/..%5C..%5Csecret.txt",
    "/artifacts/artifacts.sqlite3",
    "/artifacts/%2Fetc%2Fpasswd",
    "/artifacts//etc/passwd",
    "/artifacts/2031/05/06/" + "a" * 64 + ".png%00.txt",
    "/artifacts/2031/05/06/" + "a" * 64 + ".png%0A",
    "/artifacts/2031/05/06/" + "a" * 64 + ".png/..%2F..%2F..%2F..%2F..%2Fsecret.txt",
    "/artifacts/%EF%BC%8E%EF%BC%8E/secret.txt",  # fullwidth dots
    "/variants/width=8/..%2F..%2Fsecret.txt",
    "/variants/..%2F..%2Fsecret.txt/2031/05/06/" + "a" * 64 + ".png",
    "/variants/width=8/%2e%2e/%2e%2e/%2e%2e/jobs.db",
    "/v1/artifacts/..%2F..%2Fjobs.db:read",
    "/v1/artifacts/%2e%2e/%2e%2e/secret.txt:read",
    "/v1/artifacts/..%2Fsecret.txt",
    "/v1/artifacts/..%2F..%2Fsecret.txt:variant?spec=width%3D8",
]


@pytest.mark.parametrize("open_mode", [False, True])
async def test_encoded_traversal_never_leaves_the_store(tmp_path: Path, open_mode: bool) -> None:
    overrides = {"api_keys": ""} if open_mode else {}
    async with keyed_service(tmp_path, **overrides) as (service, _), channel_to(service) as ch:
        await upscale(ch, None if open_mode else "alice")  # a real artifact next door
        data = service.settings.data_dir
        (data / "secret.txt").write_text("TOP-SECRET-CONTENT")
        (data / "artifacts" / "secret.txt").write_text("TOP-SECRET-CONTENT")
        (tmp_path / "secret.txt").write_text("TOP-SECRET-CONTENT")
        headers = {} if open_mode else auth("alice")
        for path in TRAVERSALS:
            status, raw = await raw_get(service.http_port, path, headers)
            assert status in (400, 404), (path, raw[:300])
            assert b"TOP-SECRET" not in raw and b"SQLite format" not in raw, path
            assert b"root:" not in raw, path
        # And the service still answers.
        res = await raw_get(service.http_port, "/healthz", {})
        assert res[0] == 200


def _png(side: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (side, 40, 90)).save(buf, "PNG")
    return buf.getvalue()


async def test_grpc_names_with_traversal_are_invalid(tmp_path: Path) -> None:
    async with keyed_service(tmp_path) as (service, _), channel_to(service) as ch:
        arts = artifact_service_pb2_grpc.ArtifactServiceStub(ch)
        names = [
            "artifacts/../jobs.db",
            "artifacts/2031/05/06/../../../../secret.txt",
            "artifacts/2031/05/06/" + "a" * 64 + ".png\n",
            "artifacts/2031/05/06/" + "a" * 64 + ".png\x00.txt",
            "/etc/passwd",
            "artifacts/\\..\\secret.txt",
            "artifacts/" + "x" * 10_000,
        ]
        for name in names:
            for call in (
                arts.GetArtifact(apb.GetArtifactRequest(name=name), metadata=bearer("alice")),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                assert caught.value.code() in (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.NOT_FOUND,
                ), name
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                _ = [
                    r
                    async for r in arts.GetVariant(
                        apb.GetVariantRequest(name=name, spec="width=8"), metadata=bearer("alice")
                    )
                ]
            assert caught.value.code() in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.NOT_FOUND,
            )
        for spec in (
            "width=8/../../x",
            "width=8\n",
            "width=8,format=../../png",
            "width=99999999999",
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                _ = [
                    r
                    async for r in arts.GetVariant(
                        apb.GetVariantRequest(
                            name="artifacts/2031/05/06/" + "a" * 64 + ".png", spec=spec
                        ),
                        metadata=bearer("alice"),
                    )
                ]
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, spec


async def _refusal(call: Any) -> tuple[grpc.StatusCode, str]:
    """How a ReadArtifact call failed: its code and ErrorInfo reason."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        while await call.read() is not grpc.aio.EOF:
            pass
    return caught.value.code(), rich_status(caught.value)[1]["ErrorInfo"].reason


async def test_the_shims_in_process_read_artifact_refuses_on_its_own(tmp_path: Path) -> None:
    # The shim asks GetArtifact (over the channel) first, which refuses before ReadArtifact
    # is ever called; here ReadArtifact is called in process directly, as the shim does,
    # and must refuse by itself exactly as over gRPC.
    async with (
        keyed_service(tmp_path, **SIGNED) as (service, _),
        channel_to(service) as ch,
    ):
        got = await upscale(ch, "alice")
        artifact = got.final.outputs[0]
        q = _query(artifact.url)
        assert service.gateway is not None and service.gateway.backend is not None
        backend = service.gateway.backend
        read = backend.callable(
            backend.method("imagetasks.v1.ArtifactService.ReadArtifact"), read_chunk
        )
        assert not isinstance(read, grpc.aio.UnaryStreamMultiCallable)  # in process
        over_grpc = artifact_service_pb2_grpc.ArtifactServiceStub(ch).ReadArtifact
        bad = ("A" if q["signature"][0] != "A" else "B") + q["signature"][1:]
        cases: list[tuple[apb.ReadArtifactRequest, Any, grpc.StatusCode, str]] = [
            (
                apb.ReadArtifactRequest(name=artifact.name),
                bearer("bob"),  # another key's artifact does not exist for it
                grpc.StatusCode.NOT_FOUND,
                "ARTIFACT_NOT_FOUND",
            ),
            (
                apb.ReadArtifactRequest(
                    name=artifact.name, expires=int(q["expires"]), signature=bad
                ),
                (),
                grpc.StatusCode.PERMISSION_DENIED,
                "SIGNATURE_INVALID",
            ),
            (
                apb.ReadArtifactRequest(name=artifact.name),
                (),
                grpc.StatusCode.UNAUTHENTICATED,
                "API_KEY_MISSING",
            ),
        ]
        for request, metadata, code, reason in cases:
            assert await _refusal(read(request, metadata=metadata)) == (code, reason)
            assert await _refusal(over_grpc(request, metadata=metadata)) == (code, reason)
        # The owner's key and a good signature read the bytes, in process too.
        for request, metadata in (
            (apb.ReadArtifactRequest(name=artifact.name), bearer("alice")),
            (
                apb.ReadArtifactRequest(
                    name=artifact.name, expires=int(q["expires"]), signature=q["signature"]
                ),
                (),
            ),
        ):
            call = read(request, metadata=metadata)
            parts = []
            while (msg := await call.read()) is not grpc.aio.EOF:
                parts.append(bytes(msg.data))
            assert b"".join(parts) == got.output_bytes(0)
