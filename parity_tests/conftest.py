"""pytest set-up: the hypothesis profile (see profiles.py) and the CUDA skip."""

from __future__ import annotations

import pytest

from parity_tests.profiles import load_default_profile

load_default_profile()


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
