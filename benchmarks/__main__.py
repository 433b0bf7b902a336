"""`python -m benchmarks ...`: the driver (benchmarks/run.py)."""

import sys

from benchmarks.run import main

sys.exit(main())
