"""The README walkthrough, every block run as written against real servers.

``localhost:50051`` becomes the test service's port and ``localhost:8080`` the gateway's;
each block runs in a folder holding ``photo.png`` and a link to ``examples/``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image

from tests.client.cli_run import hooked
from tests.client.support import GenServer, gateway_for
from tests.client.test_node import GOOGLEAPIS, ensure_node_modules
from tests.support.images import encode, quadrant_image

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def walkthrough_blocks() -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block between the walkthrough markers."""
    text = README.read_text()
    start = text.index("<!-- walkthrough:start -->")
    end = text.index("<!-- walkthrough:end -->")
    return re.findall(r"```(sh|python)\n(.*?)```", text[start:end], re.S)


def block(language: str, *needles: str) -> str:
    """The one block of ``language`` that contains every needle."""
    found = [
        code
        for lang, code in walkthrough_blocks()
        if lang == language and all(n in code for n in needles)
    ]
    assert len(found) == 1, f"{len(found)} {language} blocks contain {needles}"
    return found[0]


@pytest.fixture
async def workdir(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    (work / "photo.png").write_bytes(encode(quadrant_image(64, 48), "PNG"))
    (work / "examples").symlink_to(ROOT / "examples")
    return work


@pytest.fixture
async def gateway_port(gen: GenServer) -> AsyncIterator[int]:
    async with gateway_for(gen.service) as port:
        yield port


async def run_block(
    code: str, cwd: Path, grpc_port: int, http_port: int = 0, language: str = "sh"
) -> str:
    code = code.replace("localhost:50051", f"127.0.0.1:{grpc_port}")
    code = code.replace("localhost:8080", f"127.0.0.1:{http_port}")
    if not hooked():
        # Until aiserver.cli registers the client commands, the same parser runs as a module.
        code = re.sub(r"(?m)^aiserver ", "python -m aiserver.cli_client ", code)
    venv_bin = Path(sys.executable).parent
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AISERVER_")},
        "PATH": f"{venv_bin}:{os.environ['PATH']}",
    }
    if language == "python":
        (cwd / "snippet.py").write_text(code)
        argv = [sys.executable, "snippet.py"]
    else:
        argv = ["bash", "-o", "pipefail", "-c", code]
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"the block failed ({proc.returncode}):\n{code}\n{text}"
    return text


def assert_outputs(work: Path) -> None:
    with Image.open(work / "photo-2x.png") as im:
        assert im.size == (128, 96)
    with Image.open(work / "photo.webp") as im:
        assert im.format == "WEBP" and im.size == (64, 48)


def needs(tool: str) -> None:
    # The README's snippets use these; a machine without them must not pass by skipping.
    found = shutil.which(tool) or (Path(sys.executable).parent / tool).exists()
    assert found, f"{tool} is needed to run the README's snippets (apt-get install {tool})"


async def test_grpcurl(gen: GenServer, workdir: Path) -> None:
    needs("jq")
    port = gen.service.grpc_port
    out = await run_block(block("sh", "grpcurl", "ImageUpscale"), workdir, port)
    kinds = out.split()
    assert kinds[0] == "accepted" and kinds[-1] == "finished"
    assert {"output", "output_chunk"} <= set(kinds)
    await run_block(block("sh", "grpcurl", "ConvertImage"), workdir, port)
    assert_outputs(workdir)


async def test_buf_curl(gen: GenServer, workdir: Path) -> None:
    needs("jq")
    needs("buf")
    port = gen.service.grpc_port
    await run_block(block("sh", "buf curl", "ImageUpscale"), workdir, port)
    await run_block(block("sh", "buf curl", "ConvertImage"), workdir, port)
    assert_outputs(workdir)


async def test_curl_through_the_gateway(gen: GenServer, gateway_port: int, workdir: Path) -> None:
    needs("jq")
    needs("curl")
    code = block("sh", "curl -sS", "/api/ImageUpscale")
    out = await run_block(code, workdir, gen.service.grpc_port, gateway_port)
    assert "Completed" in out.split()
    assert json.loads((workdir / "job.json").read_text())["outputs"]
    assert_outputs(workdir)


async def test_aiserver_command(gen: GenServer, workdir: Path) -> None:
    code = block("sh", "aiserver upscale")
    out = await run_block(code, workdir, gen.service.grpc_port)
    assert_outputs(workdir)
    assert not (workdir / "never.png").exists()
    promised = [line[2:] for line in code.splitlines() if line.startswith("# ")]
    assert promised
    for line in promised:
        for fragment in line.split("..."):
            assert fragment.strip() in out, f"README promises {line!r}; the command said:\n{out}"


async def test_python_library(gen: GenServer, workdir: Path) -> None:
    code = block("python", "from aiserver.client import")
    out = await run_block(code, workdir, gen.service.grpc_port, language="python")
    assert_outputs(workdir)
    assert re.search(r"(?m)^(queued|pending|uploading|running|downloading) \d+%$", out), out
    assert "SUCCEEDED 128" in out
    assert "CROP_OUT_OF_BOUNDS ['params.width']" in out


@pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None,
    reason="node and npm are not installed",
)
async def test_node(gen: GenServer, workdir: Path) -> None:
    assert block("sh", "npm ci").strip() == "(cd examples/node && npm ci)"
    await ensure_node_modules()  # that block, unless node_modules is there already
    code = block("sh", "node examples/node/client.js")
    await run_block(code, workdir, gen.service.grpc_port)
    assert_outputs(workdir)
    assert GOOGLEAPIS.is_dir()
