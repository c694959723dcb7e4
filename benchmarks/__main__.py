"""`python -m benchmarks [--quick] ...`: the same as `gpt-oracle bench`."""

import sys

from gpt_oracle.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
