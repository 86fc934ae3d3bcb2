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
    enabled: bool = True

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"agent url must be http(s)://host:port, got {self.url!r}")
        if self.max_concurrent_jobs < 1:
            raise ValueError(f"agent {self.url}: max_concurrent_jobs must be at least 1")
        if not self.name:
            object.__setattr__(self, "name", parts.netloc)


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
    """Re-probe an online agent this often (picks up new models)."""
    backoff_initial_s: float = 1.0
    """First wait before re-probing an offline agent; doubles up to ``backoff_max_s``."""
    backoff_max_s: float = 60.0
    timeouts: ComfyTimeouts = field(default_factory=ComfyTimeouts)
