"""Peak memory of one call, three ways depending on where the memory lives.

- NumPy: `tracemalloc` sees every array allocation (NumPy reports them to it), so the peak is
  exact for the arrays the call creates; it slows Python down, so it runs in a separate call
  from the timed ones.
- torch on CPU: its allocator is invisible to tracemalloc; the resident set size is sampled from
  /proc/self/statm every millisecond while the call runs, and the peak above the starting RSS is
  reported. Freed memory that glibc's malloc keeps for reuse would count as resident before the
  call and hide the call's own peak, so it is handed back first (`malloc_trim(0)`, where libc has it).
- CUDA: torch.cuda.max_memory_allocated after resetting the peak.
"""

from __future__ import annotations

import os
import threading
import tracemalloc
from typing import Callable

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return None


def max_rss_bytes() -> int:
    """The process's high-water RSS so far (resource.getrusage; kilobytes on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def tracemalloc_peak(fn: Callable[[], object]) -> int:
    """Bytes: the peak of traced allocations made during `fn()` above what was live before."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    try:
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return max(0, peak - base)


def release_free_memory() -> None:
    """Return malloc's free pages to the OS (glibc `malloc_trim(0)`); nothing where libc lacks it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_peak(fn: Callable[[], object], interval_s: float = 0.001) -> int | None:
    """Bytes: the sampled peak RSS during `fn()` above the RSS at its start (None without /proc)."""
    release_free_memory()
    base = rss_bytes()
    if base is None:
        fn()
        return None
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes() or 0)
            done.wait(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], rss_bytes() or 0)
    return peak[0] - base


def cuda_peak(fn: Callable[[], object], device: str) -> int:
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def peak_bytes(fn: Callable[[], object], kind: str, device: str = "cpu") -> dict:
    """{'method': ..., 'bytes': ...} for a numpy call (`kind='numpy'`) or a torch call."""
    if kind == "numpy":
        return {"method": "tracemalloc", "bytes": tracemalloc_peak(fn)}
    if device.startswith("cuda"):
        return {"method": "torch.cuda.max_memory_allocated", "bytes": cuda_peak(fn, device)}
    return {"method": "sampled RSS increase", "bytes": rss_peak(fn)}
