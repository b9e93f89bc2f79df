"""Outside probes (issue 11 residuals) against a real control plane over TLS with a JWKS and
a policy, made as in `test_authz`. Each test showed one defect when written, fixed since;
its failing assertion is marked "Fixed"."""

from __future__ import annotations

import base64
import dataclasses
import logging
import uuid
from pathlib import Path

import grpc
import pytest

from controlplane.server import start_control_plane
from tests.controlplane.conftest import cp_config
from tests.integration.test_authz import Planes, Setup, client, code_of, planes, setup
from tests.support.tokens import TokenIssuer, write_token
from tether.api.v1 import sessions_pb2 as pb
from tether.api.v1 import sessions_pb2_grpc
from tether.model import SessionId

__all__ = ["planes", "setup"]

ATTEMPTS = 40


async def test_distinct_unknown_kids_do_not_multiply_refusal_log_lines(
    setup: Setup, planes: Planes, caplog: pytest.LogCaptureFixture
) -> None:
    """One caller sends tokens signed under many made-up key ids. Every call is refused
    (right), but the refusal log key is the error text, which quotes the `kid`: each new kid
    is a new key of the limiter and writes its own line, so the log grows with the attack."""
    cp = await planes()
    caplog.set_level(logging.WARNING, logger="tether")
    for i in range(ATTEMPTS):
        forger = TokenIssuer(kid=f"forged-{i}-{uuid.uuid4().hex[:6]}")
        token = write_token(setup.tmp / f"forged-{i}", forger.token("sidecar-a"))
        async with client(setup, cp, token=token) as c:
            assert await code_of(c.get_session(SessionId("s1"), timeout=5)) == (
                grpc.StatusCode.UNAUTHENTICATED
            )
    lines = [r for r in caplog.records if "unauthenticated call" in r.getMessage()]
    assert lines, "the refusals are logged at all"
    # A rate-limited log writes a bounded number of lines per interval, whatever the kids.
    assert len(lines) <= 5, f"{len(lines)} lines for {ATTEMPTS} refusals"  # Fixed


async def test_refused_claims_over_the_owner_limit_do_not_each_write_a_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One caller at its `--max-sessions-per-owner` limit claims one session after another:
    each claim is refused (right, RESOURCE_EXHAUSTED), and each writes its own WARNING line,
    unthrottled, unlike every other refusal of the control plane (service rule 2)."""
    config = dataclasses.replace(cp_config(tmp_path / "sessions.db"), max_sessions_per_owner=1)
    cp = await start_control_plane(config)
    caplog.set_level(logging.WARNING, logger="controlplane")
    try:
        async with grpc.aio.insecure_channel(cp.address) as channel:
            stub = sessions_pb2_grpc.SessionServiceStub(channel)
            call = stub.ReportEvents(None)
            owners = [("a0", "pod-a")] + [(f"b{i}", f"pod-b{i}") for i in range(ATTEMPTS)]
            sessions = [pb.Session(session_id=s, owner=o, owner_epoch=1) for s, o in owners]
            await call.write(
                pb.ReportEventsRequest(
                    batch_id=1, upserts=[pb.SessionUpsert(session=s) for s in sessions]
                )
            )
            ack = await call.read()
            assert isinstance(ack, pb.ReportEventsResponse)
            assert not ack.rejections
            await call.done_writing()
            for i in range(ATTEMPTS):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.ClaimSession(
                        pb.ClaimSessionRequest(session_id=f"b{i % 2}", owner="pod-a")
                    )
                assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await cp.stop(grace=0.5)
    lines = [r for r in caplog.records if "refused" in r.getMessage()]
    # As the other rejections (service rule 2): the first five in full, then one summary.
    assert len(lines) <= 6, f"{len(lines)} lines for {ATTEMPTS} refused claims"


async def test_distinct_malformed_tokens_do_not_multiply_refusal_log_lines(
    setup: Setup, planes: Planes, caplog: pytest.LogCaptureFixture
) -> None:
    """No key needed: a JWT header that is not JSON is refused with PyJWT's parse error,
    which names the column where parsing stopped. Padding the header by one space per call
    makes every error text, hence every limiter key, new: one log line per call."""
    cp = await planes()
    caplog.set_level(logging.WARNING, logger="controlplane")
    for i in range(ATTEMPTS):
        header = base64.urlsafe_b64encode(b'{"a":1' + b" " * i + b"x}").rstrip(b"=").decode()
        token = write_token(setup.tmp / f"garbage-{i}", f"{header}.e30.c2ln")
        async with client(setup, cp, token=token) as c:
            assert await code_of(c.get_session(SessionId("s1"), timeout=5)) == (
                grpc.StatusCode.UNAUTHENTICATED
            )
    lines = [r for r in caplog.records if "unauthenticated call" in r.getMessage()]
    assert lines, "the refusals are logged at all"
    assert len(lines) <= 5, f"{len(lines)} lines for {ATTEMPTS} refusals"  # Fixed
