"""ArtifactService: artifact metadata, bytes in chunks, and cached variants."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from imagetasks.v1 import artifact_service_pb2 as apb
from imagetasks.v1 import artifact_service_pb2_grpc, common_pb2

from aiserver.api.calls import current_principal, scope
from aiserver.api.convert import artifact_to_proto, format_from_proto, format_to_proto
from aiserver.api.status import rpc
from aiserver.api.wire import Encoded, bytes_frame, bytes_message
from aiserver.artifacts import (
    ArtifactStore,
    Fit,
    Variant,
    VariantCache,
    VariantPolicy,
    VariantSpec,
    build_spec,
)
from aiserver.artifacts.links import UrlSigner
from aiserver.auth import missing_key
from aiserver.errors import invalid_argument
from aiserver.logs import job_id_var

__all__ = ["ArtifactServicer"]

_CACHED_INFOS = 4096
"""GetVariant info messages kept in wire form (a few hundred bytes each)."""
_CACHED_SPECS = 1024
"""Resolved variant spec strings kept (the policy is fixed for the server's life)."""

_READ_FRAME = bytes_frame(1, 2)
"""ReadArtifactResponse: data = 1, offset = 2 (the chunk's place in the artifact)."""

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
        signer: UrlSigner | None = None,
    ) -> None:
        self._store = store
        self._variants = variants
        self._policy = policy
        self._chunk = chunk_bytes
        self._signer = signer
        self._infos: dict[tuple[str, ...], Encoded] = {}
        self._specs: dict[tuple[str, str], VariantSpec] = {}

    def _link(self, url: str) -> str:
        return self._signer.sign(url) if self._signer is not None else url

    def _check_key(self, request: Any) -> bool:
        """True when the request presents a URL signature to verify (signed mode); else the
        caller must have come with a key (the interceptor lets keyless reads through only
        when URLs are signed)."""
        if self._signer is not None and (request.signature or request.expires):
            return True
        if not current_principal().authenticated:
            raise missing_key()
        return False

    def _scope(self, context: Any, request: Any, paths: Callable[[], Sequence[str]]) -> str | None:
        """The owner to check (None: any): a valid signature opens the resource it signs."""
        if self._check_key(request):
            assert self._signer is not None
            self._signer.verify(paths(), request.expires, request.signature)
            return None
        return scope()

    def _artifact_url(self, name: str) -> str:
        return f"{self._store.url_prefix}/{self._store.relative_path(name)}"

    @rpc
    async def GetArtifact(
        self, request: apb.GetArtifactRequest, context: Any
    ) -> apb.GetArtifactResponse:
        scope = self._scope(context, request, lambda: [self._artifact_url(request.name)])
        ref = await self._store.get(request.name, scope)
        job_id_var.set(ref.job_id)
        return apb.GetArtifactResponse(artifact=artifact_to_proto(ref, self._link))

    @rpc
    async def ReadArtifact(  # type: ignore[override]  # messages in wire form
        self, request: apb.ReadArtifactRequest, context: Any
    ) -> AsyncIterator[Encoded]:
        scope = self._scope(context, request, lambda: [self._artifact_url(request.name)])
        # Each message is read from the blob in wire form: the read is its only copy.
        async for message in self._store.read(
            request.name,
            scope,
            request.read_offset,
            request.read_limit,
            chunk_size=self._chunk,
            frame=_READ_FRAME,
        ):
            yield Encoded(message)

    @rpc
    async def GetVariant(  # type: ignore[override]  # chunks in wire form
        self, request: apb.GetVariantRequest, context: Any
    ) -> AsyncIterator[apb.GetVariantResponse | Encoded]:
        signed = self._check_key(request)  # who is asking, before any parsing
        spec = self._spec(request)
        owner: str | None = None  # a valid signature opens the resource it signs
        if signed:
            assert self._signer is not None
            # The variant's own URL, or its source's: a link to an artifact opens its variants.
            paths = [self._variants.url_for(request.name, spec), self._artifact_url(request.name)]
            self._signer.verify(paths, request.expires, request.signature)
        else:
            owner = scope()
        variant = await self._variants.get(request.name, spec, owner)
        yield self._info(variant, spec.format)
        if variant.data is not None:  # held in memory: no file, no thread
            for start in range(0, len(variant.data), self._chunk):
                yield bytes_message(2, variant.data[start : start + self._chunk])
            return
        with variant.path.open("rb") as fh:
            while data := await asyncio.to_thread(fh.read, self._chunk):
                yield bytes_message(2, data)  # chunk = 2, in wire form

    def _info(self, variant: Variant, fmt: str) -> apb.GetVariantResponse | Encoded:
        """GetVariant's first message. Unsigned, it depends only on the variant as served
        (bytes, spec, URL), so a warm variant's is kept in wire form: building and serializing
        the nested messages cost more than the rest of the handler."""
        if self._signer is not None:  # a signed URL carries its expiry: made per call
            return self._info_message(variant, fmt)
        key = (variant.etag, variant.spec, fmt, variant.url, variant.path.name)
        found = self._infos.get(key)
        if found is None:
            if len(self._infos) >= _CACHED_INFOS:
                self._infos.clear()  # bounded; rebuilt from the warm ones on their next call
            found = Encoded(self._info_message(variant, fmt).SerializeToString())
            self._infos[key] = found
        return found

    def _info_message(self, variant: Variant, fmt: str) -> apb.GetVariantResponse:
        return apb.GetVariantResponse(
            info=apb.VariantInfo(
                spec=variant.spec,
                etag=variant.etag,
                url=self._link(variant.url),
                image=common_pb2.ImageInfo(
                    format=format_to_proto(fmt),
                    mime_type=variant.mime_type,
                    width=variant.width,
                    height=variant.height,
                    size_bytes=variant.size,
                    file_name=variant.path.name,
                ),
            )
        )

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
            key = (request.spec, request.preset)
            found = self._specs.get(key)
            if found is None:  # parsed once per string; errors are not kept (raised each time)
                found = self._policy.resolve(request.spec, preset=request.preset)
                if len(self._specs) >= _CACHED_SPECS:
                    self._specs.clear()
                self._specs[key] = found
            return found
        if request.fit not in _FITS:
            raise invalid_argument("fit", "INVALID_VARIANT_SPEC", f"unknown fit {request.fit}")
        fmt = format_from_proto(request.format, "format")
        spec = build_spec(
            width=request.width,
            height=request.height,
            fit=_FITS[request.fit],
            format=fmt.name if fmt else "webp",
            quality=request.quality if request.HasField("quality") else None,
            max_side=self._policy.max_side,
        )
        return self._policy.allow(spec)
