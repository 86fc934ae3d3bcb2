"""The Node.js example client (examples/node) against a real server."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import google.api
import pytest
from PIL import Image

from tests.client.support import GenServer
from tests.support.images import encode, quadrant_image

NODE_DIR = Path(__file__).resolve().parents[2] / "examples" / "node"
# The folder holding google/api/annotations.proto and google/rpc/status.proto: the installed
# googleapis-common-protos package (nothing is vendored).
GOOGLEAPIS = Path(google.api.__path__[0]).parent.parent

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None,
    reason="node and npm are not installed",
)


async def run(*args: str, cwd: Path, limit_s: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *args,
        cwd=cwd,
        env={**os.environ, "GOOGLEAPIS_PROTOS": str(GOOGLEAPIS)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), limit_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def ensure_node_modules() -> None:
    if (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        return
    code, out, err = await run(
        "npm", "ci", "--no-audit", "--no-fund", "--loglevel=error", cwd=NODE_DIR, limit_s=300
    )
    assert code == 0, f"npm ci failed:\n{out}\n{err}"


async def test_node_client_upscales_converts_and_reports_errors(
    gen: GenServer, tmp_path: Path
) -> None:
    await ensure_node_modules()
    (tmp_path / "photo.png").write_bytes(encode(quadrant_image(64, 48), "PNG"))
    client = str(NODE_DIR / "client.js")
    server = ["--server", gen.target]

    code, out, err = await run(
        "node", client, "upscale", "photo.png", "big.png", *server, cwd=tmp_path
    )
    assert code == 0, err
    assert out.strip() == "big.png"
    assert err.startswith("accepted jobs/") and "finished: SUCCEEDED" in err
    with Image.open(tmp_path / "big.png") as im:
        assert im.size == (128, 96)

    code, out, err = await run(
        "node",
        client,
        "convert",
        "photo.png",
        "photo.webp",
        "--format",
        "webp",
        *server,
        cwd=tmp_path,
    )
    assert code == 0, err
    assert out.startswith("photo.webp: 64x48 image/webp")
    with Image.open(tmp_path / "photo.webp") as im:
        assert im.format == "WEBP"

    (tmp_path / "empty.png").write_bytes(b"")
    code, out, err = await run(
        "node",
        client,
        "convert",
        "empty.png",
        "x.webp",
        "--format",
        "webp",
        *server,
        cwd=tmp_path,
    )
    assert code == 3, err
    assert err.startswith("error: INVALID_ARGUMENT: ") and "[EMPTY_IMAGE]" in err
    assert not (tmp_path / "x.webp").exists() and not (tmp_path / "x.webp.part").exists()

    code, _, err = await run("node", client, "convert", "photo.png", "x.webp", cwd=tmp_path)
    assert code == 2 and "--format" in err
