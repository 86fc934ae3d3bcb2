"""The long load test, outside the suite: ``python -m tests.load.run --seconds 60``.

Starts a server process (and a ComfyUI stand-in when ``--upscale-share`` > 0), runs the load,
prints the result and the server's memory, and exits non-zero if any call failed.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from tests.load.driver import run_load
from tests.support.comfy_standin import ComfyStandIn
from tests.support.server_process import ServerProcess


async def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="aiserver-load-") as tmp:
        root = Path(tmp)
        env: dict[str, str] = {}
        comfy = None
        if args.upscale_share > 0:
            comfy = ComfyStandIn(root / "comfy", step_delay_s=0.0)
            await comfy.start()
            env["AISERVER_AGENTS"] = f'[{{"url": "{comfy.url}", "max_concurrent_jobs": 8}}]'
        try:
            async with ServerProcess(root / "data", env) as server:
                before = server.rss_kib()
                result = await run_load(
                    server.target,
                    callers=args.callers,
                    seconds=args.seconds,
                    upscale_share=args.upscale_share,
                )
                after = server.rss_kib()
                print(result.summary())
                print(f"server RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB")
                for line in result.errors[:10]:
                    print("error:", line)
        finally:
            if comfy is not None:
                await comfy.close()
    return 1 if result.errors else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--callers", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--upscale-share", type=float, default=0.0)
    raise SystemExit(asyncio.run(main(parser.parse_args())))
