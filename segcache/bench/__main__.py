"""``python -m segcache.bench WORKLOAD ...``: the bench commands without the top-level CLI."""

import sys

from segcache.bench.cli import main

sys.exit(main())
