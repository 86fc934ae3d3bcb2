"""TransformService: CropImage and ConvertImage, streamed in and out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
from imagetasks.v1 import common_pb2, tasks_pb2, transform_service_pb2, transform_service_pb2_grpc

from aiserver.api.convert import format_from_proto, format_to_proto
from aiserver.api.status import rpc
from aiserver.api.uploads import read_upload
from aiserver.api.wire import Encoded, bytes_message
from aiserver.imaging import EncodedImage, ImageLimits, ImageSource, convert, crop
from aiserver.spool import InputSpool, UploadBudget
from aiserver.workers import BlockingPool

__all__ = ["TransformServicer"]

_R = TypeVar(
    "_R", transform_service_pb2.CropImageResponse, transform_service_pb2.ConvertImageResponse
)


class TransformServicer(transform_service_pb2_grpc.TransformServiceServicer):
    def __init__(
        self,
        *,
        spool: InputSpool,
        pool: BlockingPool,
        limits: ImageLimits,
        max_upload_bytes: int,
        chunk_bytes: int,
    ) -> None:
        self._spool = spool
        self._pool = pool
        self._limits = limits
        self._max_upload = max_upload_bytes
        self._chunk = chunk_bytes

    @rpc
    async def CropImage(  # type: ignore[override]  # chunks in wire form
        self,
        request_iterator: AsyncIterator[transform_service_pb2.CropImageRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[transform_service_pb2.CropImageResponse | Encoded]:
        def work(path: ImageSource, p: tasks_pb2.CropImageParams) -> EncodedImage:
            return crop(
                path,
                x=p.x,
                y=p.y,
                width=p.width,
                height=p.height,
                output_format=format_from_proto(p.output_format, "params.output_format"),
                quality=_quality(p),
                limits=self._limits,
            )

        response = transform_service_pb2.CropImageResponse
        async for msg in self._transform(request_iterator, work, response, "cropped"):
            yield msg

    @rpc
    async def ConvertImage(  # type: ignore[override]  # chunks in wire form
        self,
        request_iterator: AsyncIterator[transform_service_pb2.ConvertImageRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[transform_service_pb2.ConvertImageResponse | Encoded]:
        def work(path: ImageSource, p: tasks_pb2.ConvertImageParams) -> EncodedImage:
            target = format_from_proto(p.output_format, "params.output_format")
            assert target is not None  # the contract requires it (checked on arrival)
            return convert(path, output_format=target, quality=_quality(p), limits=self._limits)

        response = transform_service_pb2.ConvertImageResponse
        async for msg in self._transform(request_iterator, work, response, "converted"):
            yield msg

    async def _transform(
        self,
        requests: AsyncIterator[Any],
        work: Callable[[ImageSource, Any], EncodedImage],
        response: type[_R],
        suffix: str,
    ) -> AsyncIterator[_R | Encoded]:
        """Read the upload, run ``work`` on it in the image pool, stream the result back."""
        upload = await read_upload(
            requests,
            spool=self._spool,
            budget=UploadBudget(self._max_upload),
            inputs=("image",),
            hashed=False,  # deleted after use
        )
        image = upload.files["image"]
        file_name = image.file_name
        source: ImageSource = image.path if image.held is None else image.held  # in memory
        try:
            result = await self._pool.run(work, source, upload.params)
        finally:
            upload.discard()  # the input is not held while a slow caller reads the result
            del source
        for msg in self._reply(response, result, file_name, suffix):
            yield msg

    def _reply(
        self, response: type[_R], result: EncodedImage, file_name: str, suffix: str
    ) -> Iterator[_R | Encoded]:
        """The result as ``info`` then ``chunk`` messages."""
        stem = Path(file_name).stem or "image"
        yield response(
            info=common_pb2.ImageInfo(
                format=format_to_proto(result.format),
                mime_type=result.format.mime_type,
                width=result.width,
                height=result.height,
                size_bytes=len(result.data),
                file_name=f"{stem}-{suffix}{result.format.extension}",
            )
        )
        data = memoryview(result.data)
        for start in range(0, len(data), self._chunk):
            # chunk = 2 in both responses, in wire form: one copy, straight out of the result
            yield bytes_message(2, data[start : start + self._chunk])


def _quality(params: Any) -> int | None:
    return params.quality if params.HasField("quality") else None
