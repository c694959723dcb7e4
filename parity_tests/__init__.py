"""The parity harness: tolerances, comparison, hypothesis strategies and the tests.

This package (with `benchmarks/` and the console script) is the only place that imports both
trees. `parity_tests.oracle` is the API for checking your own implementation against the oracle.
"""
