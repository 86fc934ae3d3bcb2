"""Resized/re-encoded copies of stored artifacts, computed once and cached on disk.

Cache layout: ``{cache_root}/{sha[:2]}/{sha}/{canonical spec}.{ext}`` plus a ``.json``
sidecar (size, dimensions, ETag) written after the image, so a hit costs no decoding and no
hashing. Everything of one source lives in one folder, which goes when the source is deleted.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

from aiserver.artifacts.spec import VariantSpec, parse_spec
from aiserver.artifacts.store import ArtifactStore, artifact_not_found
from aiserver.errors import ErrorKind, ServiceError
from aiserver.imaging import formats, transforms
from aiserver.imaging.limits import DEFAULT_LIMITS, ImageLimits
from aiserver.jobs.model import ArtifactRef
from aiserver.workers import BlockingPool

__all__ = ["Variant", "VariantCache", "parse_spec"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Variant:
    """A cached variant, ready to stream from ``path``."""

    path: Path
    mime_type: str
    width: int
    height: int
    size: int
    etag: str
    """SHA-256 of the variant's bytes (hex): a strong ETag."""
    spec: str
    """Canonical spec."""
    url: str
    """``{url_prefix}/{spec}/{yyyy}/{mm}/{dd}/{sha}.{ext}`` (the source's path)."""
    source: str
    """The source artifact's name."""


class _Meta(TypedDict):
    mime_type: str
    width: int
    height: int
    size: int
    etag: str


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{uuid.uuid4().hex}.part")
    try:
        with tmp.open("xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class VariantCache:
    """Makes variants of ``store``'s artifacts; see the module docstring.

    Concurrent requests for the same variant share one computation; image work runs in
    ``pool`` if given, else in threads, at most ``max_concurrency`` at a time.
    :attr:`computations` counts the images actually rendered.
    """

    def __init__(
        self,
        store: ArtifactStore,
        cache_root: Path,
        limits: ImageLimits = DEFAULT_LIMITS,
        *,
        max_concurrency: int = 2,
        pool: BlockingPool | None = None,
        url_prefix: str = "/variants",
    ) -> None:
        self._store = store
        self.cache_root = cache_root
        self._limits = limits
        self._pool = pool
        self._slots = asyncio.Semaphore(max_concurrency)
        self._url_prefix = url_prefix.rstrip("/")
        self._inflight: dict[str, asyncio.Task[Variant]] = {}
        self.computations = 0
        cache_root.mkdir(parents=True, exist_ok=True)
        store.add_delete_listener(self._drop_source)

    def _folder(self, sha256: str) -> Path:
        return self.cache_root / sha256[:2] / sha256

    def _drop_source(self, name: str, sha256: str) -> None:
        shutil.rmtree(self._folder(sha256), ignore_errors=True)

    async def get(self, name: str, spec: VariantSpec, owner: str | None) -> Variant:
        """The variant ``spec`` of artifact ``name`` as ``owner`` may see it."""
        ref = await self._store.get(name, owner)  # owner check first: no probing via variants
        output = self._output_format(spec)
        image = self._folder(ref.sha256) / f"{spec.canonical}{output.extension}"
        hit = await asyncio.to_thread(self._load, ref, spec, image)
        if hit is not None:
            return hit
        key = f"{ref.sha256}/{spec.canonical}"
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._compute(ref, spec, output, image))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._settled(key, t))
        # Shielded: one caller giving up does not cancel the others' (or the cache's) work.
        return await asyncio.shield(task)

    def _settled(self, key: str, task: asyncio.Task[Variant]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved here, so an unawaited failure is not logged twice

    def _output_format(self, spec: VariantSpec) -> formats.OutputFormat:
        if spec.format not in {f.name for f in formats.available_formats()}:
            raise ServiceError(
                ErrorKind.FAILED_PRECONDITION,
                "FORMAT_UNAVAILABLE",
                f"this server cannot write {spec.format} images",
                metadata={"format": spec.format},
            )
        return formats.parse_format(spec.format, "spec")

    def url_for(self, name: str, spec: VariantSpec) -> str:
        """The URL path of variant ``spec`` of ``name`` (INVALID_ARGUMENT for a bad name)."""
        return f"{self._url_prefix}/{spec.canonical}/{self._store.relative_path(name)}"

    def _variant(self, ref: ArtifactRef, spec: VariantSpec, image: Path, meta: _Meta) -> Variant:
        rel = self._store.relative_path(ref.name)
        return Variant(
            path=image,
            mime_type=meta["mime_type"],
            width=meta["width"],
            height=meta["height"],
            size=meta["size"],
            etag=meta["etag"],
            spec=spec.canonical,
            url=f"{self._url_prefix}/{spec.canonical}/{rel}",
            source=ref.name,
        )

    def _load(self, ref: ArtifactRef, spec: VariantSpec, image: Path) -> Variant | None:
        try:
            raw = json.loads(image.with_suffix(".json").read_bytes())
            meta = _Meta(
                mime_type=str(raw["mime_type"]),
                width=int(raw["width"]),
                height=int(raw["height"]),
                size=int(raw["size"]),
                etag=str(raw["etag"]),
            )
            if image.stat().st_size != meta["size"]:
                return None  # sidecar of another render: make it again
            return self._variant(ref, spec, image, meta)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    async def _compute(
        self, ref: ArtifactRef, spec: VariantSpec, output: formats.OutputFormat, image: Path
    ) -> Variant:
        async with self._slots:
            # A request that missed the cache just before the last render finished lands here.
            hit = await asyncio.to_thread(self._load, ref, spec, image)
            if hit is not None:
                return hit
            self.computations += 1
            try:
                async with self._store.source_file(ref.name) as source:
                    if self._pool is not None:
                        meta = await self._pool.run(self._render, source, spec, output, image)
                    else:
                        meta = await asyncio.to_thread(self._render, source, spec, output, image)
            except ServiceError as exc:
                if exc.kind is ErrorKind.NOT_FOUND:  # deleted by retention meanwhile
                    raise artifact_not_found(ref.name) from exc
                raise
        logger.debug("variant %s of %s rendered", spec.canonical, ref.name)
        return self._variant(ref, spec, image, meta)

    def _render(
        self, source: Path, spec: VariantSpec, output: formats.OutputFormat, image: Path
    ) -> _Meta:
        encoded = transforms.resize(
            source,
            width=spec.width,
            height=spec.height,
            fit=spec.fit.value,
            output_format=output,
            quality=spec.quality if output.lossy else None,
            limits=self._limits,
            image_field="name",
        )
        meta = _Meta(
            mime_type=output.mime_type,
            width=encoded.width,
            height=encoded.height,
            size=len(encoded.data),
            etag=hashlib.sha256(encoded.data).hexdigest(),
        )
        image.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(image, encoded.data)
        _write_atomic(image.with_suffix(".json"), json.dumps(meta).encode())
        if not source.exists():
            # Retention deleted the source (and this folder) while we rendered: no orphans.
            image.unlink(missing_ok=True)
            image.with_suffix(".json").unlink(missing_ok=True)
            raise ServiceError(ErrorKind.NOT_FOUND, "ARTIFACT_NOT_FOUND", "source deleted")
        return meta

    async def close(self) -> None:
        """Wait for renders in progress (threads cannot be interrupted)."""
        await asyncio.gather(*self._inflight.values(), return_exceptions=True)
