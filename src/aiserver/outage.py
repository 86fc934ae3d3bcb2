"""Failures that mean a shared backend (the PostgreSQL job store, the S3 blob store) cannot be
reached right now, told apart from bugs: a call that meets one answers UNAVAILABLE with a
retry hint (the client retries, maybe on another coordinator), not INTERNAL.

The drivers are looked up in ``sys.modules`` only: the embedded default never loads them,
and an exception of a driver that is not loaded cannot be one of its errors.
"""

from __future__ import annotations

import errno
import socket
import sys

from aiserver.errors import ErrorKind, ServiceError

__all__ = ["RETRY_AFTER_S", "BackendBusy", "backend_outage"]

RETRY_AFTER_S = 1.0
"""The retry hint: a restarting database or store is usually back within seconds."""


class BackendBusy(RuntimeError):
    """A backend answered but could not serve in time (a migration behind another session's
    lock): for a call that meets it, the same as the backend being away."""


_NETWORK_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ETIMEDOUT,
        errno.EPIPE,
    }
)


def backend_outage(exc: BaseException) -> ServiceError | None:
    """UNAVAILABLE ``STORE_UNAVAILABLE`` when ``exc`` (or what it was raised from) is a lost
    or refused connection to the job database or the blob store; else None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _is_outage(current):
            return ServiceError(
                ErrorKind.UNAVAILABLE,
                "STORE_UNAVAILABLE",
                "the job database or artifact store cannot be reached; retry shortly",
                retry_after_s=RETRY_AFTER_S,
            )
        # What it was raised from; what it was raised while handling only if not
        # suppressed (a bug in an ``except`` clause for a lost connection is still a bug).
        current = current.__cause__ or (
            None if current.__suppress_context__ else current.__context__
        )
    return None


def _is_outage(exc: BaseException) -> bool:
    if isinstance(
        exc, BackendBusy | ConnectionError | socket.gaierror
    ):  # gaierror: the host's name
        return True
    if isinstance(exc, TimeoutError) and _raised_in(exc, "asyncpg"):
        # The store's bound on a statement or a connect (``database_timeout_s``): a database
        # that drops packets never answers nor refuses. Our own timeouts are not outages.
        return True
    if type(exc) is OSError:
        # asyncio's connect to a host with several addresses raises a bare OSError
        # ("Multiple exceptions: ..."), without an errno.
        return exc.errno in _NETWORK_ERRNOS or str(exc).startswith("Multiple exceptions")
    asyncpg = sys.modules.get("asyncpg")
    if asyncpg is not None and isinstance(
        exc,
        (
            # Subclasses of the classes below that a bug (a malformed message) or a
            # statement timeout raise: not the server being away.
            asyncpg.exceptions.ProtocolViolationError,
            asyncpg.exceptions.QueryCanceledError,
        ),
    ):
        return False
    if asyncpg is not None and isinstance(
        exc,
        (
            asyncpg.PostgresConnectionError,  # class 08: the connection is gone or refused
            asyncpg.exceptions.OperatorInterventionError,  # 57: shutting down, starting up
            asyncpg.exceptions.ConnectionDoesNotExistError,
        ),
    ):
        return True
    if asyncpg is not None and isinstance(exc, asyncpg.exceptions.InternalClientError):
        # A statement on a connection the server just ended (a restart, an admin): asyncpg's
        # protocol meets the connection mid-teardown, "cannot switch to state 12; another
        # operation (2) is in progress".
        return str(exc).startswith("cannot switch to state")
    if asyncpg is not None and isinstance(exc, asyncpg.InterfaceError):
        # The pool's "connection is closed" / "pool is closing" while a server restarts, and
        # a proxy the pool took back when its connection closed ("released back to the pool").
        text = str(exc)
        return "closed" in text or "closing" in text or "released back to the pool" in text
    botocore = sys.modules.get("botocore.exceptions")
    return botocore is not None and isinstance(
        exc, (botocore.ConnectionError, botocore.HTTPClientError)
    )


def _raised_in(exc: BaseException, package: str) -> bool:
    """Whether ``exc`` came up through ``package``'s code (its traceback)."""
    tb = exc.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        if isinstance(module, str) and (module == package or module.startswith(package + ".")):
            return True
        tb = tb.tb_next
    return False
