"""ArtifactService: artifact metadata, bytes in chunks, and cached variants."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from imagetasks.v1 import artifact_service_pb2 as apb
from imagetasks.v1 import artifact_service_pb2_grpc, common_pb2

from aiserver.api.convert import artifact_to_proto, format_from_proto, format_to_proto
from aiserver.api.status import rpc
from aiserver.artifacts import ArtifactStore, Fit, VariantCache, VariantPolicy, build_spec
from aiserver.errors import invalid_argument

__all__ = ["ArtifactServicer"]

_FITS = {
    apb.VARIANT_FIT_UNSPECIFIED: Fit.CONTAIN,
    apb.VARIANT_FIT_CONTAIN: Fit.CONTAIN,
    apb.VARIANT_FIT_COVER: Fit.COVER,
    apb.VARIANT_FIT_FILL: Fit.FILL,
}


class ArtifactServicer(artifact_service_pb2_grpc.ArtifactServiceServicer):
    def __init__(
        self,
        *,
        store: ArtifactStore,
        variants: VariantCache,
        policy: VariantPolicy,
        chunk_bytes: int,
        scope_of: Callable[[Any], str | None] = lambda _ctx: None,
    ) -> None:
        self._store = store
        self._variants = variants
        self._policy = policy
        self._chunk = chunk_bytes
        self._scope_of = scope_of

    @rpc
    async def GetArtifact(
        self, request: apb.GetArtifactRequest, context: Any
    ) -> apb.GetArtifactResponse:
        ref = await self._store.get(request.name, self._scope_of(context))
        return apb.GetArtifactResponse(artifact=artifact_to_proto(ref))

    @rpc
    async def ReadArtifact(
        self, request: apb.ReadArtifactRequest, context: Any
    ) -> AsyncIterator[apb.ReadArtifactResponse]:
        if request.read_offset < 0 or request.read_limit < 0:
            field = "read_offset" if request.read_offset < 0 else "read_limit"
            raise invalid_argument(field, "INVALID_RANGE", f"{field} must not be negative")
        offset = request.read_offset
        async for data in self._store.read(
            request.name,
            self._scope_of(context),
            request.read_offset,
            request.read_limit,
            chunk_size=self._chunk,
        ):
            yield apb.ReadArtifactResponse(data=data, offset=offset)
            offset += len(data)

    @rpc
    async def GetVariant(
        self, request: apb.GetVariantRequest, context: Any
    ) -> AsyncIterator[apb.GetVariantResponse]:
        spec = self._spec(request)
        variant = await self._variants.get(request.name, spec, self._scope_of(context))
        fmt = format_to_proto(spec.format)
        yield apb.GetVariantResponse(
            info=apb.VariantInfo(
                spec=variant.spec,
                etag=variant.etag,
                url=variant.url,
                image=common_pb2.ImageInfo(
                    format=fmt,
                    mime_type=variant.mime_type,
                    width=variant.width,
                    height=variant.height,
                    size_bytes=variant.size,
                    file_name=variant.path.name,
                ),
            )
        )
        with variant.path.open("rb") as fh:
            while data := await asyncio.to_thread(fh.read, self._chunk):
                yield apb.GetVariantResponse(chunk=data)

    def _spec(self, request: apb.GetVariantRequest) -> Any:
        has_fields = bool(
            request.width
            or request.height
            or request.fit
            or request.format
            or request.HasField("quality")
        )
        if (request.spec or request.preset) and has_fields:
            raise invalid_argument(
                "spec", "INVALID_VARIANT_SPEC", "give spec or preset, or the separate fields"
            )
        if request.spec or request.preset:
            return self._policy.resolve(request.spec, preset=request.preset)
        fmt = format_from_proto(request.format, "format")
        spec = build_spec(
            width=request.width,
            height=request.height,
            fit=_FITS.get(request.fit, Fit.CONTAIN),
            format=fmt.name if fmt else "webp",
            quality=request.quality if request.HasField("quality") else None,
            max_side=self._policy.max_side,
        )
        return self._policy.allow(spec)
