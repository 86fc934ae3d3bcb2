"""API keys: configuration, authentication over gRPC and HTTP, ownership, admin powers, and the
refusal to serve a public address without keys."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from imagetasks.v1 import agent_service_pb2 as agpb
from imagetasks.v1 import (
    agent_service_pb2_grpc,
    artifact_service_pb2_grpc,
    common_pb2,
    job_service_pb2_grpc,
    tasks_pb2,
    transform_service_pb2,
    transform_service_pb2_grpc,
)
from imagetasks.v1 import artifact_service_pb2 as apb
from imagetasks.v1 import job_service_pb2 as jpb

from aiserver.auth import ConfigError, KeyRing, bearer_token, is_loopback_host, parse_key_entries
from aiserver.security import Security
from aiserver.server import Service
from tests.conftest import make_settings
from tests.security.conftest import (
    API_KEYS,
    ASYNC,
    KEYS,
    PNG,
    auth,
    bearer,
    channel_to,
    http_base,
    keyed_service,
    upscale,
)
from tests.support.grpc_helpers import rich_status, send_all, upload_messages

# --- configuration ------------------------------------------------------------------------


def test_env_entries_are_parsed_and_kept_hashed() -> None:
    sha = hashlib.sha256(b"hashed-key-0123456789").hexdigest()
    ring = KeyRing(parse_key_entries(f" a:{'k' * 16} , b:sha256={sha}:admin,"))
    assert ring.ids == ("a", "b")
    assert ring.authenticate("k" * 16) == ring.admits_header(f"Bearer {'k' * 16}")
    a = ring.authenticate("k" * 16)
    b = ring.authenticate("hashed-key-0123456789")
    assert a is not None and (a.id, a.admin) == ("a", False)
    assert b is not None and (b.id, b.admin) == ("b", True)
    assert ring.authenticate("k" * 15) is None and ring.authenticate("") is None
    assert "k" * 16 not in repr(ring._keys) and sha not in repr(ring._keys)


@pytest.mark.parametrize(
    "entries",
    [
        "a:short",  # under 16 characters
        f"a:{'k' * 16}:root",  # only "admin" may follow
        f"a:{'k' * 16},a:{'j' * 16}",  # id twice
        f"a:{'k' * 16},b:{'k' * 16}",  # the same key under two ids
        f"../x:{'k' * 16}",  # an id that is no identifier
        "a:sha256=abc",  # not a digest
        "justone",
    ],
)
def test_bad_entries_are_refused(entries: str) -> None:
    with pytest.raises(ConfigError):
        KeyRing.load(entries)


def test_key_files_toml_and_json(tmp_path: Path) -> None:
    sha = hashlib.sha256(b"ops-file-key-0123456789").hexdigest()
    toml = tmp_path / "keys.toml"
    toml.write_text(
        f'[[keys]]\nid = "alice"\nkey = "{KEYS["alice"]}"\n\n'
        f'[[keys]]\nid = "ops"\nsha256 = "{sha}"\nadmin = true\n'
    )
    ring = KeyRing.load(f"bob:{KEYS['bob']}", toml)
    assert sorted(ring.ids) == ["alice", "bob", "ops"]
    ops = ring.authenticate("ops-file-key-0123456789")
    assert ops is not None and ops.admin
    js = tmp_path / "keys.json"
    js.write_text(json.dumps({"keys": [{"id": "carol", "key": "carol-key-0123456789"}]}))
    assert KeyRing.load(file=js).ids == ("carol",)
    js.write_text(json.dumps([{"id": "carol", "key": "carol-key-0123456789", "role": "x"}]))
    with pytest.raises(ConfigError, match="unknown fields"):
        KeyRing.load(file=js)
    with pytest.raises(ConfigError, match="api_keys_file"):
        KeyRing.load(file=tmp_path / "missing.toml")


def test_bearer_and_loopback_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer   abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer ") is None
    assert is_loopback_host("127.0.0.1") and is_loopback_host("::1")
    assert is_loopback_host("localhost") and is_loopback_host("[::1]")
    for exposed in ("0.0.0.0", "::", "", "10.0.0.1", "example.com"):
        assert not is_loopback_host(exposed)


@pytest.mark.parametrize(
    "overrides",
    [{"grpc_host": "0.0.0.0"}, {"http_host": "0.0.0.0"}, {"grpc_host": "::"}],
)
def test_no_keys_on_a_public_address_refuses_to_start(
    tmp_path: Path, overrides: dict[str, str]
) -> None:
    with pytest.raises(ConfigError, match="allow_open"):
        Service(make_settings(tmp_path, **overrides))
    # Either a key or an explicit allow_open lets it start (the check Service runs first).
    Security.from_settings(make_settings(tmp_path, **overrides, allow_open=True))
    Security.from_settings(make_settings(tmp_path, **overrides, api_keys=API_KEYS))


def test_serve_command_exits_non_zero_with_a_clear_message(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AISERVER_")}
    env["AISERVER_HTTP_PORT"] = "0"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "aiserver",
            "serve",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path / "data"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "refusing to serve without API keys" in proc.stderr
    assert "AISERVER_ALLOW_OPEN" in proc.stderr


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"artifact_access": "public"}, "artifact_access"),
        ({"artifact_access": "signed"}, "url_signing_secrets"),
        ({"artifact_access": "signed", "url_signing_secrets": ("short",)}, "16 characters"),
        ({"rate_limit_per_s": -1.0}, "rate_limit_per_s"),
    ],
)
def test_unusable_security_settings(
    tmp_path: Path, overrides: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        Service(make_settings(tmp_path, **overrides))


# --- authentication -------------------------------------------------------------------------


async def test_every_call_needs_a_key_except_health_and_reflection(tmp_path: Path) -> None:
    async with keyed_service(tmp_path) as (service, _), channel_to(service) as ch:
        jobs = job_service_pb2_grpc.JobServiceStub(ch)
        cases = {
            (): "API_KEY_MISSING",
            (("authorization", "Bearer not-a-key-0123456789"),): "API_KEY_INVALID",
            (("authorization", f"Basic {KEYS['alice']}"),): "API_KEY_INVALID",
            (("authorization", KEYS["alice"]),): "API_KEY_INVALID",
        }
        for metadata, reason in cases.items():
            for call in (
                jobs.GetJob(jpb.GetJobRequest(name="jobs/x"), metadata=metadata),
                jobs.ListJobs(jpb.ListJobsRequest(), metadata=metadata),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert rich_status(caught.value)[1]["ErrorInfo"].reason == reason
            watch = jobs.WatchJob(jpb.WatchJobRequest(name="jobs/x"), metadata=metadata)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                _ = [r async for r in watch]
            assert rich_status(caught.value)[1]["ErrorInfo"].reason == reason
            # An upload is refused before anything is read or stored.
            convert = transform_service_pb2_grpc.TransformServiceStub(ch).ConvertImage(
                metadata=metadata
            )
            messages = upload_messages(
                transform_service_pb2.ConvertImageRequest,
                tasks_pb2.ConvertImageParams(output_format=common_pb2.IMAGE_FORMAT_PNG),
                {"image": PNG},
            )
            await send_all(convert, messages)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                _ = [r async for r in convert]
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert rich_status(caught.value)[1]["ErrorInfo"].reason == reason
        # Health and reflection answer anyone.
        health = health_pb2_grpc.HealthStub(ch)
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == 1
        reflect = reflection_pb2_grpc.ServerReflectionStub(ch)
        call = reflect.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await call.read()
        await call.done_writing()
        names = {s.name for s in reply.list_services_response.service}
        assert "imagetasks.v1.JobService" in names
        # With a key, the same calls work.
        listed = await jobs.ListJobs(jpb.ListJobsRequest(), metadata=bearer("alice"))
        assert list(listed.jobs) == []


async def test_http_needs_the_key_too(tmp_path: Path) -> None:
    async with (
        keyed_service(tmp_path) as (service, _),
        httpx.AsyncClient(base_url=http_base(service), timeout=30) as http,
    ):
        res = await http.get("/v1/jobs")
        assert res.status_code == 401
        assert res.headers["www-authenticate"] == "Bearer"
        assert res.json()["responseStatus"]["errorCode"] == "API_KEY_MISSING"
        res = await http.get("/v1/jobs", headers={"Authorization": "Bearer nope-0123456789abcdef"})
        assert res.status_code == 401
        assert res.json()["responseStatus"]["errorCode"] == "API_KEY_INVALID"
        res = await http.post(
            "/api/ConvertImage", files={"image": ("a.png", PNG)}, data={"OutputFormat": "webp"}
        )
        assert res.status_code == 401
        res = await http.post(
            "/api/ConvertImage",
            files={"image": ("a.png", PNG)},
            data={"OutputFormat": "webp"},
            headers=auth("bob"),
        )
        assert res.status_code == 200 and res.headers["content-type"] == "image/webp"
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/v1/jobs", headers=auth("alice"))).json() == {}


# --- ownership --------------------------------------------------------------------------------


async def test_jobs_and_artifacts_belong_to_their_key(tmp_path: Path) -> None:
    async with (
        keyed_service(tmp_path) as (service, _),
        channel_to(service) as ch,
        httpx.AsyncClient(base_url=http_base(service), timeout=30) as http,
    ):
        got = await upscale(ch, "alice", options=common_pb2.JobOptions(ref_id="mine"))
        job = got.final
        assert job.owner == "alice"
        artifact = job.outputs[0]
        queued = await upscale(ch, "alice", options=ASYNC)
        jobs = job_service_pb2_grpc.JobServiceStub(ch)
        arts = artifact_service_pb2_grpc.ArtifactServiceStub(ch)

        async def refused(call: object) -> None:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                if hasattr(call, "__aiter__"):
                    _ = [r async for r in call]  # type: ignore[attr-defined]
                else:
                    await call  # type: ignore[misc]
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND, caught.value.details()

        bob = bearer("bob")
        await refused(jobs.GetJob(jpb.GetJobRequest(name=job.name), metadata=bob))
        await refused(jobs.WatchJob(jpb.WatchJobRequest(name=job.name), metadata=bob))
        await refused(jobs.CancelJob(jpb.CancelJobRequest(name=queued.events[0].job), metadata=bob))
        await refused(arts.GetArtifact(apb.GetArtifactRequest(name=artifact.name), metadata=bob))
        await refused(arts.ReadArtifact(apb.ReadArtifactRequest(name=artifact.name), metadata=bob))
        await refused(
            arts.GetVariant(apb.GetVariantRequest(name=artifact.name, width=8), metadata=bob)
        )
        listed = await jobs.ListJobs(jpb.ListJobsRequest(), metadata=bob)
        assert list(listed.jobs) == []
        # Over HTTP: bob sees nothing of alice's; alice sees hers.
        res = await http.get(artifact.url, headers=auth("bob"))
        assert res.status_code == 404
        assert res.json()["responseStatus"]["errorCode"] == "ARTIFACT_NOT_FOUND"
        res = await http.get(artifact.url, headers=auth("alice"))
        assert res.status_code == 200 and len(res.content) == artifact.size_bytes
        assert res.headers["cache-control"].startswith("private")
        res = await http.get(f"/v1/{job.name}", headers=auth("bob"))
        assert res.status_code == 404
        # The same ref_id under another key is another job. (Its output has the same bytes:
        # content-addressed, bob now holds a reference of his own to that artifact.)
        theirs = await upscale(ch, "bob", options=common_pb2.JobOptions(ref_id="mine"))
        assert theirs.final.name != job.name and theirs.final.owner == "bob"
        res = await http.get("/api/GetArtifactGenerationStatus?refId=mine", headers=auth("bob"))
        assert res.json()["jobId"] == theirs.final.name.removeprefix("jobs/")
        # alice's own view.
        mine = await jobs.ListJobs(jpb.ListJobsRequest(), metadata=bearer("alice"))
        assert {j.name for j in mine.jobs} == {job.name, queued.events[0].job}


async def test_admin_lists_every_owner_and_the_agents(tmp_path: Path) -> None:
    async with keyed_service(tmp_path) as (service, _), channel_to(service) as ch:
        await upscale(ch, "alice")
        await upscale(ch, "bob")
        jobs = job_service_pb2_grpc.JobServiceStub(ch)
        every = jpb.ListJobsRequest(all_owners=True)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await jobs.ListJobs(every, metadata=bearer("bob"))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert rich_status(caught.value)[1]["ErrorInfo"].reason == "ADMIN_ONLY"
        listed = await jobs.ListJobs(every, metadata=bearer("ops"))
        assert {j.owner for j in listed.jobs} == {"alice", "bob"}
        own = await jobs.ListJobs(jpb.ListJobsRequest(), metadata=bearer("ops"))
        assert list(own.jobs) == []  # an admin's own listing is its own jobs
        agents = agent_service_pb2_grpc.AgentServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await agents.ListAgents(agpb.ListAgentsRequest(), metadata=bearer("alice"))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        listed_agents = await agents.ListAgents(agpb.ListAgentsRequest(), metadata=bearer("ops"))
        assert [a.name for a in listed_agents.agents] == ["gpu-0"]
