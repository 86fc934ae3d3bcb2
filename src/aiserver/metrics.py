"""Prometheus metrics: one registry per service (several services may share a process).

Counters are bumped by the gRPC interceptor (calls, bytes, rejections) and by a job manager
terminal hook (finished jobs, durations); gauges of live state (unfinished jobs, queue depth,
agents) are read from the manager and the providers when scraped, on the event loop.

Served by the HTTP shim at ``/metrics`` and/or a listener of its own (``metrics_port``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from aiserver.jobs.model import Job, JobState
from aiserver.jobs.scheduler import default_spec
from aiserver.providers.comfy.pool import AgentState, ComfyPool
from aiserver.providers.fallback import unwrap
from aiserver.tasks import TaskKind

if TYPE_CHECKING:
    from aiserver.jobs.manager import JobManager
    from aiserver.providers.base import Provider

__all__ = ["CONTENT_TYPE", "Metrics", "MetricsServer"]

logger = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_LIVE_STATES = (JobState.QUEUED, JobState.RUNNING)


class Metrics:
    """The service's metrics; :meth:`render` is the text exposition format."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.rpcs = Counter(
            "aiserver_rpcs",
            "RPCs served, by method and final status code",
            ["method", "code"],
            registry=r,
        )
        self.rejected = Counter(
            "aiserver_rejected_requests",
            "Calls that ended with an error, by ErrorInfo reason (RATE_LIMITED, "
            "API_KEY_INVALID, UPLOAD_TOO_LARGE, ...)",
            ["reason"],
            registry=r,
        )
        self.received_bytes = Counter(
            "aiserver_received_bytes",
            "Request message bytes received, by method",
            ["method"],
            registry=r,
        )
        self.sent_bytes = Counter(
            "aiserver_sent_bytes",
            "Response message bytes sent, by method",
            ["method"],
            registry=r,
        )
        self.streams = Gauge("aiserver_active_streams", "Streaming calls in progress", registry=r)
        self.jobs_finished = Counter(
            "aiserver_jobs_finished",
            "Jobs that ended, by task and final state",
            ["task", "state"],
            registry=r,
        )
        self.job_duration = Histogram(
            "aiserver_job_duration_seconds",
            "Time from a job's first start to its end, by task and provider",
            ["task", "provider"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.job_wait = Histogram(
            "aiserver_job_queue_wait_seconds",
            "Time from a job's creation to its first start, by task",
            ["task"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self._live: _LiveState | None = None
        # Children by label values, found once: ``labels()`` validates and joins the values
        # and takes the metric's lock on every call (three per job).
        self._finished_of: dict[tuple[str, str], Counter] = {}
        self._wait_of: dict[str, Histogram] = {}
        self._duration_of: dict[tuple[str, str], Histogram] = {}

    def watch(self, manager: JobManager, providers: Sequence[Provider]) -> None:
        """Expose the live state of ``manager`` and ``providers`` (once)."""
        if self._live is None:
            self._live = _LiveState(manager, providers)
            self.registry.register(self._live)

    def job_finished(self, job: Job) -> None:
        """A job manager terminal hook (a plain function: run at once, no task per job)."""
        task = job.task.value
        key = (task, job.state.value)
        finished = self._finished_of.get(key)
        if finished is None:
            finished = self._finished_of[key] = self.jobs_finished.labels(*key)
        finished.inc()
        if job.started is None:
            return
        wait = self._wait_of.get(task)
        if wait is None:
            wait = self._wait_of[task] = self.job_wait.labels(task)
        wait.observe(max((job.started - job.created).total_seconds(), 0.0))
        if job.ended is not None:
            key = (task, job.provider or "-")
            duration = self._duration_of.get(key)
            if duration is None:
                duration = self._duration_of[key] = self.job_duration.labels(*key)
            duration.observe(max((job.ended - job.started).total_seconds(), 0.0))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def handle(self, _request: web.Request) -> web.Response:
        """An aiohttp handler answering the exposition."""
        return web.Response(body=self.render(), headers={"Content-Type": CONTENT_TYPE})


class _LiveState(Collector):
    def __init__(self, manager: JobManager, providers: Sequence[Provider]) -> None:
        self._manager = manager
        self._providers = providers

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily(
            "aiserver_jobs", "Unfinished jobs, by task and state", labels=["task", "state"]
        )
        counts = self._manager.stats()
        for task in TaskKind:
            for state in _LIVE_STATES:
                jobs.add_metric([task.value, state.value], counts.get((task, state), 0))
        yield jobs
        yield GaugeMetricFamily(
            "aiserver_queue_depth", "Jobs waiting for a provider", value=self._manager.queue_depth()
        )
        up = GaugeMetricFamily(
            "aiserver_agent_up", "1 when the agent is online", labels=["agent", "kind"]
        )
        running = GaugeMetricFamily(
            "aiserver_agent_running_jobs", "Jobs the agent runs now", labels=["agent"]
        )
        capacity = GaugeMetricFamily(
            "aiserver_agent_capacity", "Jobs the agent runs at once at most", labels=["agent"]
        )
        for provider in map(unwrap, self._providers):
            try:
                if isinstance(provider, ComfyPool):
                    for snap in provider.snapshot():
                        up.add_metric([snap.name, "comfyui"], snap.state is AgentState.ONLINE)
                        running.add_metric([snap.name], snap.running_jobs)
                        capacity.add_metric([snap.name], snap.max_concurrent_jobs)
                else:
                    able = any(
                        provider.can_run(t, default_spec(t))
                        for t in TaskKind
                        if provider.supports(t)
                    )
                    up.add_metric([provider.name, "local"], able)
                    running.add_metric([provider.name], provider.load())
            except Exception:
                logger.exception("metrics: provider %s failed to report", provider.name)
        yield up
        yield running
        yield capacity


class MetricsServer:
    """``/metrics`` on a listener of its own (no authentication: bind it to a private address)."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self._metrics = metrics
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics.handle)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
