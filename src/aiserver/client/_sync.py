"""``Client``: the blocking client. It drives an :class:`AsyncClient` on a private event loop
in a daemon thread, so it also works from code that already runs an event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator, Mapping
from typing import Any, TypeVar

from imagetasks.v1 import common_pb2, job_pb2, workflow_service_pb2

from aiserver.client._async import DEFAULT_TARGET, AsyncClient, JobStream
from aiserver.client.inputs import Destination, Input
from aiserver.client.types import Event, ImageResult, JobPage, Result, VariantResult

__all__ = ["Client", "SyncJobStream"]

_T = TypeVar("_T")


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="aiserver-client", daemon=True
        )
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if self.loop.is_closed():
            coro.close()
            raise RuntimeError("the client is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            # KeyboardInterrupt in the caller (or the call's own error): make sure the
            # coroutine is not left running on the loop.
            future.cancel()
            raise

    def iterate(self, iterator: AsyncIterator[_T]) -> Iterator[_T]:
        async def next_item() -> tuple[bool, _T | None]:
            try:
                return True, await iterator.__anext__()
            except StopAsyncIteration:
                return False, None

        try:
            while True:
                more, item = self.call(next_item())
                if not more:
                    return
                yield item  # type: ignore[misc]  # more is True: item is a _T
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                # RuntimeError: already finished, or still unwinding a cancelled step.
                with contextlib.suppress(RuntimeError, concurrent.futures.CancelledError):
                    self.call(aclose())

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


class SyncJobStream:
    """A generative call: iterate it for its events, or ``stream.run()`` for a
    :class:`Result` (see :class:`aiserver.client.JobStream`)."""

    def __init__(self, loop: _LoopThread, stream: JobStream) -> None:
        self._loop = loop
        self._stream = stream

    @property
    def job_name(self) -> str:
        return self._stream.job_name

    def __iter__(self) -> Iterator[Event]:
        return self._loop.iterate(aiter(self._stream))

    def run(self) -> Result:
        return self._loop.call(self._stream.run())


class Client:
    """The blocking client of the imagetasks.v1 service: the same methods as
    :class:`AsyncClient`, returning values instead of awaitables. Use it as a context
    manager, or call :meth:`close`."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        credentials: Any = None,
        timeout: float | None = None,
        metadata: Iterable[tuple[str, str]] = (),
        options: Iterable[tuple[str, Any]] = (),
    ) -> None:
        self._loop = _LoopThread()
        self.aio = AsyncClient(
            target,
            api_key=api_key,
            tls=tls,
            root_certificates=root_certificates,
            credentials=credentials,
            timeout=timeout,
            metadata=metadata,
            options=options,
        )
        """The underlying :class:`AsyncClient` (its calls run on this client's loop)."""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._loop.loop.is_closed():
            self._loop.call(self.aio.close())
            self._loop.close()

    # ---- generative tasks ------------------------------------------------------------------

    def image_to_image(
        self,
        image: Input,
        *,
        prompt: str,
        negative_prompt: str | None = None,
        model: str = "",
        denoise: float | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        steps: int | None = None,
        cfg_scale: float | None = None,
        sampler: str = "",
        scheduler: str = "",
        ref_id: str = "",
        tag: str = "",
        reply_to: str = "",
        wait: bool = True,
        references_only: bool = False,
        timeout: float | None = None,
    ) -> SyncJobStream:
        """A new image from ``image`` and ``prompt`` (ImageToImage)."""
        return SyncJobStream(
            self._loop,
            self.aio.image_to_image(
                image,
                prompt=prompt,
                negative_prompt=negative_prompt,
                model=model,
                denoise=denoise,
                batch_size=batch_size,
                seed=seed,
                steps=steps,
                cfg_scale=cfg_scale,
                sampler=sampler,
                scheduler=scheduler,
                ref_id=ref_id,
                tag=tag,
                reply_to=reply_to,
                wait=wait,
                references_only=references_only,
                timeout=timeout,
            ),
        )

    def image_with_mask(
        self,
        image: Input,
        mask: Input,
        *,
        prompt: str,
        negative_prompt: str | None = None,
        model: str = "",
        denoise: float | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        steps: int | None = None,
        cfg_scale: float | None = None,
        sampler: str = "",
        scheduler: str = "",
        mask_channel: str = "red",
        ref_id: str = "",
        tag: str = "",
        reply_to: str = "",
        wait: bool = True,
        references_only: bool = False,
        timeout: float | None = None,
    ) -> SyncJobStream:
        """Inpainting inside ``mask`` (ImageWithMask)."""
        return SyncJobStream(
            self._loop,
            self.aio.image_with_mask(
                image,
                mask,
                prompt=prompt,
                negative_prompt=negative_prompt,
                model=model,
                denoise=denoise,
                batch_size=batch_size,
                seed=seed,
                steps=steps,
                cfg_scale=cfg_scale,
                sampler=sampler,
                scheduler=scheduler,
                mask_channel=mask_channel,
                ref_id=ref_id,
                tag=tag,
                reply_to=reply_to,
                wait=wait,
                references_only=references_only,
                timeout=timeout,
            ),
        )

    def upscale(
        self,
        image: Input,
        *,
        model: str = "",
        seed: int | None = None,
        ref_id: str = "",
        tag: str = "",
        reply_to: str = "",
        wait: bool = True,
        references_only: bool = False,
        timeout: float | None = None,
    ) -> SyncJobStream:
        """A 2x upscale of ``image`` (ImageUpscale)."""
        return SyncJobStream(
            self._loop,
            self.aio.upscale(
                image,
                model=model,
                seed=seed,
                ref_id=ref_id,
                tag=tag,
                reply_to=reply_to,
                wait=wait,
                references_only=references_only,
                timeout=timeout,
            ),
        )

    def image_to_text(
        self,
        image: Input,
        *,
        model: str = "",
        prompt: str = "",
        ref_id: str = "",
        tag: str = "",
        reply_to: str = "",
        wait: bool = True,
        timeout: float | None = None,
    ) -> SyncJobStream:
        """A caption of ``image`` (ImageToText)."""
        return SyncJobStream(
            self._loop,
            self.aio.image_to_text(
                image,
                model=model,
                prompt=prompt,
                ref_id=ref_id,
                tag=tag,
                reply_to=reply_to,
                wait=wait,
                timeout=timeout,
            ),
        )

    # ---- workflows --------------------------------------------------------------------------

    def workflows(self, *, timeout: float | None = None) -> list[workflow_service_pb2.Workflow]:
        """Every workflow the server has (see :meth:`AsyncClient.workflows`)."""
        return self._loop.call(self.aio.workflows(timeout=timeout))

    def get_workflow(
        self, name: str, *, timeout: float | None = None
    ) -> workflow_service_pb2.Workflow:
        return self._loop.call(self.aio.get_workflow(name, timeout=timeout))

    def run_workflow(
        self,
        name: str,
        params: Mapping[str, Any] | None = None,
        files: Mapping[str, Input] | None = None,
        *,
        output_format: str | int | None = None,
        quality: int | None = None,
        ref_id: str = "",
        tag: str = "",
        reply_to: str = "",
        wait: bool = True,
        references_only: bool = False,
        timeout: float | None = None,
    ) -> SyncJobStream:
        """Run workflow ``name`` (see :meth:`AsyncClient.run_workflow`)."""
        return SyncJobStream(
            self._loop,
            self.aio.run_workflow(
                name,
                params,
                files,
                output_format=output_format,
                quality=quality,
                ref_id=ref_id,
                tag=tag,
                reply_to=reply_to,
                wait=wait,
                references_only=references_only,
                timeout=timeout,
            ),
        )

    # ---- light tasks -----------------------------------------------------------------------

    def crop(
        self,
        image: Input,
        *,
        x: int,
        y: int,
        width: int,
        height: int,
        format: str | int | None = None,
        quality: int | None = None,
        out: Destination | None = None,
        timeout: float | None = None,
    ) -> ImageResult:
        """``image`` cropped to a rectangle (CropImage)."""
        return self._loop.call(
            self.aio.crop(
                image,
                x=x,
                y=y,
                width=width,
                height=height,
                format=format,
                quality=quality,
                out=out,
                timeout=timeout,
            )
        )

    def convert(
        self,
        image: Input,
        *,
        format: str | int,
        quality: int | None = None,
        out: Destination | None = None,
        timeout: float | None = None,
    ) -> ImageResult:
        """``image`` in another format (ConvertImage)."""
        return self._loop.call(
            self.aio.convert(image, format=format, quality=quality, out=out, timeout=timeout)
        )

    # ---- artifacts -------------------------------------------------------------------------

    def variant(
        self,
        artifact: str,
        *,
        spec: str = "",
        width: int = 0,
        height: int = 0,
        fit: str = "",
        format: str | int | None = None,
        quality: int | None = None,
        preset: str = "",
        out: Destination | None = None,
        timeout: float | None = None,
    ) -> VariantResult:
        """A resized / re-encoded copy of an artifact (GetVariant)."""
        return self._loop.call(
            self.aio.variant(
                artifact,
                spec=spec,
                width=width,
                height=height,
                fit=fit,
                format=format,
                quality=quality,
                preset=preset,
                out=out,
                timeout=timeout,
            )
        )

    def get_artifact(self, name: str, *, timeout: float | None = None) -> common_pb2.Artifact:
        return self._loop.call(self.aio.get_artifact(name, timeout=timeout))

    def stream_artifact(
        self, name: str, *, offset: int = 0, limit: int = 0, timeout: float | None = None
    ) -> Iterator[bytes]:
        return self._loop.iterate(
            self.aio.stream_artifact(name, offset=offset, limit=limit, timeout=timeout)
        )

    def read_artifact(
        self, name: str, *, offset: int = 0, limit: int = 0, timeout: float | None = None
    ) -> bytes:
        return self._loop.call(
            self.aio.read_artifact(name, offset=offset, limit=limit, timeout=timeout)
        )

    def save_artifact(self, name: str, out: Destination, *, timeout: float | None = None) -> int:
        return self._loop.call(self.aio.save_artifact(name, out, timeout=timeout))

    # ---- jobs ------------------------------------------------------------------------------

    def get_job(self, name: str, *, timeout: float | None = None) -> job_pb2.Job:
        return self._loop.call(self.aio.get_job(name, timeout=timeout))

    def list_jobs(
        self,
        *,
        states: Iterable[str | int] = (),
        task: str | int | None = None,
        tag: str = "",
        ref_id: str = "",
        page_size: int = 0,
        page_token: str = "",
        all_owners: bool = False,
        timeout: float | None = None,
    ) -> JobPage:
        return self._loop.call(
            self.aio.list_jobs(
                states=states,
                task=task,
                tag=tag,
                ref_id=ref_id,
                page_size=page_size,
                page_token=page_token,
                all_owners=all_owners,
                timeout=timeout,
            )
        )

    def iter_jobs(
        self,
        *,
        states: Iterable[str | int] = (),
        task: str | int | None = None,
        tag: str = "",
        ref_id: str = "",
        page_size: int = 0,
        all_owners: bool = False,
        timeout: float | None = None,
    ) -> Iterator[job_pb2.Job]:
        return self._loop.iterate(
            self.aio.iter_jobs(
                states=states,
                task=task,
                tag=tag,
                ref_id=ref_id,
                page_size=page_size,
                all_owners=all_owners,
                timeout=timeout,
            )
        )

    def watch_job(self, name: str, *, timeout: float | None = None) -> Iterator[Event]:
        return self._loop.iterate(self.aio.watch_job(name, timeout=timeout))

    def cancel_job(self, name: str, *, timeout: float | None = None) -> job_pb2.Job:
        return self._loop.call(self.aio.cancel_job(name, timeout=timeout))
