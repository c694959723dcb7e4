"""Hypothesis profiles.

- `ci`: derandomized (the same examples every run), few examples, no deadline. Loaded when the
  `CI` environment variable is set.
- `dev`: the default for local runs; random, more examples.
- `thorough`: hundreds of examples per property, for a long soak before a release.

Pick one without editing code: `pytest --hypothesis-profile=thorough` or
`HYPOTHESIS_PROFILE=thorough pytest`.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

settings.register_profile("ci", derandomize=True, max_examples=12, print_blob=True, **_COMMON)
settings.register_profile("dev", max_examples=30, **_COMMON)
settings.register_profile("thorough", max_examples=300, **_COMMON)


def default_profile() -> str:
    """`HYPOTHESIS_PROFILE` if set, else `ci` under CI, else `dev`."""
    if os.environ.get("HYPOTHESIS_PROFILE"):
        return os.environ["HYPOTHESIS_PROFILE"]
    return "ci" if os.environ.get("CI") else "dev"


def load_default_profile() -> str:
    name = default_profile()
    settings.load_profile(name)
    return name
