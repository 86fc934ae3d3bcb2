"""Real processes for the chaos suite: stand-in agents, the service, a client, and the tally.

- :class:`Agent`: one ``tests.chaos.agent_proc`` process; SIGKILL it and start it again on the
  same port. Every incarnation appends to one prompt log.
- the service: a :class:`~tests.support.server_process.ServerProcess` (``aiserver serve``)
  over one data directory, pointed at the agents; SIGKILL it and start it again.
- :class:`Client`: submits ImageToImage jobs (async mode, a ``ref_id`` each, resent until
  accepted, so a submission that met a dead service is retried idempotently) and reads their
  states with ListJobs.
- :func:`tally`: the :class:`Report` of a scenario: submitted / succeeded / failed by reason /
  lost / run twice, from the service's answers and the agents' prompt logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from imagetasks.v1 import common_pb2, job_pb2, job_service_pb2_grpc, tasks_pb2
from imagetasks.v1 import job_service_pb2 as jpb

from tests.support.generation import generate
from tests.support.images import encode, quadrant_image
from tests.support.server_process import REPO, ServerProcess

__all__ = ["REPORTS", "Agent", "Client", "Report", "read_logs", "tally"]

TERMINAL = {
    job_pb2.Job.STATE_SUCCEEDED,
    job_pb2.Job.STATE_FAILED,
    job_pb2.Job.STATE_CANCELLED,
}
KILL_EXCUSE_S = 5.0
"""A success on an agent SIGKILLed within this long after it may never have reached the
service (outputs not yet fetched): running that job again is not a duplicate."""


class Agent:
    """A stand-in agent process that can be SIGKILLed and restarted on the same port."""

    def __init__(self, name: str, root: Path, log: Path, step_delay_s: float) -> None:
        self.name = name
        self.root = root
        self.log = log
        self.step_delay_s = step_delay_s
        self.port = 0
        self.kills: list[float] = []
        """Wall times of each SIGKILL."""
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def up(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        for attempt in range(50):  # the port may take a moment to be free again
            cmd = [sys.executable, "-m", "tests.chaos.agent_proc", "--root", str(self.root)]
            cmd += ["--log", str(self.log), "--name", self.name, "--port", str(self.port)]
            cmd += ["--step-delay", str(self.step_delay_s)]
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
                cwd=str(REPO),
            )
            assert proc.stdout is not None
            async with asyncio.timeout(30):
                line = await proc.stdout.readline()
            if line:
                self._proc = proc
                self.port = int(json.loads(line)["port"])
                return
            await proc.wait()
            if attempt == 49:
                raise RuntimeError(f"agent {self.name} does not start on port {self.port}")
            await asyncio.sleep(0.1)

    async def kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
            self.kills.append(time.time())
            await proc.wait()
        self._proc = None

    def freeze(self) -> None:
        """SIGSTOP: the agent hangs (its sockets stay open, the kernel still accepts new
        connections, nothing answers), as a wedged or stopped ComfyUI. :meth:`kill` ends it."""
        assert self._proc is not None and self._proc.returncode is None
        self._proc.send_signal(signal.SIGSTOP)

    async def stop(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        self._proc = None


@dataclass(frozen=True)
class LogEntry:
    agent: str
    event: str
    prompt_id: str
    job: str
    t: float
    repeats: str = ""
    """The prompt this one repeats for its image frames (see ``agent_proc``), else ""."""


def read_logs(paths: Iterable[Path]) -> list[LogEntry]:
    entries = []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError):
                data = json.loads(line)
                entries.append(
                    LogEntry(
                        data["agent"],
                        data["event"],
                        data["prompt_id"],
                        data["job"],
                        data["t"],
                        data.get("repeats", ""),
                    )
                )
    return sorted(entries, key=lambda e: e.t)


class Client:
    """Submits jobs and reads their states through whatever service incarnation is up."""

    def __init__(self, service: ServerProcess, tag: str, steps: int) -> None:
        self.service = service
        self.tag = tag
        self.steps = steps
        self.names: dict[str, str] = {}
        """Job name by ref_id, for every accepted submission."""
        self._channel: grpc.aio.Channel | None = None
        self._target = ""
        self._old: list[grpc.aio.Channel] = []  # to a service incarnation that is gone

    def channel(self) -> grpc.aio.Channel:
        if self._channel is None or self._target != self.service.target:
            if self._channel is not None:
                self._old.append(self._channel)
            self._target = self.service.target
            self._channel = grpc.aio.insecure_channel(self._target)
        return self._channel

    async def close(self) -> None:
        for channel in [*self._old, self._channel]:
            if channel is not None:
                await channel.close()

    async def submit(self, ref_id: str, within_s: float = 60.0) -> str:
        """The accepted job's name; resent with the same ref_id while the service is away."""
        params = tasks_pb2.ImageToImageParams(
            positive_prompt=f"chaos {ref_id}",
            steps=self.steps,
            options=common_pb2.JobOptions(
                mode=common_pb2.RESPONSE_MODE_ASYNC,
                delivery=common_pb2.OUTPUT_DELIVERY_REFERENCES,
                ref_id=ref_id,
                tag=self.tag,
            ),
        )
        image = encode(quadrant_image(32, 32), "PNG")
        deadline = time.monotonic() + within_s
        while True:
            try:
                got = await generate(self.channel(), "ImageToImage", params, {"image": image})
                assert got.kinds == ["accepted"], got.kinds
                name = str(got.events[0].job)
                self.names[ref_id] = name
                return name
            except grpc.aio.AioRpcError as err:
                if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN):
                    raise
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def states(self) -> dict[str, job_pb2.Job]:
        """Every job of this client's tag by name (empty while the service is away)."""
        stub = job_service_pb2_grpc.JobServiceStub(self.channel())
        jobs: dict[str, job_pb2.Job] = {}
        token = ""
        try:
            while True:
                reply = await stub.ListJobs(
                    jpb.ListJobsRequest(tag=self.tag, page_size=1000, page_token=token),
                    timeout=10,
                )
                jobs.update((j.name, j) for j in reply.jobs)
                token = reply.next_page_token
                if not token:
                    return jobs
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            return {}

    async def wait_done(self, names: Iterable[str], within_s: float) -> dict[str, job_pb2.Job]:
        """The jobs once all of ``names`` ended, or as they are when ``within_s`` runs out."""
        wanted = set(names)
        deadline = time.monotonic() + within_s
        jobs: dict[str, job_pb2.Job] = {}
        while True:
            got = await self.states()
            jobs.update(got)
            if all(n in jobs and jobs[n].state in TERMINAL for n in wanted):
                return jobs
            if time.monotonic() > deadline:
                return jobs
            await asyncio.sleep(0.25)


def error_reason(job: job_pb2.Job) -> str:
    for detail in job.error.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return job.error.message or "UNKNOWN"


@dataclass
class Report:
    """What happened to the jobs of one scenario."""

    scenario: str
    submitted: int = 0
    succeeded: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    """Accepted, but unknown to the service or not ended when the scenario gave up."""
    run_twice: list[str] = field(default_factory=list)
    """Jobs whose prompt an agent completed more than once (not excused by a kill)."""
    seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        failed = dict(self.failed) or 0
        extra = "".join(f", {k} {v}" for k, v in self.notes.items())
        return (
            f"{self.scenario}: submitted {self.submitted}, succeeded {self.succeeded}, "
            f"failed {failed}, lost {len(self.lost)}, run twice {len(self.run_twice)} "
            f"({self.seconds:.1f} s{extra})"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "submitted": self.submitted,
            "succeeded": self.succeeded,
            "failed_by_reason": dict(self.failed),
            "lost": self.lost,
            "run_twice": self.run_twice,
            "seconds": round(self.seconds, 2),
            **self.notes,
        }


REPORTS: list[Report] = []
"""Every report of this test session, for the summary at its end."""


def tally(
    scenario: str,
    names: Iterable[str],
    jobs: Mapping[str, job_pb2.Job],
    agents: Iterable[Agent],
    started: float,
) -> Report:
    """The report of ``names`` (accepted jobs), from their final states and the prompt logs."""
    agents = list(agents)
    report = Report(scenario, seconds=time.monotonic() - started)
    names = list(names)
    report.submitted = len(names)
    for name in names:
        job = jobs.get(name)
        if job is None or job.state not in TERMINAL:
            report.lost.append(name)
        elif job.state == job_pb2.Job.STATE_SUCCEEDED:
            report.succeeded += 1
        else:
            report.failed[error_reason(job)] += 1
    kills = {a.name: a.kills for a in agents}
    ours = {n.removeprefix("jobs/") for n in names}
    entries = [e for e in read_logs(a.log for a in agents) if e.job in ours]
    successes: dict[str, list[LogEntry]] = {}
    for entry in entries:
        if entry.event == "success":
            successes.setdefault(entry.job, []).append(entry)
    succeeded = {(e.agent, e.prompt_id) for e in entries if e.event == "success"}
    # Prompts an agent started and never finished because it was killed: the chaos that bit.
    report.notes["prompts killed mid-run"] = sum(
        1
        for e in entries
        if e.event == "start"
        and (e.agent, e.prompt_id) not in succeeded
        and any(k >= e.t for k in kills.get(e.agent, []))
    )
    # A prompt that ended while no service watched it is queued again for its image frames
    # (its upstream nodes from ComfyUI's cache when still there): that success is not a run of
    # its own.
    repeated = {e.repeats for e in entries if e.event == "start" and e.repeats}
    report.notes["prompts repeated for their frames"] = len(repeated)
    for name in names:
        runs = successes.get(name.removeprefix("jobs/"), [])
        # Every success but the last must be excused by its agent dying right after it, or be
        # one whose frames were sent again.
        unexcused = [
            r
            for r in runs[:-1]
            if r.prompt_id not in repeated
            and not any(r.t <= k <= r.t + KILL_EXCUSE_S for k in kills.get(r.agent, []))
        ]
        if unexcused:
            report.run_twice.append(name)
    REPORTS.append(report)
    return report
