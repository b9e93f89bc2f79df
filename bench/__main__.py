"""`python -m bench`: the whole benchmark harness (see `bench/harness.py`, `BENCHMARKS.md`)."""

import sys

from bench.harness import main

sys.exit(main())
