"""WorkflowWatcher: the folders polled, a new catalog swapped in, broken files kept apart."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

from aiserver.providers.comfy.watch import WorkflowWatcher
from aiserver.providers.comfy.workflows import WorkflowCatalog, default_workflows_dir


def _user_copy_of_text_to_image(user: Path, name: str) -> None:
    builtin = default_workflows_dir()
    shutil.copy(builtin / "text_to_image.json", user / "t2i.json")
    binding = json.loads((builtin / "text_to_image.binding.json").read_text(encoding="utf-8"))
    binding.update(name=name, graph="t2i.json")
    (user / "mine.binding.json").write_text(json.dumps(binding, indent=2), encoding="utf-8")


async def test_changes_are_picked_up_and_reported(tmp_path: Path) -> None:
    user = tmp_path / "user"
    user.mkdir()
    catalog = WorkflowCatalog.load(user_dir=user, strict=False)
    seen: list[WorkflowCatalog] = []
    watcher = WorkflowWatcher(catalog, user_dir=user, interval_s=0.05, on_change=seen.append)
    assert not watcher.reload_if_changed()  # nothing changed since it was made
    watcher.start()
    try:
        _user_copy_of_text_to_image(user, "my_t2i")
        async with asyncio.timeout(5):
            while catalog.named("my_t2i") is None:
                await asyncio.sleep(0.02)
        assert seen and seen[-1] is catalog  # the same object, new contents
        before = catalog.named("my_t2i")
        assert before is not None
        # An edit (same size, new mtime) is a change too; a broken one keeps the others.
        path = user / "mine.binding.json"
        path.write_text(path.read_text(encoding="utf-8").replace('"steps": {', '"stepz": {'))
        os.utime(path, ns=(1, 1))
        async with asyncio.timeout(5):
            while catalog.named("my_t2i") is not None and catalog.named("my_t2i") is before:
                await asyncio.sleep(0.02)
        found = catalog.named("my_t2i")
        assert found is not None and found.version != before.version
        assert "stepz" in {p.name for p in found.params}
        path.write_text("{", encoding="utf-8")
        async with asyncio.timeout(5):
            while not catalog.broken:
                await asyncio.sleep(0.02)
        assert catalog.named("my_t2i") is None
        assert catalog.named("text_to_image") is not None
        (broken,) = catalog.broken
        assert broken.name == "mine" and "mine.binding.json:1" in broken.reason
    finally:
        await watcher.close()
