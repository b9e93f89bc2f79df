"""A loopback TCP relay whose live connections can be cut: a network blip on demand."""

from __future__ import annotations

import asyncio
import contextlib

from tether.tasks import cancel_and_wait, spawn


class Relay:
    """Forwards 127.0.0.1:<port> to a target; `cut()` drops every open connection at once."""

    def __init__(
        self, target_host: str, target_port: int, *, opened: asyncio.Event | None = None
    ) -> None:
        self.target = (target_host, target_port)
        self.opened = opened
        """When given, connections are held (accepted, nothing forwarded) until it is set:
        a path that is slow to come up."""
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Relay:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        await cancel_and_wait(*self._tasks)
        await self._server.wait_closed()

    def cut(self) -> None:
        """Abort every open connection (both directions), like a dropped network path."""
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.opened is not None:
            await self.opened.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        a = spawn(pipe(reader, up_writer), name="relay-up")
        b = spawn(pipe(up_reader, writer), name="relay-down")
        await run_pair(a, b, (writer, up_writer), writers=self._writers, tasks=self._tasks)


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy one direction until EOF or a broken connection."""
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


async def run_pair(
    a: asyncio.Task[None],
    b: asyncio.Task[None],
    ends: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    *,
    writers: set[asyncio.StreamWriter],
    tasks: set[asyncio.Task[None]],
) -> None:
    """Run both directions of a proxied connection; once one ends (EOF, error or a cut),
    drop both sides: a half-closed proxied connection is of no use to these clients."""
    tasks.update((a, b))
    await asyncio.wait([a, b], return_when=asyncio.FIRST_COMPLETED)
    for w in ends:
        w.transport.abort()
        writers.discard(w)
    await cancel_and_wait(a, b)
    tasks.difference_update((a, b))
