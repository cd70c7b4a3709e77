"""`python -m whiskypay.cli`: the same as the `whiskypay` console script."""

import sys

from whiskypay.cli import main

sys.exit(main())
