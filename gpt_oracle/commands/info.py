"""`gpt-oracle info`: placeholder until its issue lands; it says so and fails."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise SystemExit("gpt-oracle info is not built yet")
