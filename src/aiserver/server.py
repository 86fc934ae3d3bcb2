"""Bootstrap: builds the components, serves gRPC with health and reflection, shuts down cleanly."""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import sqlite3
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from imagetasks.v1 import (
    agent_service_pb2,
    agent_service_pb2_grpc,
    artifact_service_pb2,
    artifact_service_pb2_grpc,
    generation_service_pb2,
    generation_service_pb2_grpc,
    job_service_pb2,
    job_service_pb2_grpc,
    transform_service_pb2,
    transform_service_pb2_grpc,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)

from aiserver import heap
from aiserver.api.agents import AgentServicer
from aiserver.api.artifacts import ArtifactServicer
from aiserver.api.generation import GenerationServicer
from aiserver.api.guard import Guard
from aiserver.api.job_calls import JobCalls, SubmitLimits
from aiserver.api.jobs import JobServicer
from aiserver.api.local_calls import LocalCalls
from aiserver.api.transform import TransformServicer
from aiserver.api.workflows import WorkflowServicer
from aiserver.artifacts import ArtifactStore, VariantCache, VariantPolicy
from aiserver.artifacts.index import open_artifact_index
from aiserver.artifacts.store import SWEEP_FRESH_S
from aiserver.blobs import open_blob_store
from aiserver.config import Settings
from aiserver.data_lock import DataFolderInUse, DataFolderLock
from aiserver.gateway import Gateway, GatewaySettings
from aiserver.imaging import ImageLimits
from aiserver.imaging.block_cache import keep_image_blocks
from aiserver.jobs.agent_slots import SharedAgentSlots
from aiserver.jobs.manager import JobManager
from aiserver.jobs.scheduler import SchedulerSettings
from aiserver.jobs.store import JobStore, StoreUnavailable, new_holder_id, open_job_store
from aiserver.metrics import Metrics, MetricsServer
from aiserver.provider_config import build_providers, comfy_pools
from aiserver.providers.base import Provider
from aiserver.providers.comfy.watch import WorkflowWatcher
from aiserver.providers.comfy.workflows import AgentCapabilities, WorkflowCatalog
from aiserver.retention import Retention, RetentionPolicy
from aiserver.security import Security
from aiserver.spool import InputSpool
from aiserver.spool_memory import SpoolMemory
from aiserver.tasks import BUILT_IN_TASKS
from aiserver.webhooks import DeliveryOutcome, WebhookSender, webhook_record
from aiserver.webhooks.outbox import WebhookOutbox
from aiserver.workers import BlockingPool

__all__ = ["Service", "StartupError", "serve"]

logger = logging.getLogger(__name__)


def _service_name(module: object, name: str) -> str:
    return module.DESCRIPTOR.services_by_name[name].full_name  # type: ignore[attr-defined, no-any-return]


_TRANSFORM = _service_name(transform_service_pb2, "TransformService")
_GENERATION = _service_name(generation_service_pb2, "GenerationService")
_JOBS = _service_name(job_service_pb2, "JobService")
_ARTIFACTS = _service_name(artifact_service_pb2, "ArtifactService")
_AGENTS = _service_name(agent_service_pb2, "AgentService")
_WORKFLOWS = _service_name(workflow_service_pb2, "WorkflowService")
HEALTH_POLL_S = 1.0

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class StartupError(Exception):
    """The service cannot start (a port in use, an address not available): one line for the
    operator, no traceback."""


class Service:
    """The whole service: start it, read ``grpc_port``, stop it."""

    def __init__(self, settings: Settings) -> None:
        # First: unusable security settings (or an open service on a public address) stop
        # here, with aiserver.auth.ConfigError, before anything is created.
        self.security = Security.from_settings(settings)
        self.metrics = Metrics()
        self.metrics_server: MetricsServer | None = None
        self.metrics_port = 0
        self.settings = settings
        self.grpc_port = 0
        data = settings.data_dir
        data.mkdir(parents=True, exist_ok=True)
        self._data_lock = DataFolderLock(data)
        blobs = open_blob_store(settings.blob_url, data / "artifacts")
        # Inputs go to the blob store only when it is shared (S3): the folder is this
        # process's own, and the spool already is one.
        self.spool = InputSpool(
            data / "spool",
            shared=blobs if settings.blob_url else None,
            memory=SpoolMemory(settings.spool_memory_mb * 1024 * 1024),
        )
        self.pool = BlockingPool(settings.image_threads)
        keep_image_blocks(settings.image_block_cache_mib)
        self.limits = ImageLimits(max_pixels=settings.max_pixels)
        self.health = health.aio.HealthServicer()
        try:
            index = open_artifact_index(
                settings.database_url,
                settings.database_schema,
                data / "artifacts",
                timeout_s=settings.database_timeout_s,
            )
        except (OSError, sqlite3.Error) as exc:  # the embedded index: unreadable, not SQLite
            raise StartupError(
                f"cannot open the artifact index in {data / 'artifacts'}: {exc}"
            ) from exc
        self.artifacts = ArtifactStore(data / "artifacts", blobs=blobs, index=index)
        self.variants = VariantCache(self.artifacts, data / "variants", self.limits, pool=self.pool)
        self.variant_policy = VariantPolicy(
            settings.variant_presets,
            presets_only=settings.variant_presets_only,
            max_side=settings.variant_max_side,
        )
        self.variants.prerender(self.variant_policy.presets.values())  # warm from the start
        self.webhooks = WebhookSender(
            settings.webhook_secret.encode() or None,
            allow_hosts=settings.webhook_allow_hosts,
            allow_private=settings.webhook_allow_private,
            public_base_url=settings.public_base_url,
            link=self.security.link if self.security.signer is not None else None,
        )
        # Broken workflow files are listed as unavailable, never stopping the server.
        self.workflows = WorkflowCatalog.load(user_dir=settings.workflows_dir, strict=False)
        self.workflow_watcher = WorkflowWatcher(
            self.workflows,
            user_dir=settings.workflows_dir,
            interval_s=settings.workflows_poll_s,
            on_change=self._workflows_changed,
        )
        self.providers: list[Provider] = build_providers(settings, self.limits, self.workflows)
        self.manager: JobManager | None = None
        self.retention: Retention | None = None
        self.job_store: JobStore | None = None
        self.agent_slots: SharedAgentSlots | None = None
        self.outbox: WebhookOutbox | None = None
        self.gateway: Gateway | None = None
        self.http_port = 0
        self._server: grpc.aio.Server | None = None
        self._guard: Guard | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._store_reachable = True
        self._shim_token = secrets.token_urlsafe(24)
        """Known to the guard and the in-process HTTP shim only (see Guard)."""

    def _services(self) -> Sequence[str]:
        return (_TRANSFORM, _GENERATION, _JOBS, _ARTIFACTS, _AGENTS, _WORKFLOWS)

    async def start(self) -> int:
        s = self.settings
        try:
            self._data_lock.acquire()  # before anything in the folder is touched
        except DataFolderInUse as exc:
            raise StartupError(str(exc)) from None
        self.spool.sweep_tmp()
        for provider in self.providers:
            await provider.start()
        try:
            self.job_store = store = await open_job_store(
                s.database_url,
                s.database_schema,
                s.data_dir / "jobs.db",
                timeout_s=s.database_timeout_s,
            )
            # In the job database too: opened (migrated) here, not in the first request.
            await self.artifacts.index.start()
        except StoreUnavailable as exc:
            raise StartupError(str(exc)) from exc
        # PostgreSQL: several coordinators share the jobs and the agents; this process holds
        # leases on its own jobs and on the agent slots its runs use.
        holder = new_holder_id() if s.database_url else None
        if holder is not None:
            self.agent_slots = SharedAgentSlots(store, holder, s.job_lease_s)
            for pool in comfy_pools(self.providers):  # also when wrapped (Excluding)
                pool.share_slots(self.agent_slots)
            self.agent_slots.start()
        self.manager = manager = JobManager(
            store,
            self.spool,
            self.artifacts,
            self.providers,
            SchedulerSettings(
                max_attempts=s.max_attempts,
                queue_timeout_s=s.queue_timeout_s,
                run_timeout_s=s.run_timeout_s,
                max_active_per_owner=s.max_active_jobs_per_key,
                steal_after_s=s.job_steal_after_s,
                watch_outage_s=s.watch_outage_s,
            ),
            holder=holder,
            lease_s=s.job_lease_s,
        )
        # Webhooks go through the durable outbox: stored with the final state, sent by the
        # process that leads the outbox role (any one of several coordinators), which keeps
        # each delivery's outcome on its job.
        self.webhooks.keep_outcome = self._keep_webhook_outcome
        self.outbox = WebhookOutbox(store, self.webhooks, holder or new_holder_id())
        manager.use_outbox(self.outbox.deliveries, self.outbox.wake)
        manager.add_terminal_hook(self.metrics.job_finished)
        self.metrics.watch(manager, self.providers)
        await manager.start()
        self.retention = Retention(
            RetentionPolicy(
                max_age_s=s.artifact_max_age_s or None,
                max_total_bytes=s.artifact_max_total_bytes or None,
                interval_s=s.retention_interval_s,
                # Past two leases a job that stored an output has saved it, or has lost its
                # lease and will be run again (a new put makes the blob fresh again).
                fresh_s=max(SWEEP_FRESH_S, 2 * s.job_lease_s),
            ),
            self.artifacts,
            store,
            manager,
        )
        self.retention.start()
        self.outbox.start()
        options: list[tuple[str, int]] = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        if s.max_concurrent_streams > 0:
            options.append(("grpc.max_concurrent_streams", s.max_concurrent_streams))
        guard = self._guard = self.security.guard(self.metrics, shim_token=self._shim_token)
        server = grpc.aio.server(interceptors=[guard], options=options)
        link = self.security.link
        transform_service_pb2_grpc.add_TransformServiceServicer_to_server(
            TransformServicer(
                spool=self.spool,
                pool=self.pool,
                limits=self.limits,
                max_upload_bytes=s.max_upload_bytes,
                chunk_bytes=s.chunk_bytes,
            ),
            server,
        )
        job_calls = JobCalls(
            manager=manager,
            artifacts=self.artifacts,
            spool=self.spool,
            pool=self.pool,
            limits=SubmitLimits(
                max_upload_bytes=s.max_upload_bytes,
                max_prompt_chars=s.max_prompt_chars,
                max_batch_size=s.max_batch_size,
                chunk_bytes=s.chunk_bytes,
                image=self.limits,
            ),
            link=link,
            reply_to_guard=self.webhooks.guard,
        )
        generation = GenerationServicer(job_calls, self.workflows)
        generation_service_pb2_grpc.add_GenerationServiceServicer_to_server(generation, server)
        workflow = WorkflowServicer(job_calls, self.workflows, self._agent_capabilities)
        workflow_service_pb2_grpc.add_WorkflowServiceServicer_to_server(workflow, server)
        self.workflow_watcher.start()
        job_service_pb2_grpc.add_JobServiceServicer_to_server(
            JobServicer(manager, link=link),
            server,
        )
        artifacts = ArtifactServicer(
            store=self.artifacts,
            variants=self.variants,
            policy=self.variant_policy,
            chunk_bytes=s.chunk_bytes,
            signer=self.security.signer,
        )
        artifact_service_pb2_grpc.add_ArtifactServiceServicer_to_server(artifacts, server)
        # The shim reads variants (mostly warm, a few kB) and artifacts, and runs jobs through
        # the same guard and handlers without the loopback HTTP/2 round trip (for a 64 MiB
        # artifact, that round trip was about as much CPU as the HTTP response itself).
        local_calls = LocalCalls(guard)
        artifact_service_pb2_grpc.add_ArtifactServiceServicer_to_server(
            artifacts, local_calls.recorder(only=("GetVariant", "ReadArtifact"))
        )
        jobs_here = tuple(task.value for task in BUILT_IN_TASKS)  # the RPC names
        generation_service_pb2_grpc.add_GenerationServiceServicer_to_server(
            generation, local_calls.recorder(only=jobs_here)
        )
        workflow_service_pb2_grpc.add_WorkflowServiceServicer_to_server(
            workflow, local_calls.recorder(only=("RunWorkflow",))
        )
        agent_service_pb2_grpc.add_AgentServiceServicer_to_server(
            AgentServicer(self.providers), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (*self._services(), health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        self._server = server  # from here, stop() undoes a failed start too
        try:
            self.grpc_port = server.add_insecure_port(f"{s.grpc_host}:{s.grpc_port}")
        except RuntimeError:  # grpcio's "Failed to bind", without the reason
            self.grpc_port = 0
        if self.grpc_port == 0:
            raise StartupError(
                f"cannot listen for gRPC on {s.grpc_host}:{s.grpc_port}"
                " (the port is in use or the address is not this machine's)"
            )
        guard.local_ports.add(self.grpc_port)  # where a stalled stream's connection is
        await server.start()
        await self.health.set("", SERVING)
        for name in self._services():
            await self.health.set(name, SERVING)
        await self._update_generation_health()
        self._health_task = asyncio.create_task(self._health_loop(), name="health")
        logger.info("gRPC listening on %s:%d", s.grpc_host, self.grpc_port)
        if s.http_enabled:
            # The shim is a gRPC client of this very server: it adds no behaviour of its own
            # (its local calls run this server's own guard and handlers).
            local = "127.0.0.1" if s.grpc_host in ("0.0.0.0", "::", "") else s.grpc_host
            self.gateway = Gateway(
                f"{local}:{self.grpc_port}",
                host=s.http_host,
                port=s.http_port,
                settings=GatewaySettings.from_settings(s, shim_token=self._shim_token),
                metrics=self.security.metrics_handler(self.metrics) if s.http_metrics else None,
                local_calls=local_calls,
            )
            try:
                self.http_port = await self.gateway.start()
            except OSError as exc:
                raise StartupError(
                    f"cannot listen for HTTP on {s.http_host}:{s.http_port}: {exc.strerror or exc}"
                ) from None
            logger.info("HTTP listening on %s:%d", s.http_host, self.http_port)
        if s.metrics_port is not None:
            self.metrics_server = MetricsServer(self.metrics, s.metrics_host, s.metrics_port)
            try:
                self.metrics_port = await self.metrics_server.start()
            except OSError as exc:
                raise StartupError(
                    f"cannot listen for metrics on {s.metrics_host}:{s.metrics_port}:"
                    f" {exc.strerror or exc}"
                ) from None
            logger.info("metrics on http://%s:%d/metrics", s.metrics_host, self.metrics_port)
        return self.grpc_port

    async def stop(self, grace_s: float | None = None) -> None:
        """Health goes NOT_SERVING first, then in-flight calls get ``grace_s`` to finish."""
        if self._server is None:
            self._data_lock.release()  # a start that failed early
            return
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        if self._health_task is not None:
            self._health_task.cancel()
        await self.health.enter_graceful_shutdown()
        if self.manager is not None:
            self.manager.quiesce()  # no new jobs; accepted ones outlive their calls
        if self.gateway is not None:
            await self.gateway.stop()
            self.gateway = None
        await self._server.stop(grace)
        self._server = None
        if self._guard is not None and self._guard.stalls is not None:
            self._guard.stalls.close()
        await self.workflow_watcher.close()
        if self.retention is not None:
            await self.retention.stop()
        if self.outbox is not None:
            await self.outbox.stop()
        if self.manager is not None:
            await self.manager.stop(grace_s=1.0)
        if self.agent_slots is not None:
            await self.agent_slots.stop()
        if self.job_store is not None:
            await self.job_store.close()
        for provider in self.providers:
            await provider.close()
        await self.webhooks.close(grace_s=1.0)
        await self.variants.close()
        await self.artifacts.close()
        self.pool.close()
        if self.metrics_server is not None:
            await self.metrics_server.stop()
            self.metrics_server = None
        self._data_lock.release()
        logger.info("stopped")

    def _workflows_changed(self, catalog: WorkflowCatalog) -> None:
        for pool in comfy_pools(self.providers):
            pool.recheck()
        agents = self._agent_capabilities()
        for workflow in catalog.workflows():
            lacking = {
                n: c.reason for n, caps in agents.items() if not (c := workflow.check(caps)).ok
            }
            if lacking:
                logger.warning("workflow %s cannot run on: %s", workflow.name, lacking)

    def _agent_capabilities(self) -> dict[str, AgentCapabilities]:
        found: dict[str, AgentCapabilities] = {}
        for pool in comfy_pools(self.providers):
            found.update(pool.capabilities())
        return found

    async def _keep_webhook_outcome(self, outcome: DeliveryOutcome) -> None:
        if self.manager is not None:
            await self.manager.record_webhook(outcome.job_id, webhook_record(outcome))

    async def _update_generation_health(self) -> None:
        assert self.manager is not None
        able = self._store_reachable and any(
            self.manager.can_serve(task) for task in BUILT_IN_TASKS
        )
        await self.health.set(_GENERATION, SERVING if able else NOT_SERVING)

    async def _update_store_health(self) -> None:
        """The whole server, and every service that needs the job store, are NOT_SERVING
        while the store does not answer (a balancer sends their calls elsewhere, or holds
        them); SERVING again at its first answer. Transforms need no store."""
        assert self.job_store is not None
        try:
            await self.job_store.ping()  # bounded by database_timeout_s
            reachable = True
        except Exception as exc:
            reachable = False
            if self._store_reachable:
                logger.warning("the job store does not answer: NOT_SERVING (%s)", exc)
        if reachable and not self._store_reachable:
            logger.info("the job store answers again: SERVING")
        self._store_reachable = reachable
        state = SERVING if reachable else NOT_SERVING
        await self.health.set("", state)
        for name in (_JOBS, _ARTIFACTS, _WORKFLOWS):
            await self.health.set(name, state)

    async def _health_loop(self) -> None:
        # Agents come and go; the generative service's health follows whether any can serve.
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            await self._update_store_health()
            await self._update_generation_health()

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    service = Service(settings)
    try:
        await service.start()
    except BaseException:
        await service.stop(grace_s=0)
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    frozen = heap.settle()  # the start-up heap out of the collector's full passes
    logger.info("start-up heap: %d objects frozen for the garbage collector", frozen)
    if heap.keep_freed_memory(service.spool.memory.share):  # uploads kept as received
        logger.info("malloc keeps up to %d MiB freed", service.spool.memory.share >> 20)
    await stop.wait()
    logger.info("signal received; shutting down (grace %.1fs)", settings.shutdown_grace_s)
    await service.stop()
