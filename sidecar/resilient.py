"""The I/O of issue #13: re-issuing safe requests, and listen streams that outlive the upstream.

The decisions live in sans-IO cores: which requests are safe to send twice
(`sidecar.reissue`), when and how long to wait (`sidecar.reconnect`), what a listen stream's
client is sent (`sidecar.listen`). This module is the thin loop around them.

Rules:
1. A request is sent again only while no byte of its answer has reached the client: after a
   connection that failed (refused, reset, a connect timeout), an answer of 502/503/504, or an
   answer stream that broke or ended before its first event. No response headers within
   `--upstream-response-timeout` is not retried (the server may be working on it).
2. Re-issues follow the reconnect policy (`--reconnect-*`): backoff with jitter, a
   `Retry-After` as the floor, given up after its attempts or its time. Then the client gets
   what the last attempt got: the upstream's answer, or the sidecar's own 502.
3. A request waiting to be re-issued counts as waiting for the upstream
   (`--max-upstream-requests`), so an outage cannot pile up unbounded waiters.
4. An answer to a re-issuable request is held until its first event (or, not a stream, until
   it is whole), for at most `COMMIT_HOLD` seconds and `HOLD_BYTES` bytes; then it goes out
   exactly as the upstream sent it. Past either bound it goes out as it is, and is no longer
   re-issued (rule 1). An answer that breaks after that cuts the client's connection short.
5. A listen stream (`sidecar.listen`) is listened again while the drain has not begun and the
   client is there, within the reconnect policy; after `KEEPALIVE_S` of silence, the upstream
   quiet or gone, the client gets a comment. Giving up ends the client's stream without a
   response, which the revision defines as an unexpected disconnect: the client listens again.
6. An upstream listen counts as progress (the reconnect policy starts afresh) only when it
   lasted `LISTEN_STABLE_S` after being acknowledged: a server that acknowledges and dies over
   and over is a failing server, given up on within the policy, not listened to forever.
7. A stop gives up every wait to re-issue at once: the waiting requests get their answer (the
   last attempt's, or the sidecar's 502) instead of holding the stop up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from sidecar.config import SidecarConfig
from sidecar.headers import cut_short, error_response, is_sse
from sidecar.listen import ListenKeeper
from sidecar.metrics import Metrics
from sidecar.reconnect import GiveUp, Outcome, ReconnectPolicy
from sidecar.reissue import RETRY_STATUSES, Call, ToolHints
from sidecar.sse import SSEEvent, SSEParser
from sidecar.upstream import (
    UPSTREAM_ERRORS,
    Upstream,
    UpstreamTimeoutError,
    describe_upstream_error,
)
from tether.logthrottle import ThrottledLog

log = logging.getLogger("tether.sidecar.resilient")

COMMIT_HOLD = 5.0
"""Rule 4: longest wait for an answer's first event before it goes out as it is. Well under
common idle timeouts of balancers in front (60 s), and the SDK servers' first keep-alive (15 s)."""
HOLD_BYTES = 64 * 1024
"""Rule 4: most bytes held before an answer's first event."""
KEEPALIVE_S = 15.0
"""Rule 5: longest silence on a listen stream, upstream quiet or gone, before a comment."""
LISTEN_STABLE_S = 10.0
"""Rule 6: an upstream listen that lasted this long after its acknowledgement was progress."""
MAX_REFUSAL = 1 << 20
"""Most bytes of a non-stream answer to a re-issued listen (a refusal) read."""

HeadersFor = Callable[[aiohttp.ClientResponse], CIMultiDict[str]]
"""The client's response headers for an upstream answer (hop-by-hop dropped)."""


class SidecarStoppingError(aiohttp.ClientConnectionError):
    """Rule 7: a request was to be sent again, but the sidecar is stopping."""

    def __str__(self) -> str:
        return "the sidecar is stopping"


class _Broken(Exception):
    """An attempt failed before any byte reached the client (rule 1)."""


@dataclass(eq=False)
class _ListenLink:
    """A live listen, for the drain and the stop to end."""

    upstream: aiohttp.ClientResponse | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)


class Lesson:
    """What a `tools/list` answer teaches (`sidecar.reissue` rule 2), read as it passes: each
    event of a stream, or a JSON answer once whole (kept up to `--max-event-bytes`)."""

    def __init__(self, owner: Resilient, path: str, *, sse: bool) -> None:
        self._hints = owner.hints
        self._path = path
        self._max = owner.config.max_event_bytes
        self._parser = SSEParser(max_event_bytes=self._max) if sse else None
        self._kept: list[bytes] | None = [] if not sse else None
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        if self._parser is not None:
            for item in self._parser.feed(chunk):
                if isinstance(item, SSEEvent) and item.data:
                    self._hints.learn_answer(item.data, self._path)
        elif self._kept is not None:
            self._kept.append(chunk)
            self._size += len(chunk)
            if self._size > self._max:
                self._kept = None  # too large to learn from: nothing kept

    def end(self) -> None:
        if self._kept:
            self._hints.learn_answer(b"".join(self._kept), self._path)


class Resilient:
    """Re-issues and kept listens for one sidecar's upstream."""

    def __init__(self, config: SidecarConfig, metrics: Metrics, upstream: Upstream) -> None:
        self.config = config
        self.metrics = metrics
        self.upstream = upstream
        self.hints = ToolHints()
        self.warnings = ThrottledLog(log)
        """Per-request warnings, summarised when they flood (`tether.logthrottle`)."""
        """What this upstream's `tools/list` results said (`sidecar.reissue` rule 2)."""
        self._listens: set[_ListenLink] = set()
        self._stopping = asyncio.Event()
        """Rule 7."""

    # -- sending -------------------------------------------------------------------------

    async def send(
        self,
        request: web.Request,
        headers: CIMultiDict[str],
        body: bytes | None,
        *,
        reissue: bool,
        policy: ReconnectPolicy | None = None,
    ) -> aiohttp.ClientResponse:
        """Send the request; when `reissue`, again after failures (rules 1-3). Raises what the
        last attempt raised."""
        policy = policy or ReconnectPolicy(self.config.reconnect)
        while True:
            try:
                resp = await self.upstream.request(
                    request.method, request.path_qs, headers=headers, data=body
                )
            except UpstreamTimeoutError:
                raise
            except UPSTREAM_ERRORS as exc:
                if not reissue or not await self._wait(policy, request, str(exc), None):
                    raise
                continue
            if not reissue or resp.status not in RETRY_STATUSES:
                return resp
            retry_after = _retry_after_ms(resp.headers.get("Retry-After"))
            why = f"upstream answered {resp.status}"
            waited = await self._wait(policy, request, why, retry_after, holding=resp)
            if waited is None:
                return resp  # rule 2: the last attempt's answer
            if not waited:
                raise SidecarStoppingError  # rule 7, with that answer already let go

    async def _wait(
        self,
        policy: ReconnectPolicy,
        request: web.Request,
        why: str,
        retry_ms: int | None,
        *,
        holding: aiohttp.ClientResponse | None = None,
    ) -> bool | None:
        """Rule 2: wait before the next attempt (letting go of `holding`, the failed answer,
        first): True to go on; None when given up before the wait (`holding` still usable);
        False when the sidecar began to stop during it (rule 7)."""
        decision = policy.next(
            Outcome.FAILED, now=asyncio.get_running_loop().time(), retry_ms=retry_ms
        )
        if self._stopping.is_set():
            decision = GiveUp("the sidecar is stopping")
        if isinstance(decision, GiveUp):
            log.warning(
                "%s %s: not sent again: %s (%s)", request.method, request.path, why, decision.reason
            )
            return None
        if holding is not None:
            holding.release()
        log.info(
            "%s %s: %s; sending it again in %.2fs (attempt %d)",
            request.method,
            request.path,
            why,
            decision.delay,
            decision.attempt,
        )
        self.metrics.reissues.inc()
        self.upstream.waiting += 1  # rule 3
        try:
            # The wait is the span; the attempt after it is the next upstream client span.
            with (
                self.upstream.tracing.span(
                    "tether.reissue",
                    {
                        "tether.reissue.attempt": decision.attempt,
                        "tether.reissue.reason": why,
                        "tether.reissue.delay_s": decision.delay,
                    },
                ),
                contextlib.suppress(TimeoutError),
            ):
                async with asyncio.timeout(decision.delay):
                    await self._stopping.wait()
        finally:
            self.upstream.waiting -= 1
        return not self._stopping.is_set()

    # -- an answer held until its first event ----------------------------------------------

    async def relay(
        self,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        *,
        headers: CIMultiDict[str],
        body: bytes | None,
        call: Call,
        headers_for: HeadersFor,
    ) -> web.StreamResponse:
        """Answer a re-issuable request (rule 4), sending it again while its answer breaks
        before any of it reached the client. Owns `resp`."""
        policy = ReconnectPolicy(self.config.reconnect)
        learn = call.method == "tools/list"
        while True:
            try:
                return await self._relay_once(request, resp, headers_for, learn=learn)
            except _Broken as broken:
                resp.release()
                if not await self._wait(policy, request, str(broken), None):
                    return _unanswered(str(broken))
            try:
                resp = await self.send(request, headers, body, reissue=True, policy=policy)
            except UpstreamTimeoutError as exc:
                return _unanswered(f"upstream timed out: {exc}", status=504)
            except UPSTREAM_ERRORS as exc:
                return _unanswered(f"upstream unreachable: {describe_upstream_error(exc)}")

    async def _relay_once(
        self,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        headers_for: HeadersFor,
        *,
        learn: bool,
    ) -> web.StreamResponse:
        """Rule 4: hold the answer until it is whole (not a stream) or has its first event (a
        stream), within `COMMIT_HOLD` and `HOLD_BYTES`; `_Broken` if it broke before."""
        try:
            sse = is_sse(resp.status, resp.headers.get("Content-Type", ""))
            lesson = Lesson(self, request.path, sse=sse) if learn and resp.status == 200 else None
            parser = SSEParser(max_event_bytes=self.config.max_event_bytes) if sse else None
            held: list[bytes] = []
            size = 0
            deadline = asyncio.get_running_loop().time() + COMMIT_HOLD
            whole = ready = False
            try:
                while not ready and size < HOLD_BYTES:
                    try:
                        async with asyncio.timeout_at(deadline):
                            chunk = await resp.content.readany()
                    except TimeoutError:
                        break  # out it goes as it is, no longer re-issued
                    if not chunk:
                        if sse:
                            raise _Broken("upstream answer stream ended before its first event")
                        whole = ready = True
                        break
                    held.append(chunk)
                    size += len(chunk)
                    if lesson is not None:
                        lesson.feed(chunk)
                    if parser is not None:
                        ready = any(isinstance(e, SSEEvent) and e.data for e in parser.feed(chunk))
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                raise _Broken(f"upstream answer broke before any of it was sent: {exc}") from exc
            out = web.StreamResponse(
                status=resp.status, reason=resp.reason, headers=headers_for(resp)
            )
            await out.prepare(request)
            await out.write(b"".join(held))
            if whole or await self._pipe_rest(request, resp, out, lesson):
                if lesson is not None:
                    lesson.end()
                await out.write_eof()
            return out
        finally:
            resp.release()

    async def _pipe_rest(
        self,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        out: web.StreamResponse,
        lesson: Lesson | None,
    ) -> bool:
        """The rest of an answer, chunk by chunk as it arrives; False (the client's
        connection cut short) when the upstream's broke."""
        try:
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
                if lesson is not None:
                    lesson.feed(chunk)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            body_broke(self.warnings, request, exc)
            return False
        return True

    # -- listen streams --------------------------------------------------------------------

    def stop(self) -> None:
        """Rule 7, and every listen ended."""
        self._stopping.set()
        self.end_listens()

    def end_listens(self) -> None:
        """End every listen stream for its client (a drain, a stop): no listening again."""
        for link in self._listens:
            link.stop.set()
            if link.upstream is not None:
                end_upstream(link.upstream)

    async def listen(
        self,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        *,
        headers: CIMultiDict[str],
        body: bytes | None,
        call: Call,
        headers_for: HeadersFor,
        stopping: Callable[[], bool],
    ) -> web.StreamResponse:
        """Serve a `subscriptions/listen` answer, listening again whenever the upstream's ends
        without a response (rule 5, `sidecar.listen`). Owns `resp`."""
        if not is_sse(resp.status, resp.headers.get("Content-Type", "")):
            try:  # not a stream: the server's answer (a refusal), as it is
                return await self._relay_once(request, resp, headers_for, learn=False)
            except _Broken as broken:
                return _unanswered(str(broken))
        assert call.request_id is not None
        out = web.StreamResponse(status=resp.status, reason=resp.reason, headers=headers_for(resp))
        listening = _Listening(
            owner=self,
            request=request,
            out=out,
            keeper=ListenKeeper(call.request_id, call.params, self.config.max_event_bytes),
            policy=ReconnectPolicy(self.config.reconnect),
            headers=headers,
            body=body,
            stopping=stopping,
        )
        self._listens.add(listening.link)
        try:
            await out.prepare(request)
            reply: aiohttp.ClientResponse | None = resp
            while reply is not None:
                if await listening.relay(reply):
                    break
                reply = await listening.listen_again()
            await out.write_eof()  # after a response, or given up: ended without one (rule 5)
            return out
        finally:
            resp.release()
            self._listens.discard(listening.link)


@dataclass
class _Listening:
    """One client's listen stream: its upstream listens, one after the other (rule 5)."""

    owner: Resilient
    request: web.Request
    out: web.StreamResponse
    keeper: ListenKeeper
    policy: ReconnectPolicy
    headers: CIMultiDict[str]
    body: bytes | None
    stopping: Callable[[], bool]
    link: _ListenLink = field(default_factory=_ListenLink)

    def stopped(self) -> bool:
        return self.stopping() or self.link.stop.is_set()

    async def relay(self, resp: aiohttp.ClientResponse) -> bool:
        """Relay one upstream listen; True when the client's stream is over (its response
        went out, or a drain ended it), False when the upstream's ended without one."""
        path = self.request.path
        self.link.upstream = resp
        self.keeper.opened()
        opened = asyncio.get_running_loop().time()
        if self.stopped():
            end_upstream(resp)
        try:
            if not is_sse(resp.status, resp.headers.get("Content-Type", "")):
                answer = await resp.content.read(MAX_REFUSAL)
                await self.out.write(self.keeper.answer_as_event(answer))
                return True
            while True:
                try:  # a keep-alive of the sidecar's own on a quiet upstream (rule 5)
                    async with asyncio.timeout(KEEPALIVE_S):
                        chunk = await resp.content.readany()
                except TimeoutError:
                    await self.out.write(self.keeper.keepalive(upstream=True))
                    continue
                if not chunk:
                    break
                fed = self.keeper.feed(chunk)
                if fed.out:
                    await self.out.write(fed.out)
                if fed.done:
                    return True
                if fed.too_many:
                    log.warning("%s: too many subscriptions to refetch; listen ended", path)
                    return True
                if fed.broken is not None:
                    log.warning("%s: upstream listen stream unreadable: %s", path, fed.broken)
                    break
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            log.info("%s: upstream listen stream broke: %s", path, describe_upstream_error(exc))
        finally:
            self.link.upstream = None
            resp.release()
        lasted = asyncio.get_running_loop().time() - opened
        if self.keeper.acked_this_listen and lasted >= LISTEN_STABLE_S:
            self.policy.progress()  # rule 6
        return self.stopped()

    async def listen_again(self) -> aiohttp.ClientResponse | None:
        """Rule 5: wait (with keep-alives) and listen again until an upstream answers with a
        stream or the policy gives up; None to end the client's stream."""
        loop = asyncio.get_running_loop()
        path = self.request.path
        await self.out.write(self.keeper.keepalive())
        why = "the upstream listen ended without a response"
        while not self.stopped():
            decision = self.policy.next(Outcome.FAILED, now=loop.time(), retry_ms=None)
            if isinstance(decision, GiveUp):
                log.warning("%s: listen not sent again: %s (%s)", path, why, decision.reason)
                return None
            log.info("%s: %s; listening again in %.2fs", path, why, decision.delay)
            with self.owner.upstream.tracing.span(
                "tether.relisten",
                {"tether.reissue.reason": why, "tether.reissue.delay_s": decision.delay},
            ):
                await self._pause(decision.delay)
            if self.stopped():
                return None
            self.owner.metrics.relistens.inc()
            try:
                resp = await self.owner.upstream.request(
                    self.request.method, self.request.path_qs, headers=self.headers, data=self.body
                )
            except UPSTREAM_ERRORS as exc:
                why = f"upstream unreachable: {describe_upstream_error(exc)}"
                continue
            if resp.status in RETRY_STATUSES:
                why = f"upstream answered {resp.status}"
                resp.release()
                continue
            return resp
        return None

    async def _pause(self, delay: float) -> None:
        """Wait `delay` seconds, or until stopped; a keep-alive every `KEEPALIVE_S`."""
        loop = asyncio.get_running_loop()
        wake = loop.time() + delay
        while (left := wake - loop.time()) > 0 and not self.link.stop.is_set():
            try:
                async with asyncio.timeout(min(left, KEEPALIVE_S)):
                    await self.link.stop.wait()
            except TimeoutError:
                if wake - loop.time() > 0:
                    await self.out.write(self.keeper.keepalive())


def body_broke(warnings: ThrottledLog, request: web.Request, exc: BaseException) -> None:
    """An answer's upstream body broke after some of it went out: say so (throttled) and cut
    the client's connection short, so the truncated answer never reads as a whole one."""
    warnings.log(
        ("upstream body broke",),
        "answers whose upstream body broke",
        logging.WARNING,
        "%s %s: upstream body broke: %s",
        request.method,
        request.path,
        describe_upstream_error(exc),
    )
    cut_short(request)


def end_upstream(resp: aiohttp.ClientResponse) -> None:
    """End an upstream stream for its reader (what it sent so far is read, then EOF) and close
    its connection first: it is mid-body and must not go back to the pool, where the next
    request would read those bytes as its answer."""
    if resp.connection is not None:
        resp.connection.close()
    resp.content.feed_eof()


def _retry_after_ms(value: str | None) -> int | None:
    """A `Retry-After` in seconds (the HTTP-date form is not worth a clock here)."""
    if value is None or not value.strip().isdigit():
        return None
    return min(int(value.strip()), 3600) * 1000


def _unanswered(why: str, *, status: int = 502) -> web.Response:
    log.warning("re-issuable request not answered: %s", why)
    return error_response(status, why)
