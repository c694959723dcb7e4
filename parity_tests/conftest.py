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


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny models: one torch thread is fastest, and on a busy 2-core machine
    several threads spin against each other (10-20x slower). Restored after the module.
    Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
