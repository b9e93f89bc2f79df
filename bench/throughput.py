"""Kept for old habits: `python -m bench.throughput` is `python -m bench --only paths`.

The harness (`python -m bench`, see `bench/harness.py`) measures throughput and latency of
direct, nginx and sidecar paths in one run; extra arguments are passed on.
"""

from __future__ import annotations

import sys

from bench.harness import main

if __name__ == "__main__":
    sys.exit(main(["--only", "paths", *sys.argv[1:]]))
