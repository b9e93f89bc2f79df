"""The compiled parts of the build (everything else is in pyproject.toml).

- The run core, `sidecar._runcore` (sidecar/_runcore.c), always: the bulk path's per-event
  loops in C (issue 16). It is optional in the build's sense: without a C compiler the
  install still succeeds, and `sidecar.runcore` falls back to its pure-Python twins.
- `TETHER_MYPYC=1 pip install --no-build-isolation .` (with mypy installed) also compiles
  sidecar/sse.py and sidecar/tracker.py with mypyc: the same code, faster on the event path.
  Without the variable those stay pure Python, which editable development installs must be (a
  compiled module would shadow the source being edited).
"""

from __future__ import annotations

import os
from typing import Any

from setuptools import Extension, setup

COMPILED = ["sidecar/sse.py", "sidecar/tracker.py"]

ext_modules: list[Any] = [
    Extension(
        "sidecar._runcore",
        ["sidecar/_runcore.c"],
        optional=True,
        extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra"],
    )
]
if os.environ.get("TETHER_MYPYC") == "1":
    from mypyc.build import mypycify

    ext_modules += mypycify(COMPILED, opt_level="3")

setup(ext_modules=ext_modules)
