"""Why a provider's attempt failed, as types the scheduler and the pool decide on.

The code that notices a failure names its :class:`Cause`; the cause says what the failure means
for the rest of the system, in three facts:

- ``reached_agent``: the attempt was handed to an agent and talked to it (work may exist there);
  False when no agent was chosen at all (none online, the provider closed).
- ``agent_lost``: the agent failed as a machine (unreachable, erroring, silent): take it out
  of rotation until a probe brings it back. An agent that forgot the prompt (it restarted) is
  not lost: it is back, and the job must simply run again.
- ``retryable``: another agent or provider, or a later attempt, may succeed with the same job.

Decisions read these facts, never ``reason`` or ``metadata`` strings (metadata still carries
``cause`` as text, for callers and logs).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence

from aiserver.errors import ErrorKind, FieldViolation, ServiceError

__all__ = ["Cause", "ProviderFailure", "ProviderUnavailable"]


class Cause(enum.Enum):
    """What went wrong in an attempt; ``value`` is the text put in ``metadata["cause"]``."""

    # No agent took the attempt.
    NO_AGENT = "no_agent"
    """No agent is online, capable and not yet tried."""
    PROVIDER_CLOSED = "provider_closed"
    """The provider is shutting down."""
    MODEL_LOAD = "model_load"
    """An embedded provider could not load its model."""
    # The agent failed: it is lost until a probe says otherwise.
    CONNECTION = "connection"
    """Connecting or talking to the agent failed (refused, reset)."""
    TIMEOUT = "timeout"
    """One HTTP request to the agent timed out."""
    SERVER_ERROR = "server_error"
    """The agent answered 5xx."""
    AUTH = "auth"
    """The agent (or its proxy) refused our credentials."""
    PROTOCOL = "protocol"
    """The agent answered something that is not ComfyUI's protocol."""
    WEBSOCKET = "websocket"
    """The websocket could not be opened, or was lost and not regained."""
    IDLE_TIMEOUT = "idle_timeout"
    """A running prompt went silent too long."""
    EXECUTION_TIMEOUT = "execution_timeout"
    """A running prompt took too long."""
    INCONSISTENT = "inconsistent"
    """The agent contradicted itself about our prompt."""
    CLIENT_CLOSED = "closed"
    """The transport to the agent was closed under a running attempt."""
    # The agent is fine, the attempt did not make it: another agent may do better.
    QUEUE_TIMEOUT = "queue_timeout"
    """The agent was too busy to start our prompt in time."""
    OUTPUT_MISSING = "output_missing"
    """An output file the agent reported could not be downloaded."""
    PROMPT_LOST = "prompt_lost"
    """The agent no longer knows our prompt (it restarted, or someone cleared its queue): it
    answers, so it is not lost; the job runs again, there or elsewhere."""
    SLOT_LAPSED = "slot_lapsed"
    """The run's shared slot on the agent was no longer firm (renewals failing) before a
    further prompt of an attempt that already ran one there: not queued; the job retries."""
    # The job itself failed on the agent: retrying elsewhere would fail the same way.
    PROMPT_REJECTED = "prompt_rejected"
    """The agent refused the workflow as invalid."""
    AGENT_LACKS = "agent_lacks"
    """The agent lacks a model or node type its last probe listed: probe it again."""
    EXECUTION_ERROR = "execution_error"
    """A node raised while running."""
    INTERRUPTED = "interrupted"
    """Someone interrupted the prompt on the agent."""

    @property
    def reached_agent(self) -> bool:
        return self not in _NO_AGENT

    @property
    def agent_lost(self) -> bool:
        return self in _AGENT_LOST

    @property
    def retryable(self) -> bool:
        return self not in _FINAL

    @property
    def agent_outdated(self) -> bool:
        """The agent's capabilities changed since its last probe."""
        return self is Cause.AGENT_LACKS


_NO_AGENT = frozenset({Cause.NO_AGENT, Cause.PROVIDER_CLOSED, Cause.MODEL_LOAD})
_AGENT_LOST = frozenset(
    {
        Cause.CONNECTION,
        Cause.TIMEOUT,
        Cause.SERVER_ERROR,
        Cause.AUTH,
        Cause.PROTOCOL,
        Cause.WEBSOCKET,
        Cause.IDLE_TIMEOUT,
        Cause.EXECUTION_TIMEOUT,
        Cause.INCONSISTENT,
        Cause.CLIENT_CLOSED,
    }
)
_FINAL = frozenset(
    {Cause.PROMPT_REJECTED, Cause.AGENT_LACKS, Cause.EXECUTION_ERROR, Cause.INTERRUPTED}
)


class ProviderFailure(ServiceError):
    """A failed attempt: a :class:`ServiceError` (what the caller sees) with its cause."""

    cause: Cause
    agent: str
    """The agent the attempt ran on; ``""`` when it never got one."""

    def __init__(
        self,
        kind: ErrorKind,
        reason: str,
        message: str,
        *,
        cause: Cause,
        agent: str = "",
        violations: Sequence[FieldViolation] = (),
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(kind, reason, message, violations, dict(metadata or {}))
        self.cause = cause
        self.agent = agent

    @property
    def reached_agent(self) -> bool:
        return self.cause.reached_agent and bool(self.agent)

    @property
    def agent_lost(self) -> bool:
        return self.cause.agent_lost and bool(self.agent)

    @property
    def retryable(self) -> bool:
        return self.cause.retryable

    @property
    def agent_outdated(self) -> bool:
        return self.cause.agent_outdated and bool(self.agent)


class ProviderUnavailable(ProviderFailure):
    """A retryable failure (UNAVAILABLE ``PROVIDER_UNAVAILABLE``): another agent or provider,
    or a later attempt, may succeed."""

    def __init__(
        self,
        message: str,
        *,
        cause: Cause,
        agent: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        if not cause.retryable:
            raise ValueError(f"{cause} is not retryable: raise a ProviderFailure")
        super().__init__(
            ErrorKind.UNAVAILABLE,
            "PROVIDER_UNAVAILABLE",
            message,
            cause=cause,
            agent=agent,
            metadata={"agent": agent, "cause": cause.value, **(metadata or {})},
        )
