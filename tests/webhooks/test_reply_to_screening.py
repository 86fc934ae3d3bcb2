"""ReplyTo URLs that can never be delivered are refused at submission (INVALID_REPLY_TO)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
from imagetasks.v1 import common_pb2, tasks_pb2

from aiserver.webhooks.guard import IPAddress, RefusedTarget, TargetGuard, ip_literal
from tests.support.generation import comfy_service, generate
from tests.support.grpc_helpers import rich_status, violated_fields
from tests.support.images import encode, quadrant_image

REFUSED_HOSTS = [
    # loopback, in every notation a resolver reads
    "127.0.0.1",
    "2130706433",
    "0x7f000001",
    "0x7f.1",
    "127.1",
    "127.0.1",
    "0x7f.0.0.1",
    "017700000001",
    "127.000.000.001",
    "127.0.0.1.",
    "[::1]",
    "[0:0:0:0:0:0:0:1]",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "[2002:7f00:1::]",  # 6to4 of 127.0.0.1
    # private, shared (CGNAT), link-local, metadata
    "10.0.0.1",
    "012.1",
    "172.16.5.4",
    "192.168.1.1",
    "3232235777",  # 192.168.1.1
    "100.64.0.1",
    "100.100.100.200",  # Alibaba Cloud metadata
    "169.254.169.254",  # AWS, GCP, Azure metadata
    "0xa9.0xfe.0xa9.0xfe",
    "[fd00:ec2::254]",  # AWS IPv6 metadata
    "[fe80::1]",
    "[fe80::1%25eth0]",
    "[::ffff:169.254.169.254]",
    "[fc00::1]",
    # multicast, unspecified, broadcast, reserved
    "224.0.0.1",
    "[ff02::1]",
    "0.0.0.0",
    "0",
    "[::]",
    "255.255.255.255",
    "240.0.0.1",
]


@pytest.mark.parametrize("host", REFUSED_HOSTS)
async def test_non_public_literals_are_refused(host: str) -> None:
    guard = TargetGuard()
    # (httpx itself calls a few notations malformed, e.g. leading zeros: refused all the same)
    with pytest.raises(RefusedTarget, match=r"not public|malformed URL"):
        await guard.screen(f"http://{host}:8080/hook?x=1")


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("10.1", "10.0.0.1"),
        ("1.2.65535", "1.2.255.255"),
        ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
        ("fe80::1%eth0", "fe80::1"),
    ],
)
def test_ip_literal_notations(host: str, address: str) -> None:
    assert ip_literal(host) == ipaddress.ip_address(address)


@pytest.mark.parametrize(
    "host", ["example.com", "1.2.3.4.5", "256.1.1.1", "1.256.1.1", "08.1", "0x1g", "1e3", "a.1"]
)
def test_names_are_not_literals(host: str) -> None:
    assert ip_literal(host) is None


@pytest.mark.parametrize("host", ["93.184.216.34", "1558399010", "[2606:4700:4700::1111]"])
async def test_public_literals_pass(host: str) -> None:
    await TargetGuard().screen(f"https://{host}/hook")


async def test_a_name_that_resolves_to_loopback_is_refused() -> None:
    # The real resolver: /etc/hosts maps localhost to loopback.
    with pytest.raises(RefusedTarget, match="not public"):
        await TargetGuard().screen("http://localhost:9/hook")


async def test_a_name_that_does_not_resolve_now_passes() -> None:
    """It may resolve later: the check at send time decides then."""

    async def nx(host: str, port: int) -> Sequence[IPAddress]:
        raise OSError("no such name")

    async def slow(host: str, port: int) -> Sequence[IPAddress]:
        await asyncio.sleep(30)
        raise AssertionError("not reached")

    await TargetGuard(resolver=nx).screen("https://hooks.example/x")
    await TargetGuard(resolver=slow).screen("https://hooks.example/x", resolve_s=0.05)


async def test_operator_settings_are_respected() -> None:
    await TargetGuard(allow_private=True).screen("http://127.0.0.1/hook")
    await TargetGuard(allow_hosts=["10.0.0.0/8"]).screen("http://10.1.2.3/hook")
    await TargetGuard(allow_hosts=["hooks.internal"]).screen("http://hooks.internal/hook")
    with pytest.raises(RefusedTarget):
        await TargetGuard(allow_hosts=["10.0.0.0/8"]).screen("http://0x7f.1/hook")


async def test_submission_refuses_and_names_the_field(tmp_path: Path) -> None:
    png = encode(quadrant_image(16, 16), "PNG")
    async with comfy_service(tmp_path) as (service, _):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as ch:
            for url in ("http://0x7f.1:9/hook", "http://localhost:9/", "http://[::ffff:10.0.0.1]/"):
                params = tasks_pb2.ImageUpscaleParams(
                    options=common_pb2.JobOptions(reply_to=url, mode=common_pb2.RESPONSE_MODE_ASYNC)
                )
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await generate(ch, "ImageUpscale", params, {"image": png})
                _status, details = rich_status(caught.value)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert details["ErrorInfo"].reason == "INVALID_REPLY_TO"
                assert violated_fields(details) == ["params.options.reply_to"]


async def test_submission_accepts_private_targets_when_allowed(tmp_path: Path) -> None:
    png = encode(quadrant_image(16, 16), "PNG")
    async with comfy_service(tmp_path, webhook_allow_private=True) as (service, _):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as ch:
            params = tasks_pb2.ImageUpscaleParams(
                options=common_pb2.JobOptions(
                    reply_to="http://127.0.0.1:9/hook", mode=common_pb2.RESPONSE_MODE_ASYNC
                )
            )
            got = await generate(ch, "ImageUpscale", params, {"image": png})
            assert got.kinds == ["accepted"]
