"""gpt-oracle: the command-line entry point and the packaged data files.

This package imports neither tree at import time; each subcommand imports what it needs.
"""

__version__ = "0.1.0"
