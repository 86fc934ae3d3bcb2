"""The in-suite load test: 200 concurrent streaming callers for a few seconds against a server
process, with zero errors. The long version: ``python -m tests.load.run --seconds 60`` (or
this test with ``AISERVER_LOAD_SECONDS=60``)."""

from __future__ import annotations

import os
from pathlib import Path

from tests.load.driver import run_load
from tests.support.comfy_standin import ComfyStandIn
from tests.support.server_process import ServerProcess

SECONDS = float(os.environ.get("AISERVER_LOAD_SECONDS", "3"))


async def test_200_streaming_callers_without_errors(tmp_path: Path) -> None:
    async with (
        ComfyStandIn(tmp_path / "comfy", step_delay_s=0.0) as comfy,
        ServerProcess(
            tmp_path / "data",
            {"AISERVER_AGENTS": f'[{{"url": "{comfy.url}", "max_concurrent_jobs": 4}}]'},
        ) as server,
    ):
        before = server.rss_kib()
        result = await run_load(server.target, callers=200, seconds=SECONDS, upscale_share=0.05)
        after = server.rss_kib()
        print(f"\n{result.summary()}; server RSS {before / 1024:.0f} -> {after / 1024:.0f} MiB")
        assert not result.errors, result.errors[:5]
        assert result.calls >= 200
        assert result.by_kind.get("upscale", 0) > 0
        assert await server.stop() == 0
