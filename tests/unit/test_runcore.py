"""The compiled run core (sidecar/_runcore.c) against its pure-Python twins (sidecar.runcore).

Property tests hand both the same regions, near misses included (sidecar.runcore rule 1):
shapes one field away from a run, blank-line slips, ids at the length limit, ids that need
encoding, non-ASCII, `%` in every formatted part. The bulk path as a whole is held to the
event path on each core in test_sse, test_tracker, test_stream_core and the fuzz target.
"""

from __future__ import annotations

import subprocess
import sys
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import runcore

C = runcore.compiled()
PY = runcore.PYTHON
SETTINGS = settings(max_examples=1000, deadline=None)


def test_this_installation_built_the_compiled_core() -> None:
    """`pip install` builds it wherever there is a C compiler (scripts/test.sh makes sure of
    one), and the default setting takes it."""
    assert C is not None, "sidecar._runcore was not built: is a C compiler installed?"
    assert runcore._choose("auto") is C
    assert runcore.name(C) == "c"
    assert runcore.name(PY) == "python"


_ID = st.one_of(
    st.integers(0, 10**6).map(str),
    st.sampled_from(["a:7", "x.y", "-", "x" * 3, "x" * 4]),  # 4: past a small max_id
    st.text(st.characters(codec="utf-8", exclude_characters="\n\r\x00"), min_size=1, max_size=5),
)
_DATA = st.sampled_from(
    ['{"result":{}}', "x", "é" * 3, "%s", "a b", '{"jsonrpc":"2.0","method":"notifications/p"}']
)
_NEAR_MISSES = [
    "id: ",
    "id: a\x00b",
    "id:x",
    "id: ~t",
    "id:  sp",
    "id: sp ",
    "id: \x7f",
    "id: ü",
    "data: ",
    "data:x",
    "data: é",
    "event: other",
    "event: message",
    "event:message",
    ": comment",
    "retry: 5",
    "",
]


@st.composite
def regions(draw: st.DrawFn) -> bytes:
    """Blocks of one plain shape, then a few slips, each in one block or in every block: a
    line replaced by a near miss, a line added or dropped, a missing or extra blank line, a
    trailing LF."""
    fields = draw(
        st.permutations(
            draw(
                st.sampled_from(
                    [["data"], ["id", "data"], ["id", "event", "data"], ["event", "data"]]
                )
            )
        )
    )

    def line(field: str) -> str:
        if field == "id":
            return f"id: {draw(_ID)}"
        if field == "data":
            return f"data: {draw(_DATA)}"
        return "event: message"

    blocks = [[line(f) for f in fields] for _ in range(draw(st.integers(0, 10)))]
    for _ in range(draw(st.integers(0, 3))):
        if not blocks:
            break
        near = draw(st.sampled_from(_NEAR_MISSES))
        how = draw(st.sampled_from(["replace", "insert", "drop"]))
        targets = (
            range(len(blocks)) if draw(st.booleans()) else [draw(st.integers(0, len(blocks) - 1))]
        )
        at = draw(st.integers(0, len(fields) - 1))
        for b in targets:
            if how == "replace" and at < len(blocks[b]):
                blocks[b][at] = near
            elif how == "insert":
                blocks[b].insert(at, near)
            elif blocks[b]:
                del blocks[b][min(at, len(blocks[b]) - 1)]
    sep = draw(st.sampled_from(["\n\n", "\n\n", "\n\n", "\n", "\n\n\n"]))
    text = sep.join("\n".join(b) for b in blocks)
    if not draw(st.integers(0, 9)):
        text += draw(st.sampled_from(["\n", "\n\n", "x"]))
    return text.encode()


@SETTINGS
@given(regions(), st.sampled_from([3, 2048]))
def test_scan_run_agrees_with_the_python_twin(region: bytes, max_id: int) -> None:
    assert C is not None
    assert C.scan_run(region, max_id) == PY.scan_run(region, max_id)


def test_scan_run_takes_what_servers_send() -> None:
    """A positive control for the property test: regions the sampled shapes rarely hit."""
    assert C is not None
    sdk = b"\n\n".join(b"id: s:%d\nevent: message\ndata: {}" % k for k in range(3))
    found = C.scan_run(sdk, 2048)
    assert found == ([b"data: {}"] * 3, ["s:0", "s:1", "s:2"], False, True)
    assert found == PY.scan_run(sdk, 2048)
    note = b'data: {"jsonrpc":"2.0","method":"notifications/x"}'
    assert C.scan_run(note + b"\n\n" + note, 2048) == ([note, note], None, True, True)
    for bad in (b"", b"data: x\n", b"data: x\n\n", b"data: x\n\n\ndata: y", b"id: 1\n\nid: 2"):
        assert C.scan_run(bad, 2048) is None, bad
        assert PY.scan_run(bad, 2048) is None, bad
    long_id = b"id: " + b"7" * 2048 + b"\ndata: x"
    assert C.scan_run(long_id, 2048) == ([b"data: x"], ["7" * 2048], False, True)
    assert C.scan_run(long_id, 2047) == ([b"data: x"], ["7" * 2048], False, False)


_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\n"), max_size=12)


@SETTINGS
@given(
    st.binary(max_size=20).map(lambda b: b"id: %" + b.replace(b"\n", b"")),
    st.integers(0, 2**62),
    st.booleans(),
    st.lists(st.tuples(_TEXT, _TEXT), max_size=20),
    st.sampled_from([b"", b".7", b".%d", b".~abc"]),
    st.integers(0, 2**40),
)
def test_format_run_agrees_with_the_python_twin(  # noqa: PLR0917 - hypothesis draws
    prefix: bytes,
    seq: int,
    with_ids: bool,
    events: list[tuple[str, str]],
    suffix: bytes,
    total: int,
) -> None:
    assert C is not None
    ids = [i for i, _ in events] if with_ids else None
    data = [b"data: " + d.encode() for _, d in events]
    got = C.format_run(prefix, seq, ids, data, suffix, total)
    assert got == PY.format_run(prefix, seq, ids, data, suffix, total)
    payloads, cumulative = got
    assert cumulative[0] == total
    assert len(cumulative) == len(data) + 1
    assert cumulative[-1] == total + sum(map(len, payloads))


def test_bad_arguments_raise_as_the_twin_does() -> None:
    assert C is not None
    with pytest.raises(ValueError, match="as many ids"):
        C.format_run(b"p", 0, ["1"], [b"data: a", b"data: b"], b"", 0)
    with pytest.raises(ValueError, match="zip"):
        PY.format_run(b"p", 0, ["1"], [b"data: a", b"data: b"], b"", 0)
    with pytest.raises(TypeError):
        C.format_run(b"p", 0, [b"1"], [b"data: a"], b"", 0)  # type: ignore[list-item]
    with pytest.raises(TypeError):
        C.scan_run("data: x", 2048)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seq"):
        C.format_run(b"p", -1, None, [b"data: a"], b"", 0)
    with pytest.raises(OverflowError):  # rule 5 of the C module: raised, never wrapped around
        C.format_run(b"p", 0, None, [b"data: a"], b"", 2**63 - 3)


def test_neither_function_leaks() -> None:
    """Rule 2 and 4 of the C module: a region that fails late frees what it built; results
    are freed with their last reference. 20,000 calls leave no memory behind."""
    assert C is not None
    late_miss = b"\n\n".join(b"id: %d\ndata: x" % k for k in range(50)) + b"\n\nid: 9\ndata: "
    good = b"\n\n".join(b"id: %d\ndata: x" % k for k in range(50))
    ids = [str(k) for k in range(50)]
    data = [b"data: x"] * 50

    def work() -> None:
        for _ in range(5000):
            C.scan_run(late_miss, 2048)
            C.scan_run(good, 2048)
            C.format_run(b"id: p.1.", 7, ids, data, b"", 0)
            C.format_run(b"id: p.1.", 7, None, data, b".c", 0)

    work()  # warm: free lists, interned ints
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        work()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert after - before < 64 * 1024, f"{after - before} bytes left after 20,000 calls"


HIDE_C = """
import importlib.abc, runpy, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "sidecar._runcore":
            raise ImportError("not built")
sys.meta_path.insert(0, Hide())
sys.argv[0] = "tether"
runpy.run_module("tether.cli", run_name="__main__")
"""
"""`tether ARGV` as if the install had built no C module."""


def _sidecar(*flags: str, hide_c: bool = False) -> subprocess.Popen[str]:
    program = ["-c", HIDE_C] if hide_c else ["-m", "tether.cli"]
    return subprocess.Popen(
        [
            *(sys.executable, *program, "sidecar", "--listen", "127.0.0.1:0"),
            *("--upstream", "http://127.0.0.1:9/mcp", "--log-level", "INFO", *flags),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )


def _said_core(proc: subprocess.Popen[str]) -> str:
    """The run core a starting sidecar says it runs; the sidecar is stopped."""
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "run core:" in line:
                return line.split("run core: ", 1)[1].split(",", 1)[0].strip()
        pytest.fail("the sidecar never said which run core it runs")
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_the_sidecar_runs_the_core_asked_for_and_falls_back_without_c() -> None:
    """Rule 2: C by default; the twins on request, or where no C module was built (a build
    without a compiler still works); `--run-core c` without it refuses to start."""
    assert _said_core(_sidecar()) == "c"
    assert _said_core(_sidecar("--run-core", "python")) == "python"
    assert _said_core(_sidecar(hide_c=True)) == "python"
    proc = _sidecar("--run-core", "c", hide_c=True)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    said = "tether sidecar: --run-core c: the compiled run core (sidecar._runcore) is not built"
    assert said in err
    assert "Traceback" not in err
