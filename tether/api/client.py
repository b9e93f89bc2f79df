"""A typed client of `tether.v1.SessionService` that speaks `tether.model` types.

The generated stub (typed by `sessions_pb2_grpc.pyi`) speaks protobuf; this wrapper is what
the sidecar and tools use, so that protobuf stays at the edge. Status codes become
exceptions a caller can act on:
    NOT_FOUND            -> `SessionGoneError` (or None from `get_session`)
    FAILED_PRECONDITION  -> `ClaimLostError`
    anything else        -> the `grpc.aio.AioRpcError` itself
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import TypeAlias, cast

import grpc

from tether.api import convert
from tether.api.v1 import sessions_pb2 as pb
from tether.api.v1 import sessions_pb2_grpc as pb_grpc
from tether.model import (
    BatchAck,
    OwnerName,
    ReportBatch,
    SessionEvent,
    SessionId,
    SessionPage,
    SessionRecord,
)


class SessionGoneError(LookupError):
    """The session does not exist (never created, deleted or expired)."""


class ClaimLostError(RuntimeError):
    """A claim with an expected owner epoch found the session at another epoch."""


_ReportCall: TypeAlias = grpc.aio.StreamStreamCall[pb.ReportEventsRequest, pb.ReportEventsResponse]


class ReportStream:
    """One `ReportEvents` call: `send` batches, read acknowledgements (in batch order) from
    `acks()`; `done_writing` half-closes, after which `acks()` ends once all are in."""

    def __init__(self, call: _ReportCall) -> None:
        self._call = call

    async def send(self, batch: ReportBatch) -> None:
        await self._call.write(convert.batch_to_pb(batch))

    async def acks(self) -> AsyncIterator[BatchAck]:
        while True:
            msg = await self._call.read()
            if msg is grpc.aio.EOF:  # type: ignore[attr-defined]
                return
            # grpc-stubs types read() as `EOFType | T` with `EOFType = object`, which hides T.
            yield convert.ack_from_pb(cast("pb.ReportEventsResponse", msg))

    async def done_writing(self) -> None:
        await self._call.done_writing()

    def cancel(self) -> None:
        self._call.cancel()


class SessionClient:
    """Calls on an open `grpc.aio.Channel`; every unary call takes an optional timeout."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = pb_grpc.SessionServiceStub(channel)  # a SessionServiceAsyncStub

    def report_events(self) -> ReportStream:
        # None: no request iterator, the caller writes (grpc-stubs has no default for it).
        return ReportStream(self._stub.ReportEvents(None))

    async def get_session(
        self, session_id: SessionId, *, timeout: float | None = None
    ) -> SessionRecord | None:
        try:
            msg = await self._stub.GetSession(
                pb.GetSessionRequest(session_id=session_id), timeout=timeout
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return convert.session_from_pb(msg)

    async def list_sessions(
        self,
        *,
        owner: OwnerName | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> SessionPage:
        msg = await self._stub.ListSessions(
            pb.ListSessionsRequest(page_size=page_size, page_token=page_token, owner=owner or ""),
            timeout=timeout,
        )
        return convert.page_from_pb(msg)

    async def delete_session(
        self, session_id: SessionId, *, timeout: float | None = None
    ) -> SessionRecord:
        try:
            msg = await self._stub.DeleteSession(
                pb.DeleteSessionRequest(session_id=session_id), timeout=timeout
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise SessionGoneError(session_id) from e
            raise
        return convert.session_from_pb(msg.session)

    async def claim_session(
        self,
        session_id: SessionId,
        *,
        owner: OwnerName,
        expected_owner_epoch: int | None = None,
        timeout: float | None = None,
    ) -> SessionRecord:
        request = pb.ClaimSessionRequest(
            session_id=session_id, owner=owner, expected_owner_epoch=expected_owner_epoch or 0
        )
        try:
            msg = await self._stub.ClaimSession(request, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise SessionGoneError(session_id) from e
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise ClaimLostError(e.details()) from e
            raise
        return convert.session_from_pb(msg.session)

    async def watch_sessions(
        self, *, owner: OwnerName | None = None, positions: bool = True
    ) -> AsyncGenerator[SessionEvent, None]:
        """Session changes; `positions=False`: records without their streams (see
        `convert.session_from_pb`)."""
        call = self._stub.WatchSessions(pb.WatchSessionsRequest(owner=owner or ""))
        try:
            async for msg in call:
                yield convert.event_from_pb(msg, positions=positions)
        finally:
            call.cancel()
