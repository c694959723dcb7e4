import sys

from gpt_oracle.cli import main

sys.exit(main())
