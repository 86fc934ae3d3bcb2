"""Resized/re-encoded copies of stored artifacts, computed once and cached on disk and, when
small, in memory.

Cache layout: ``{cache_root}/{sha[:2]}/{sha}/{canonical spec}.{ext}`` plus a ``.json``
sidecar (size, dimensions, ETag) written after the image. Everything of one source lives in
one folder, which goes when the source is deleted. The files are not fsynced: the cache can
always be rebuilt, and a file read back from disk is checked against its sidecar's ETag (a
torn write after a power loss is rendered again, never served). A variant held in memory is
answered before its files are written (by the same worker, right after): a request waits for
the render only, and a cache that cannot be written costs a warning, not the answer.

Small variants (up to :data:`MEMORY_ITEM_BYTES`) are also kept in a least-recently-used map
bounded by bytes, keyed by source SHA-256 and canonical spec, so a warm request reads no file.
The owner check (an index lookup) still comes first on every request, so a deleted or
someone else's artifact is never served from memory; deletion also drops its entries.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypedDict

from aiserver.artifacts.spec import VariantSpec, parse_spec
from aiserver.artifacts.store import ArtifactStore, artifact_not_found
from aiserver.errors import ErrorKind, ServiceError
from aiserver.imaging import formats, transforms
from aiserver.imaging.limits import DEFAULT_LIMITS, ImageLimits
from aiserver.jobs.model import ArtifactRef
from aiserver.workers import BlockingPool

__all__ = [
    "MEMORY_BYTES",
    "MEMORY_ITEM_BYTES",
    "MemoryLru",
    "Variant",
    "VariantCache",
    "parse_spec",
]

logger = logging.getLogger(__name__)

MEMORY_BYTES = 64 * 1024 * 1024
"""Default bound of the in-memory variants."""
MEMORY_ITEM_BYTES = 1024 * 1024
"""Larger variants are served from their file only."""
_VERIFIED_FILES = 4096
"""Large cache files known to hold their sidecar's bytes, remembered by identity."""
_HASH_BLOCK = 1024 * 1024


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
    data: bytes | None = None
    """The variant's bytes when held in memory; else read them from ``path``."""


class _Meta(TypedDict):
    mime_type: str
    width: int
    height: int
    size: int
    etag: str


_Publish = Callable[[_Meta, bytes], None]
"""Hands a rendered variant to its waiters (called in the render's worker thread)."""


def _identity(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    """Readers see the whole file or none; not durable (see the module docstring)."""
    tmp = path.with_name(f".{uuid.uuid4().hex}.part")
    try:
        with tmp.open("xb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class MemoryLru:
    """Variants in memory, least recently used dropped first past ``max_bytes``.

    Thread-safe: deletion listeners run in worker threads."""

    def __init__(self, max_bytes: int, max_item_bytes: int = MEMORY_ITEM_BYTES) -> None:
        self.max_bytes = max_bytes
        self.max_item_bytes = min(max_item_bytes, max_bytes)
        self.bytes = 0
        self._items: OrderedDict[tuple[str, str], Variant] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, sha256: str, spec: str) -> Variant | None:
        with self._lock:
            found = self._items.get((sha256, spec))
            if found is not None:
                self._items.move_to_end((sha256, spec))
            return found

    def put(self, sha256: str, variant: Variant) -> None:
        data = variant.data
        if data is None or len(data) > self.max_item_bytes:
            return
        key = (sha256, variant.spec)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None and old.data is not None:
                self.bytes -= len(old.data)
            self._items[key] = variant
            self.bytes += len(data)
            while self.bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.bytes -= len(dropped.data or b"")

    def drop_source(self, sha256: str) -> None:
        with self._lock:
            for key in [k for k in self._items if k[0] == sha256]:
                self.bytes -= len(self._items.pop(key).data or b"")


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
        memory_bytes: int = MEMORY_BYTES,
    ) -> None:
        self._store = store
        self.cache_root = cache_root
        self._limits = limits
        self._pool = pool
        self._slots = asyncio.Semaphore(max_concurrency)
        self._url_prefix = url_prefix.rstrip("/")
        # Per variant being made: the render (done once its files are written, or failed)
        # and what its waiters await (set as soon as the bytes are there).
        self._inflight: dict[str, tuple[asyncio.Task[None], asyncio.Future[Variant]]] = {}
        self._verified: dict[Path, tuple[int, int, int]] = {}
        self.computations = 0
        self.memory = MemoryLru(memory_bytes)
        self._prerenders: set[asyncio.Task[None]] = set()
        cache_root.mkdir(parents=True, exist_ok=True)
        store.add_delete_listener(self._drop_source)

    def _folder(self, sha256: str) -> Path:
        return self.cache_root / sha256[:2] / sha256

    def prerender(self, specs: Collection[VariantSpec]) -> None:
        """Render ``specs`` (the presets) of every artifact as it is stored, in the
        background, so that the first request for a preset is already warm."""
        if not specs:
            return
        wanted = tuple(specs)

        def stored(ref: ArtifactRef) -> None:
            task = asyncio.get_running_loop().create_task(self._prerender(ref, wanted))
            self._prerenders.add(task)
            task.add_done_callback(self._prerenders.discard)

        self._store.add_put_listener(stored)

    async def _prerender(self, ref: ArtifactRef, specs: tuple[VariantSpec, ...]) -> None:
        for spec in specs:
            try:
                await self.get(ref.name, spec, None)
            except Exception as exc:  # e.g. deleted meanwhile; a request will say why
                logger.debug("preset %s of %s not rendered: %s", spec.canonical, ref.name, exc)

    def _drop_source(self, name: str, sha256: str) -> None:
        self.memory.drop_source(sha256)
        shutil.rmtree(self._folder(sha256), ignore_errors=True)

    async def get(self, name: str, spec: VariantSpec, owner: str | None) -> Variant:
        """The variant ``spec`` of artifact ``name`` as ``owner`` may see it."""
        ref = await self._store.get(name, owner)  # owner check first: no probing via variants
        warm = self.memory.get(ref.sha256, spec.canonical)
        if warm is not None:
            return self._as_seen(warm, ref)
        output = self._output_format(spec)
        image = self._folder(ref.sha256) / f"{spec.canonical}{output.extension}"
        # No sidecar: never rendered here (or torn), rendered now. A stat of a cached
        # directory entry costs microseconds, less than the thread hop that reads a sidecar.
        if os.path.exists(image.with_suffix(".json")):  # noqa: ASYNC240
            hit = await asyncio.to_thread(self._load, ref, spec, image)
            if hit is not None:
                self.memory.put(ref.sha256, hit)
                return hit
        key = f"{ref.sha256}/{spec.canonical}"
        inflight = self._inflight.get(key)
        if inflight is None:
            ready: asyncio.Future[Variant] = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(self._compute(ref, spec, output, image, ready))
            inflight = self._inflight[key] = (task, ready)
            task.add_done_callback(lambda t: self._settled(key, t, ready))
        # Shielded: one caller giving up does not cancel the others' (or the cache's) work.
        made = await asyncio.shield(inflight[1])
        self.memory.put(ref.sha256, made)
        return self._as_seen(made, ref)

    def _as_seen(self, variant: Variant, ref: ArtifactRef) -> Variant:
        """``variant`` (made for these bytes under any name) as a variant of ``ref``."""
        if variant.source == ref.name:
            return variant
        rel = self._store.relative_path(ref.name)
        url = f"{self._url_prefix}/{variant.spec}/{rel}"
        return replace(variant, source=ref.name, url=url)

    def _settled(self, key: str, task: asyncio.Task[None], ready: asyncio.Future[Variant]) -> None:
        found = self._inflight.get(key)
        if found is not None and found[0] is task:
            del self._inflight[key]
        failure = None if task.cancelled() else task.exception()  # retrieved: logged once
        if not ready.done():  # failed (or cancelled) before its bytes were handed over
            if failure is None:
                ready.cancel()
            else:
                ready.set_exception(failure)
        if not ready.cancelled():
            ready.exception()  # the waiters raise it; nobody left waiting is no error

    def _publish(
        self,
        ready: asyncio.Future[Variant],
        ref: ArtifactRef,
        spec: VariantSpec,
        image: Path,
        meta: _Meta,
        data: bytes,
    ) -> None:
        if not ready.done():
            ready.set_result(self._variant(ref, spec, image, meta, data))

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

    def _variant(
        self,
        ref: ArtifactRef,
        spec: VariantSpec,
        image: Path,
        meta: _Meta,
        data: bytes | None = None,
    ) -> Variant:
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
            data=data if data is not None and len(data) <= self.memory.max_item_bytes else None,
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
            identity = _identity(image)
            if identity[1] != meta["size"]:
                return None  # sidecar of another render: make it again
            if meta["size"] > self.memory.max_item_bytes:
                # Served from the file on every request: hashed once per process (a torn
                # file is the leftover of a power loss, so of an earlier process).
                if self._verified.get(image) != identity:
                    if _file_sha256(image) != meta["etag"]:
                        return None
                    self._remember(image, identity)
                return self._variant(ref, spec, image, meta)
            data = image.read_bytes()
            if hashlib.sha256(data).hexdigest() != meta["etag"]:
                return None  # torn by a crash (files are not fsynced): make it again
            return self._variant(ref, spec, image, meta, data)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _remember(self, image: Path, identity: tuple[int, int, int]) -> None:
        if len(self._verified) >= _VERIFIED_FILES:
            self._verified.clear()  # bounded; a file is hashed again on its next hit
        self._verified[image] = identity

    async def _compute(
        self,
        ref: ArtifactRef,
        spec: VariantSpec,
        output: formats.OutputFormat,
        image: Path,
        ready: asyncio.Future[Variant],
    ) -> None:
        async with self._slots:
            # A request that missed the cache just before the last render finished lands here:
            # memory has that render, without a thread hop to the disk. (A variant too large
            # for memory is rendered again in that race: the same bytes, only work lost.)
            hit = self.memory.get(ref.sha256, spec.canonical)
            if hit is not None:
                ready.set_result(hit)
                return
            self.computations += 1
            loop = asyncio.get_running_loop()

            def publish(meta: _Meta, data: bytes) -> None:
                loop.call_soon_threadsafe(self._publish, ready, ref, spec, image, meta, data)

            try:
                async with self._store.source_file(ref.name) as source:
                    if self._pool is not None:
                        await self._pool.run(self._render, source, spec, output, image, publish)
                    else:
                        await asyncio.to_thread(self._render, source, spec, output, image, publish)
            except ServiceError as exc:
                if exc.kind is ErrorKind.NOT_FOUND:  # deleted by retention meanwhile
                    raise artifact_not_found(ref.name) from exc
                raise
        logger.debug("variant %s of %s rendered", spec.canonical, ref.name)

    def _render(
        self,
        source: Path,
        spec: VariantSpec,
        output: formats.OutputFormat,
        image: Path,
        publish: _Publish,
    ) -> None:
        """Render, hand the bytes over, write the cache files. A variant held in memory is
        handed over before its files are written (its waiters are answered from memory); a
        larger one after, since it is streamed from its file."""
        encoded = transforms.resize(
            source,
            width=spec.width,
            height=spec.height,
            fit=spec.fit.value,
            output_format=output,
            quality=spec.quality if output.lossy else None,
            limits=self._limits,
            image_field="name",
            fast_encode=True,  # a copy for display, rendered while its caller waits
        )
        data = encoded.data
        meta = _Meta(
            mime_type=output.mime_type,
            width=encoded.width,
            height=encoded.height,
            size=len(data),
            etag=hashlib.sha256(data).hexdigest(),
        )
        if not source.exists():  # retention deleted it while we rendered
            raise _source_deleted()
        held = len(data) <= self.memory.max_item_bytes
        if held:
            publish(meta, data)
        try:
            image.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(image, data)
            _write_atomic(image.with_suffix(".json"), json.dumps(meta).encode())
            if not held:
                self._remember(image, _identity(image))
        except OSError as exc:
            if not source.exists():  # its folder went with it
                raise _source_deleted() from exc
            if not held:
                raise
            logger.warning("variant %s not cached on disk: %s", image, exc)
            return
        if not source.exists():
            # Retention deleted the source (and this folder) while we wrote: no orphans.
            image.unlink(missing_ok=True)
            image.with_suffix(".json").unlink(missing_ok=True)
            raise _source_deleted()
        if not held:
            publish(meta, data)

    async def flush(self) -> None:
        """Wait until the renders in progress have written (or given up on) their files."""
        await asyncio.gather(*(task for task, _ in self._inflight.values()), return_exceptions=True)

    async def close(self) -> None:
        """Wait for renders in progress (threads cannot be interrupted)."""
        for task in list(self._prerenders):
            task.cancel()
        await asyncio.gather(*self._prerenders, return_exceptions=True)
        await self.flush()


def _source_deleted() -> ServiceError:
    return ServiceError(ErrorKind.NOT_FOUND, "ARTIFACT_NOT_FOUND", "source deleted")
