"""A TCP relay the tests can cut or black-hole: a database or object store "restarted" or
unreachable for a few seconds, for the processes that reach it through the relay only (the
machine's PostgreSQL is shared with other test runs and must not be restarted)."""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["TcpCut"]


class TcpCut:
    """Relays 127.0.0.1:``port`` to ``host:target_port``. :meth:`cut` drops every relayed
    connection and closes each new one at once (what clients see while a server restarts);
    :meth:`blackhole` drops every byte both ways, on the relayed connections and on new ones,
    which are accepted and never answered (a partition, or a host gone without a reset:
    only a client's own timeouts end its wait); :meth:`restore` relays new connections
    again. :meth:`lose_reply_to` lets a request through and loses its answer: the server
    did the work (committed), the client hears a reset instead of the reply. A connection
    black-holed stays so (its bytes were lost: its stream is broken), and its server side
    stays open, as a server that never heard of the partition keeps it (with whatever the
    session holds)."""

    def __init__(self, host: str, target_port: int) -> None:
        self._host = host
        self._target_port = target_port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0
        self.is_cut = False
        self.is_blackholed = False
        self._blackholed: set[asyncio.StreamWriter] = set()  # whose bytes are dropped
        self.swallowed = 0
        """Connections accepted while black-holed (the outage was met, not slept through)."""
        self.refused = 0
        """Connections closed at once while cut (the outage was met, not slept through)."""
        self._doom_marker: bytes | None = None
        self._doomed: set[asyncio.StreamWriter] = set()  # client sides whose reply is lost
        self.lost_replies = 0
        """Replies dropped by :meth:`lose_reply_to` (the fault happened)."""

    async def __aenter__(self) -> TcpCut:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._drop_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        self.is_cut = True
        self._drop_all()

    def blackhole(self) -> None:
        self.is_blackholed = True
        self._blackholed.update(self._writers)

    def lose_reply_to(self, marker: bytes) -> None:
        """The next request (a chunk the client sends) holding ``marker`` reaches the server;
        the server's reply to it is dropped and the connection reset, once."""
        self._doom_marker = marker

    def restore(self) -> None:
        self.is_cut = False
        self.is_blackholed = False

    def _drop_all(self) -> None:
        for writer in list(self._writers | self._blackholed):
            writer.transport.abort()  # a reset, as from a server that went away
        self._writers.clear()
        self._blackholed.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.is_cut:
            self.refused += 1
            writer.transport.abort()
            return
        if self.is_blackholed:
            self.swallowed += 1
            self._writers.add(writer)
            try:
                while await reader.read(65536):
                    pass  # never answered, never closed by us
            except OSError:
                pass
            finally:
                self._writers.discard(writer)
                writer.transport.abort()  # the client gave up on it
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self._host, self._target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer, client=writer),
            self._pipe(up_reader, writer),
            return_exceptions=True,
        )

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        client: asyncio.StreamWriter | None = None,
    ) -> None:
        """``client``: set on the client-to-server pipe (the side a lost reply resets)."""
        try:
            while data := await reader.read(65536):
                if writer in self._blackholed:
                    continue  # dropped: neither side hears from the other again
                if writer in self._doomed:
                    # The reply to the marked request: lost, and the connection with it.
                    self._doomed.discard(writer)
                    self.lost_replies += 1
                    writer.transport.abort()
                    break
                marker = self._doom_marker
                if client is not None and marker is not None and marker in data:
                    self._doom_marker = None
                    self._doomed.add(client)
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            if writer not in self._blackholed:  # a partition does not close the other side
                with contextlib.suppress(OSError, RuntimeError):
                    writer.transport.abort()
