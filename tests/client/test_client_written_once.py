"""The blocking client is generated from the asyncio one, and keeps to it; its calls never
wait forever."""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from imagetasks.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc

from aiserver.client import CHUNK_SIZE, AsyncClient, Client, ClientError
from aiserver.server import Service
from tests.support.images import encode, quadrant_image

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "tools" / "gen_sync_client.py"
SYNC = ROOT / "src" / "aiserver" / "client" / "_sync.py"
PNG = encode(quadrant_image(64, 48), "PNG")


def run_generator(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, GENERATOR, *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=60,
    )


# ---- drift ------------------------------------------------------------------------------------


def test_the_committed_sync_client_is_what_the_generator_makes() -> None:
    result = run_generator("--check")
    assert result.returncode == 0, result.stderr


def test_the_check_fails_on_a_hand_edited_copy(tmp_path: Path) -> None:
    edited = tmp_path / "_sync.py"
    edited.write_text(SYNC.read_text().replace("timeout: float | None = None", "timeout=9", 1))
    result = run_generator("--check", "--target", edited)
    assert result.returncode == 1
    assert "make client-sync" in result.stderr and "timeout=9" in result.stderr


def test_the_check_fails_when_the_async_source_changed(tmp_path: Path) -> None:
    source = tmp_path / "_async.py"
    text = (ROOT / "src" / "aiserver" / "client" / "_async.py").read_text()
    source.write_text(text.replace("async def get_job(", "async def fetch_job(", 1))
    result = run_generator("--check", "--source", source)
    assert result.returncode == 1
    assert "+    def fetch_job(" in result.stderr


def test_the_sync_module_has_no_asyncio_left() -> None:
    code = SYNC.read_text()
    assert code.startswith("# Generated from _async.py")
    code = code.split('"""', 2)[2]  # past the module docstring, which names its source
    for word in ("async ", "await ", "AsyncIterator", "AsyncClient", "grpc.aio", "_io_async"):
        assert word not in code, word


def _public(cls: type[Any]) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(getattr(cls(), name))
        for name in dir(cls)
        if not name.startswith("_") and callable(getattr(cls, name))
    }


def _blocking(annotation: Any) -> Any:
    """An asyncio annotation in its blocking spelling (annotations are strings here)."""
    if not isinstance(annotation, str):
        return annotation
    for old, new in (("AsyncIterator", "Iterator"), ("JobStream", "SyncJobStream")):
        annotation = re.sub(rf"\b{old}\b", new, annotation)
    return annotation


def test_both_clients_have_the_same_methods_and_signatures() -> None:
    aio, blocking = _public(AsyncClient), _public(Client)
    assert set(aio) == set(blocking)
    assert {"upscale", "image_to_image", "crop", "list_jobs", "watch_job", "start"} <= set(aio)
    for name, signature in aio.items():
        expected = [
            (p.name, p.kind, p.default, _blocking(p.annotation))
            for p in signature.parameters.values()
        ]
        got = [
            (p.name, p.kind, p.default, p.annotation) for p in blocking[name].parameters.values()
        ]
        assert got == expected, name
        assert _blocking(signature.return_annotation) == blocking[name].return_annotation, name


def test_a_method_is_its_request_dataclass() -> None:
    from aiserver.client import ImageWithMask

    method = Client().image_with_mask
    signature = inspect.signature(method)
    assert signature.parameters == inspect.signature(ImageWithMask).parameters
    assert signature.return_annotation == "SyncJobStream"
    assert inspect.signature(Client.image_with_mask).parameters.keys() == {
        "self",
        *signature.parameters,
    }
    assert method.__doc__ == ImageWithMask.__doc__
    assert method.__name__ == "image_with_mask"
    with pytest.raises(TypeError):
        Client().upscale(b"png", "positional model")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="mask_channel"):
        Client().image_with_mask(b"a", b"b", prompt="x", mask_channel="purple")


# ---- deadlines ----------------------------------------------------------------------------


class _Jobs(job_service_pb2_grpc.JobServiceServicer):
    """GetJob reports the deadline it was given; WatchJob and CancelJob never answer."""

    async def GetJob(self, request: Any, context: Any) -> Any:
        remaining = context.time_remaining()
        owner = "none" if remaining is None else f"{remaining:.1f}"
        return job_service_pb2.GetJobResponse(job=job_pb2.Job(name=request.name, owner=owner))

    async def CancelJob(self, request: Any, context: Any) -> Any:
        await asyncio.Event().wait()

    async def WatchJob(self, request: Any, context: Any) -> Any:
        await asyncio.Event().wait()
        yield job_service_pb2.WatchJobResponse()


@pytest.fixture
async def target() -> AsyncIterator[str]:
    server = grpc.aio.server()
    job_service_pb2_grpc.add_JobServiceServicer_to_server(_Jobs(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def _timed(call: Any) -> tuple[float, Any]:
    started = time.monotonic()
    try:
        outcome = call()
    except ClientError as err:
        outcome = err
    return time.monotonic() - started, outcome


async def test_a_blocking_call_to_a_server_that_never_answers_ends_at_its_deadline(
    target: str,
) -> None:
    def use() -> list[tuple[float, Any]]:
        with Client(target, timeout=0.5) as c:
            return [
                _timed(lambda: c.cancel_job("x")),  # the client's deadline
                _timed(lambda: list(c.watch_job("x", timeout=0.3))),  # the call's own
            ]

    for took, outcome in await asyncio.to_thread(use):
        assert isinstance(outcome, ClientError)
        assert outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 0.2 < took < 5


async def test_a_blocking_call_to_an_address_that_never_answers_ends_at_its_deadline() -> None:
    # A TCP listener that accepts and never speaks: the channel never becomes ready.
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:

        def use() -> tuple[float, Any]:
            with Client(f"127.0.0.1:{port}") as c:
                return _timed(lambda: c.get_job("x", timeout=0.5))

        took, outcome = await asyncio.to_thread(use)
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
    assert isinstance(outcome, ClientError)
    assert outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert took < 5


async def test_every_blocking_call_has_a_deadline_the_asyncio_one_only_when_asked(
    target: str,
) -> None:
    def deadlines() -> list[str]:
        with Client(target) as c, Client(target, timeout=None) as unset:
            return [
                c.get_job("x").owner,
                unset.get_job("x").owner,
                c.get_job("x", timeout=20).owner,
            ]

    # The deadline as the server sees it; grpc rounds it up on the wire.
    default, unset, own = await asyncio.to_thread(deadlines)
    assert 295 < float(default) <= 301.5 and 295 < float(unset) <= 301.5
    assert 15 < float(own) <= 21.5
    async with AsyncClient(target) as c:
        assert (await c.get_job("x")).owner == "none"
        assert 15 < float((await c.get_job("x", timeout=20)).owner) <= 21.5


def test_type_checkers_see_each_calls_parameters(tmp_path: Path) -> None:
    snippet = tmp_path / "use_client.py"
    snippet.write_text(
        "from aiserver.client import AsyncClient, Client\n"
        "async def use(a: AsyncClient, c: Client) -> None:\n"
        "    reveal_type(c.upscale)\n"
        "    reveal_type(a.crop)\n"
        "    c.upscale('photo.png', modle='x')\n"
        "    await a.crop('photo.png', x=0, y=0, width=1)\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", str(snippet)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=300,
    )
    out = result.stdout
    assert "-> aiserver.client._sync.SyncJobStream" in out and "model: str =" in out, out
    assert "-> typing.Coroutine[Any, Any, aiserver.client.types.ImageResult]" in out, out
    assert 'Unexpected keyword argument "modle"' in out, out
    assert 'Missing named argument "height"' in out, out


async def test_a_channel_handed_in_is_used_and_left_open(target: str) -> None:
    channel = grpc.aio.insecure_channel(target)
    try:
        async with AsyncClient("127.0.0.1:1", channel=channel) as c:
            assert (await c.get_job("x")).name == "jobs/x"
        stub = job_service_pb2_grpc.JobServiceStub(channel)
        again = await stub.GetJob(job_service_pb2.GetJobRequest(name="jobs/y"), timeout=5)
        assert again.job.name == "jobs/y"
    finally:
        await channel.close()

    def blocking() -> str:
        with grpc.insecure_channel(target) as own:
            with Client("127.0.0.1:1", channel=own) as c:
                c.get_job("x")
            stub = job_service_pb2_grpc.JobServiceStub(own)
            return str(
                stub.GetJob(job_service_pb2.GetJobRequest(name="jobs/z"), timeout=5).job.name
            )

    assert await asyncio.to_thread(blocking) == "jobs/z"


# ---- the blocking client reports what the server said, as the asyncio one does --------------


@pytest.mark.parametrize("settings_overrides", [{"max_upload_bytes": 100_000}])
async def test_blocking_calls_report_the_servers_status(service: Service, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * CHUNK_SIZE))  # refused while megabytes are still unsent
    out = tmp_path / "never.png"

    def use() -> list[ClientError | BaseException]:
        outcomes: list[ClientError | BaseException] = []
        with Client(f"127.0.0.1:{service.grpc_port}", timeout=30) as c:
            for call in (
                lambda: c.convert(big, format="png"),
                lambda: c.upscale(big).run(),
                lambda: c.crop(PNG, x=0, y=0, width=1000, height=10, out=out),
                lambda: c.convert(tmp_path / "missing.png", format="png"),
            ):
                try:
                    call()
                except BaseException as exc:
                    outcomes.append(exc)
        return outcomes

    too_big, too_big_job, out_of_bounds, missing = await asyncio.to_thread(use)
    for err in (too_big, too_big_job):
        assert isinstance(err, ClientError), repr(err)
        assert (err.code_name, err.reason) == ("RESOURCE_EXHAUSTED", "UPLOAD_TOO_LARGE")
    assert isinstance(out_of_bounds, ClientError)
    assert out_of_bounds.reason == "CROP_OUT_OF_BOUNDS"
    assert [v.field for v in out_of_bounds.field_violations] == ["params.width"]
    assert not out.exists() and not (tmp_path / "never.png.part").exists()
    assert isinstance(missing, FileNotFoundError)
