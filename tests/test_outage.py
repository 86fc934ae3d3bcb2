"""Which failures answer UNAVAILABLE STORE_UNAVAILABLE (a backend away), not INTERNAL."""

from __future__ import annotations

import asyncio
import socket

import asyncpg
import boto3
import pytest
from botocore.config import Config

from aiserver.errors import ErrorKind
from aiserver.outage import backend_outage


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_refused_database_connection_is_an_outage() -> None:
    with pytest.raises(Exception) as refused:
        await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{_closed_port()}/test")
    error = backend_outage(refused.value)
    assert error is not None and error.kind is ErrorKind.UNAVAILABLE
    assert error.reason == "STORE_UNAVAILABLE" and error.retry_after_s


def test_an_unreachable_s3_endpoint_is_an_outage() -> None:
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{_closed_port()}",
        region_name="us-east-1",
        aws_access_key_id="k",
        aws_secret_access_key="s",
        config=Config(retries={"max_attempts": 1}),
    )
    with pytest.raises(Exception) as refused:
        client.head_object(Bucket="b", Key="k")
    assert backend_outage(refused.value) is not None


def test_a_wrapped_outage_is_found_and_bugs_are_not_outages() -> None:
    try:
        try:
            raise ConnectionResetError(104, "Connection reset by peer")
        except ConnectionResetError as reset:
            raise RuntimeError("while storing") from reset
    except RuntimeError as wrapped:
        assert backend_outage(wrapped) is not None
    assert backend_outage(ValueError("bad")) is None
    assert backend_outage(FileNotFoundError(2, "gone")) is None
    assert backend_outage(TimeoutError()) is None


def test_a_bug_while_handling_a_lost_connection_is_not_an_outage() -> None:
    try:
        try:
            raise ConnectionResetError(104, "Connection reset by peer")
        except ConnectionResetError:
            raise KeyError("a bug in the handler") from None
    except KeyError as bug:
        assert backend_outage(bug) is None
    assert backend_outage(asyncpg.exceptions.ProtocolViolationError("bad bind")) is None
    assert backend_outage(asyncpg.exceptions.QueryCanceledError("statement timeout")) is None
    assert backend_outage(socket.gaierror(-2, "Name or service not known")) is not None


def test_asyncpg_errors_of_a_connection_the_server_ended_are_outages() -> None:
    """A statement on a connection the server just ended, or on a proxy the pool took back
    as its connection closed: the server going away, not a bug."""
    ended = asyncpg.exceptions.InternalClientError(
        "cannot switch to state 12; another operation (2) is in progress"
    )
    assert backend_outage(ended) is not None
    released = asyncpg.InterfaceError(
        "cannot call Connection.fetchval(): connection has been released back to the pool"
    )
    assert backend_outage(released) is not None
    assert backend_outage(asyncpg.exceptions.InternalClientError("something else")) is None


async def test_a_database_that_drops_packets_is_an_outage_within_the_bound() -> None:
    """Black-holed (no answer, no reset): the store's statement and connect bounds end the
    wait, and what they raise is an outage; a timeout of our own is not."""
    from aiserver.jobs.store.postgres import bounded_pool_options
    from tests.storage.backends import PG_URL
    from tests.support.tcp_cut import TcpCut

    port = int(PG_URL.rsplit(":", 1)[1].split("/")[0])
    async with TcpCut("127.0.0.1", port) as relay:
        url = PG_URL.replace(f":{port}/", f":{relay.port}/")
        pool = await asyncpg.create_pool(
            url, min_size=1, max_size=1, **bounded_pool_options(0.5, {})
        )
        try:
            assert await pool.fetchval("SELECT 1") == 1
            relay.blackhole()
            loop = asyncio.get_running_loop()
            began = loop.time()
            with pytest.raises(Exception) as dropped:
                await pool.fetchval("SELECT 1")  # the statement's bound, then its cancel's
            assert loop.time() - began < 3
            assert backend_outage(dropped.value) is not None
            with pytest.raises(Exception) as unanswered:
                await asyncpg.connect(url, timeout=0.5)  # accepted, never answered
            assert backend_outage(unanswered.value) is not None
            assert relay.swallowed >= 1
            relay.restore()
            assert await pool.fetchval("SELECT 2") == 2  # a new connection
        finally:
            pool.terminate()
    with pytest.raises(TimeoutError) as ours:
        async with asyncio.timeout(0.01):
            await asyncio.sleep(1)
    assert backend_outage(ours.value) is None
