"""Facts about the RPC being served, shared by the interceptor, ``@rpc`` and the servicers.

The interceptor (:mod:`aiserver.api.guard`) sets :data:`current_call` when a call is admitted;
it lives in the task that runs the handler, so the servicer sees it too. It is the one way a
servicer learns whose call it serves (:func:`owner`, :func:`scope`, :func:`is_admin`): nothing
is injected. Without the interceptor (servicers built directly, as some tests do) every caller
is the open-mode principal: owner ``""``, an admin.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

from aiserver.auth import OPEN, Principal

__all__ = [
    "STREAM_STALLED",
    "CallInfo",
    "current_call",
    "current_principal",
    "is_admin",
    "owner",
    "scope",
]


STREAM_STALLED = "STREAM_STALLED"
"""The reason of a server stream ended because its client took no message for the idle time
(:mod:`aiserver.api.stalls`): the caller stopped reading, it did not leave."""


@dataclass(slots=True)
class CallInfo:
    method: str
    """``Service/Method`` (without the package)."""
    request_id: str
    peer: str
    principal: Principal = OPEN
    code: str = "OK"
    """How the call ended: a ``google.rpc.Code`` name."""
    reason: str = ""
    """``ErrorInfo.reason`` of a failed call."""

    def failed(self, code: str, reason: str) -> None:
        self.code, self.reason = code, reason

    @property
    def stalled(self) -> bool:
        """Ended by the server because its client stopped reading."""
        return self.reason == STREAM_STALLED


current_call: contextvars.ContextVar[CallInfo | None] = contextvars.ContextVar(
    "aiserver_call", default=None
)


def current_principal() -> Principal:
    info = current_call.get()
    return OPEN if info is None else info.principal


def owner() -> str:
    """The owner of what this call creates: the API key's id (``""`` in open mode)."""
    return current_principal().id


def is_admin() -> bool:
    return current_principal().admin


def scope() -> str | None:
    """The owner whose resources this call may touch; None: any (admins)."""
    principal = current_principal()
    return None if principal.admin else principal.id
