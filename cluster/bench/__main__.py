"""`python -m cluster.bench ...`: the bench without the rest of the hpcserve CLI."""

import sys

from cluster.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
