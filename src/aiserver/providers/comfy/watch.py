"""Reloading workflows without a restart: the folders are polled, changes swapped in.

Polling (every ``interval_s``, default 2 s) rather than inotify: it works on every file system,
including network mounts and container volumes, and costs one ``stat`` per file. A reload
builds a new catalog off the event loop and swaps it in whole; broken files are logged and
listed, never taking down the ones that load. Jobs already accepted carry their own graph and
binding, so a reload never changes what a running job runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from aiserver.providers.comfy.workflows import WorkflowCatalog, default_workflows_dir

__all__ = ["WorkflowWatcher"]

logger = logging.getLogger(__name__)

_Fingerprint = tuple[tuple[str, int, int], ...]


class WorkflowWatcher:
    """Keeps ``catalog`` in step with the built-in and user workflow folders."""

    def __init__(
        self,
        catalog: WorkflowCatalog,
        *,
        builtin_dir: Path | None = None,
        user_dir: Path | None = None,
        interval_s: float = 2.0,
        on_change: Callable[[WorkflowCatalog], None] | None = None,
    ) -> None:
        self._catalog = catalog
        self._builtin = builtin_dir if builtin_dir is not None else default_workflows_dir()
        self._user = user_dir
        self._interval = interval_s
        self._on_change = on_change
        self._seen = self._fingerprint()
        self._task: asyncio.Task[None] | None = None

    def _fingerprint(self) -> _Fingerprint:
        found = []
        for folder in (self._user, self._builtin):
            if folder is None or not folder.is_dir():
                continue
            for path in folder.glob("*.json"):
                with contextlib.suppress(OSError):
                    st = path.stat()
                    found.append((str(path), st.st_mtime_ns, st.st_size))
        return tuple(sorted(found))

    def reload_if_changed(self) -> bool:
        """Reload when a file was added, removed or changed since the last look."""
        fresh = self._load_if_changed()
        if fresh is None:
            return False
        self._apply(fresh)
        return True

    def _load_if_changed(self) -> WorkflowCatalog | None:
        # Runs off the event loop: reading and checking files is blocking work.
        seen = self._fingerprint()
        if seen == self._seen:
            return None
        self._seen = seen
        return WorkflowCatalog.load(self._builtin, self._user, strict=False)

    def _apply(self, fresh: WorkflowCatalog) -> None:
        self._catalog.replace(fresh)
        logger.info(
            "workflows reloaded: %s; broken: %s",
            ", ".join(w.name for w in fresh.workflows()) or "none",
            ", ".join(b.name for b in fresh.broken) or "none",
        )
        if self._on_change is not None:
            self._on_change(self._catalog)

    def start(self) -> None:
        if self._interval > 0 and self._task is None:
            self._task = asyncio.create_task(self._loop(), name="workflow-watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                fresh = await asyncio.to_thread(self._load_if_changed)
                if fresh is not None:
                    self._apply(fresh)
            except Exception:
                logger.exception("reloading workflows failed; keeping the loaded ones")
