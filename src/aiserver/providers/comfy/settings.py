"""What the ComfyUI pool is told: its agents, how it watches them, how long a run may take.

The app's configuration (:mod:`aiserver.config`) reads these types from the environment and
files; the pool never imports the app's settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

__all__ = ["AgentSettings", "ComfyTimeouts", "PoolSettings"]


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """One ComfyUI agent."""

    url: str
    """Base URL, e.g. ``http://gpu-1:8188``."""
    name: str = ""
    """Name shown to operators; defaults to the URL's host and port."""
    api_key: str = field(default="", repr=False)
    """Sent as ``Authorization: Bearer`` when set (ComfyUI behind an auth proxy)."""
    priority: int = 0
    """Breaks ties between equally loaded agents: higher first."""
    max_concurrent_jobs: int = 1
    """Jobs sent to this agent at once; more wait in the service's queue."""
    queue_ahead: int = 1
    """Jobs sent beyond ``max_concurrent_jobs``, to wait in ComfyUI's own queue: the agent
    starts the next prompt the moment one ends instead of idling while the service uploads
    and queues it (ComfyUI runs one prompt at a time: ``max_concurrent_jobs=1, queue_ahead=1``,
    the default, keeps it busy; 0 turns it off). A job waiting there can still be cancelled
    (deleted from the agent's queue) and re-attached; it is placed only when no agent has
    fewer jobs."""
    enabled: bool = True

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"agent url must be http(s)://host:port, got {self.url!r}")
        if self.max_concurrent_jobs < 1:
            raise ValueError(f"agent {self.url}: max_concurrent_jobs must be at least 1")
        if self.queue_ahead < 0:
            raise ValueError(f"agent {self.url}: queue_ahead must be 0 or more")
        if not self.name:
            object.__setattr__(self, "name", parts.netloc)

    @property
    def slots(self) -> int:
        """Jobs the pool sends to this agent at once: running and queued ahead."""
        return self.max_concurrent_jobs + self.queue_ahead


@dataclass(frozen=True, slots=True)
class ComfyTimeouts:
    """How long to wait for an agent, per phase. Seconds.

    The transport (:class:`~aiserver.providers.comfy.client.ComfyClient`) takes ``connect_s``
    and ``request_s``; the rest bound a run, which the pool hands them to.
    """

    connect_s: float = 5.0
    """TCP connect and websocket handshake."""
    request_s: float = 60.0
    """One HTTP request, uploads and downloads included."""
    queue_wait_s: float = 900.0
    """A queued prompt may wait this long for ComfyUI to start it."""
    execution_s: float = 1800.0
    """From the start of execution to its end."""
    idle_s: float = 180.0
    """Longest silence from a running prompt (one CPU sampler step was seen to take 9 s)."""
    poll_s: float = 5.0
    """After this much websocket silence, ask over HTTP how the prompt is doing."""
    reconnect_s: float = 30.0
    """Budget for getting a dropped websocket back."""
    backoff_initial_s: float = 0.1
    """First wait between websocket reconnect attempts; doubles up to ``backoff_max_s``."""
    backoff_max_s: float = 2.0
    cancel_s: float = 5.0
    """Budget for deleting or interrupting the remote prompt when a run is abandoned."""


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """How the pool watches its agents and bounds their runs."""

    probe_interval_s: float = 30.0
    """Re-probe an online agent this often (``/system_stats``: is it there)."""
    probe_timeout_s: float = 10.0
    """Longest wait for ``/system_stats`` before the agent counts as offline. Not
    ``timeouts.request_s`` (60 s, sized for large uploads and downloads): a hung agent (a
    ComfyUI stopped or wedged: its TCP open, nothing answers) would stay online that long,
    taking new jobs and keeping its running ones. ComfyUI answers it from its event loop,
    not the thread running a prompt, within milliseconds even mid-run. The catalogue
    (``/object_info``, megabytes) keeps ``request_s``."""
    catalogue_interval_s: float = 60.0
    """Re-read an online agent's ``/object_info`` (new models, nodes) this often; at once when
    it comes back online, reports another version, drops its websocket or lacks what a run
    asked for. That catalogue costs the agent ~140 ms of CPU per read (a plain ComfyUI 0.8,
    590 KB; more with custom nodes) and the service tens of ms to parse."""
    backoff_initial_s: float = 1.0
    """First wait before re-probing an offline agent; doubles up to ``backoff_max_s``."""
    backoff_max_s: float = 60.0
    timeouts: ComfyTimeouts = field(default_factory=ComfyTimeouts)
    outputs_over_websocket: bool = False
    """Take output images from the websocket (``SaveImageWebsocket``) where the agent has it:
    no file left in its ``output/``, no ``/view`` per image. The service turns it on
    (``agent_outputs_over_websocket``); off, outputs are saved files fetched with ``/view``."""
    reuse_input_names: bool = False
    """Upload inputs under names the next job overwrites once this one has ended, so the
    agent's ``input/`` holds only the jobs in flight (:mod:`.input_names`). The service turns
    it on (``agent_reuse_input_names``); off, every job leaves its inputs behind."""

    def __post_init__(self) -> None:
        if self.probe_timeout_s <= 0:
            raise ValueError(f"probe_timeout_s must be positive, got {self.probe_timeout_s}")
