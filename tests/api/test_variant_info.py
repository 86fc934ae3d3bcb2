"""GetVariant's first message (info): kept in wire form per variant when URLs are unsigned,
made per call when they are signed; what callers read is the same either way."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import grpc
from imagetasks.v1 import artifact_service_pb2 as apb
from imagetasks.v1 import artifact_service_pb2_grpc, common_pb2
from PIL import Image

from aiserver.api.artifacts import ArtifactServicer
from aiserver.api.wire import Encoded
from aiserver.artifacts import ArtifactStore, Variant, VariantCache, VariantPolicy
from aiserver.artifacts.links import UrlSigner
from aiserver.server import Service
from tests.support.artifacts import put_ref
from tests.support.images import encode


def _variant(url: str = "/variants/width=8/2026/01/02/ab.png") -> Variant:
    return Variant(
        path=Path("/cache/ab/abcd/width=8.webp"),
        mime_type="image/webp",
        width=8,
        height=6,
        size=3,
        etag="e" * 64,
        spec="width=8",
        url=url,
        source="artifacts/2026/01/02/ab.png",
        data=b"abc",
    )


def _servicer(tmp_path: Path, signer: UrlSigner | None) -> ArtifactServicer:
    store = ArtifactStore(tmp_path / "store")
    return ArtifactServicer(
        store=store,
        variants=VariantCache(store, tmp_path / "variants"),
        policy=VariantPolicy(),
        chunk_bytes=1024,
        signer=signer,
    )


def test_a_warm_variants_info_is_encoded_once(tmp_path: Path) -> None:
    servicer = _servicer(tmp_path, None)
    first = servicer._info(_variant(), "webp")
    assert isinstance(first, Encoded)
    assert servicer._info(_variant(), "webp") is first  # equal variant: the same bytes reused
    info = apb.GetVariantResponse.FromString(first.data).info
    assert (info.spec, info.etag, info.url) == ("width=8", "e" * 64, _variant().url)
    assert info.image == common_pb2.ImageInfo(
        format=common_pb2.IMAGE_FORMAT_WEBP,
        mime_type="image/webp",
        width=8,
        height=6,
        size_bytes=3,
        file_name="width=8.webp",
    )
    # The same bytes as a variant of another artifact name: its own URL, its own message.
    other = servicer._info(_variant("/variants/width=8/2026/01/03/ab.png"), "webp")
    assert other is not first
    assert apb.GetVariantResponse.FromString(other.data).info.url.endswith("/03/ab.png")


def test_a_signed_url_is_made_for_each_call(tmp_path: Path) -> None:
    now = [1_000_000.0]
    signer = UrlSigner(["s" * 32], ttl_s=60, clock=lambda: now[0])
    servicer = _servicer(tmp_path, signer)
    first = servicer._info(_variant(), "webp")
    now[0] += 30
    second = servicer._info(_variant(), "webp")
    assert isinstance(first, apb.GetVariantResponse)
    assert isinstance(second, apb.GetVariantResponse)
    assert "expires=" in first.info.url and first.info.url != second.info.url


async def _get(
    stub: artifact_service_pb2_grpc.ArtifactServiceStub, name: str, spec: str
) -> tuple[apb.VariantInfo, bytes]:
    info, data = None, b""
    async for msg in stub.GetVariant(apb.GetVariantRequest(name=name, spec=spec)):
        if msg.WhichOneof("payload") == "info":
            info = msg.info
        else:
            data += msg.chunk
    assert info is not None
    return info, data


async def test_warm_and_cold_infos_read_alike_per_spec(
    service: Service, channel: grpc.aio.Channel
) -> None:
    png = encode(Image.new("RGB", (40, 30), (200, 30, 30)), "PNG")
    ref = await put_ref(service, png, width=40, height=30)
    stub = artifact_service_pb2_grpc.ArtifactServiceStub(channel)
    for spec, canonical, fmt, mime in (
        ("width=8", "width=8,format=webp", common_pb2.IMAGE_FORMAT_WEBP, "image/webp"),
        ("width=8,format=png", "width=8,format=png", common_pb2.IMAGE_FORMAT_PNG, "image/png"),
    ):
        cold, data = await _get(stub, ref.name, spec)
        warm, again = await _get(stub, ref.name, spec)
        assert warm == cold and again == data
        assert warm.spec == canonical and warm.image.format == fmt and warm.image.mime_type == mime
        assert warm.etag == hashlib.sha256(data).hexdigest()
        assert warm.image.size_bytes == len(data)
        assert warm.url == f"/variants/{canonical}/{service.artifacts.relative_path(ref.name)}"
        with Image.open(io.BytesIO(data)) as im:
            assert im.size == (warm.image.width, warm.image.height) == (8, 6)
