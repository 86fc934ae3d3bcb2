"""The README's grpcurl session, run as written against a real server."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

from aiserver.server import Service
from tests.support.images import encode, quadrant_image

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_blocks(section: str) -> list[str]:
    """The ```sh blocks of one README section."""
    text = README.read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```sh\n(.*?)```", text[start : end if end > 0 else None], re.S)


async def run_block(block: str, port: int, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    script = block.replace("localhost:50051", f"127.0.0.1:{port}")
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", script, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return out.decode()


async def test_readme_grpcurl_session_works_as_written(service: Service, tmp_path: Path) -> None:
    (tmp_path / "photo.png").write_bytes(encode(quadrant_image(64, 48), "PNG"))
    setup, listing, crop, error = readme_blocks("Try it with grpcurl")
    assert "grpcurl" not in setup and ".venv/bin" in setup  # PATH first, then grpcurl
    listing, crop, error = (setup + block for block in (listing, crop, error))

    out = await run_block(listing, service.grpc_port, tmp_path)
    assert "imagetasks.v1.TransformService" in out
    assert '"status": "SERVING"' in out
    assert "int32 width" in out

    out = await run_block(crop, service.grpc_port, tmp_path)
    messages = [json.loads(m) for m in re.findall(r"^\{.*?^\}", out, re.S | re.M)]
    info = messages[0]["info"]
    assert (info["width"], info["height"], info["format"]) == (16, 16, "IMAGE_FORMAT_PNG")
    data = b"".join(base64.b64decode(m["chunk"]) for m in messages[1:])
    assert len(data) == int(info["size_bytes"])  # grpcurl prints proto field names
    (tmp_path / "out.png").write_bytes(data)
    with Image.open(tmp_path / "out.png") as im:
        assert im.size == (16, 16)

    out = await run_block(error, service.grpc_port, tmp_path)
    expected = [line[2:].strip() for line in error.splitlines() if line.startswith("# ")]
    for line in expected:
        assert line in out, f"README promises {line!r}; grpcurl said:\n{out}"
