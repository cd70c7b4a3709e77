"""`python -m bench`: run the benchmarks (see bench/suite.py and BENCHMARKS.md)."""

import sys

from bench.suite import main

sys.exit(main())
