"""`sidecar.heap`: buffers of a socket read's size are reused, not mapped afresh each time.

Counted in page faults (not time): each of 300 rounds makes and frees three buffers of about
256 KiB, as the relay of one fast chunk does. With glibc's defaults each is a fresh mapping,
so every round faults in all of their pages again (about 190); kept in the heap, only the
first rounds do.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from sidecar import heap

ROUNDS = """
import resource, sys
from sidecar import heap
said = heap.keep_large_buffers() if sys.argv[1] == "keep" else "untouched"
a, b = b"x" * 200_000, b"y" * 62_000
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(300):
    c = a + b
    d = c[:-10]
    e = b"".join([d, a])
    del c, d, e
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, said)
"""

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")


def faults(how: str, **env: str) -> tuple[int, str]:
    out = subprocess.run(
        [sys.executable, "-c", ROUNDS, how],
        env={k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_"))} | env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split(" ", 1)
    return int(out[0]), out[1].strip()


def test_large_buffers_are_reused_from_the_heap() -> None:
    kept, said = faults("keep")
    assert said == "large buffers kept (mmap threshold 1 MiB, trim 4 MiB)"
    assert kept < 2_000, f"{kept} page faults in 300 rounds"
    untouched, _ = faults("untouched")
    assert untouched > 10 * kept, (untouched, kept)  # what the setting saves here


def test_an_operators_malloc_settings_win() -> None:
    for env in (
        {"MALLOC_TRIM_THRESHOLD_": "131072"},
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"},
    ):
        _, said = faults("keep", **env)
        assert said == "as the environment sets it", env
    assert heap.TRIM_THRESHOLD <= 4 << 20  # rule 3: what stays mapped is bounded
