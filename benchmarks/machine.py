"""Measure the machine before timing anything on it: peak GEMM rates and copy bandwidth.

Every "fraction of peak" in the report divides by a rate measured here, in the same run, not by
a datasheet number: a 2-core VM, an OpenBLAS that picked AVX2 kernels on an AVX-512 machine, or
a CPU without native bf16 all show up as they are.

- GEMM: C = A @ B with square n x n operands, 2 n^3 FLOPs, the best of a few repeats.
- bf16 on CPU: torch.matmul (A @ B) and F.linear (A @ W^T, the product bf16 autocast computes
  for every nn.Linear) on operands cast to bf16 beforehand, so that the timed call is the GEMM
  alone (autocast would cast both float32 operands inside every call: 4-12% of the time at
  n = 2048). The two can take different kernels (oneDNN vs a fallback: on CPUs without native
  bf16 they differ by more than 10x, and the fallback runs at about 1 GFLOP/s); both are
  recorded, the peak is the faster one. A kernel whose one call at n would take over
  BF16_MAX_CALL_S (estimated from one call at half the size) is timed at the largest size that
  fits: it is the slow fallback, not the peak, and `gemm_n_reduced` in the record names it.
- float32 on CPU: torch.matmul (MKL) and, where torch has it, oneDNN's linear
  (torch.ops.mkldnn._linear_pointwise, which torch_impl trains with on AMD CPUs with AVX-512,
  where it is the faster: torch_impl/device.py); both are recorded, the peak is the faster one.
- Copy bandwidth: np.copyto / Tensor.copy_ of a large buffer; bytes moved = 2 x size (read and
  write).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import Callable

ENV_PREFIXES = ("OPENBLAS_", "OMP_", "MKL_", "KMP_", "DNNL_", "ONEDNN_", "ATEN_", "GOTO_", "BLIS_", "VECLIB_",
                "TORCH_", "CUDA_VISIBLE_DEVICES", "NVIDIA_TF32_OVERRIDE", "PYTORCH_")


def _best_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None,
                  min_total_s: float = 0.0, max_repeats: int = 100,
                  clock: Callable[[], float] = time.perf_counter) -> float:
    """The fastest of at least `repeats` timed calls after one untimed call; with `min_total_s`,
    more calls (up to `max_repeats`) until the timed ones add up to that long, so that a short
    GEMM is not judged on a few milliseconds that one interruption can spoil."""
    fn()
    sync()
    best, spent, done = float("inf"), 0.0, 0
    while done < repeats or (spent < min_total_s and done < max_repeats):
        start = clock()
        fn()
        sync()
        dt = clock() - start
        best, spent, done = min(best, dt), spent + dt, done + 1
    return best


def cpu_info() -> dict:
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("unknown", "", "x86_64"):
                    model = value.strip()
                if key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx_vnni") if f in flags]
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"model": model, "machine": platform.machine(), "logical_cpus": os.cpu_count(), "usable_cpus": usable,
            "simd": simd, "platform": platform.platform()}


def library_versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in ("numpy", "torch", "tiktoken", "transformers", "safetensors", "matplotlib", "threadpoolctl"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "?")
        except ImportError:
            out[name] = None
    return out


def blas_info() -> dict:
    """NumPy's BLAS build, threadpoolctl's view of the loaded BLAS (if installed), torch's threading."""
    import numpy as np

    out: dict = {}
    try:
        deps = np.show_config(mode="dicts").get("Build Dependencies", {})
        out["numpy_blas"] = {k: deps.get("blas", {}).get(k) for k in ("name", "version", "openblas configuration")}
    except Exception as exc:  # noqa: BLE001 - older numpy: show_config has no dict mode
        out["numpy_blas"] = f"unavailable: {type(exc).__name__}"
    try:
        from threadpoolctl import threadpool_info

        out["threadpoolctl"] = [{k: d.get(k) for k in ("internal_api", "num_threads", "version", "architecture")}
                                for d in threadpool_info()]
    except ImportError:
        out["threadpoolctl"] = "not installed"
    try:
        import torch

        out["torch_threads"] = torch.get_num_threads()
        out["torch_interop_threads"] = torch.get_num_interop_threads()
        out["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        out["torch_mkldnn_bf16"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        out["torch_blas"] = "mkl" if torch.backends.mkl.is_available() else "other"
        from torch_impl.device import plan_runtime

        out["torch_impl_default_plan"] = plan_runtime("cpu").describe()
    except Exception as exc:  # noqa: BLE001 - torch missing or an older build
        out["torch"] = f"unavailable: {type(exc).__name__}: {exc}"
    out["env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)}
    return out


def numpy_gemm_rate(n: int, dtype: str, repeats: int = 3, min_total_s: float = 0.0) -> float:
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    out = np.empty((n, n), dtype=dtype)
    return 2 * n**3 / _best_seconds(lambda: np.matmul(a, b, out=out), repeats, min_total_s=min_total_s)


def torch_gemm_rate(n: int, dtype: str, device: str = "cpu", repeats: int = 3, linear: bool = False,
                    min_total_s: float = 0.0) -> float:
    """torch.matmul of n x n operands in `dtype` (created in that dtype before any call is timed);
    with `linear`, F.linear(a, w) = a @ w^T, the product nn.Linear (and bf16 autocast) computes."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, generator=g).to(device=device, dtype=getattr(torch, dtype))
    fn = (lambda: torch.nn.functional.linear(a, b)) if linear else (lambda: a @ b)
    with torch.no_grad():
        return 2 * n**3 / _best_seconds(fn, repeats, sync, min_total_s=min_total_s)


BF16_KERNELS = {"torch_bfloat16_matmul": False, "torch_bfloat16_linear": True}  # name -> F.linear?
BF16_MAX_CALL_S = 1.0  # a bf16 kernel whose one call at n would take longer is timed at a smaller n
BF16_FIRST_N = 256


def torch_bfloat16_rates(n: int, repeats: int = 3, min_total_s: float = 0.0,
                         rate: Callable[..., float] | None = None) -> tuple[dict, dict]:
    """(FLOP/s by kernel, the n of each kernel timed below `n`) for bf16 on the CPU: each kernel
    at n, best of `repeats`, on operands cast to bf16 beforehand. The size is reached by doubling
    from 256, one call at each size, and the doubling stops before a size whose call would take
    over BF16_MAX_CALL_S (8x the last call): on CPUs without native bf16 one kernel runs at about
    1 GFLOP/s, 17 s a call at n = 2048; it is then timed at the last size that fits."""
    rate = rate or torch_gemm_rate
    rates, reduced = {}, {}
    for name, linear in BF16_KERNELS.items():
        size = min(BF16_FIRST_N, n)
        while size < n:
            seconds = 2 * size**3 / rate(size, "bfloat16", repeats=1, linear=linear)
            bigger = min(2 * size, n)
            if seconds * (bigger / size) ** 3 > BF16_MAX_CALL_S:
                break
            size = bigger
        if size != n:
            reduced[name] = size
        rates[name] = rate(size, "bfloat16", repeats=repeats, linear=linear, min_total_s=min_total_s)
    return rates, reduced


def onednn_float32_rate(n: int, repeats: int = 3) -> float | None:
    """oneDNN's float32 linear on n x n operands (the weight a transposed view, as torch_impl
    passes it), or None where this torch has no oneDNN linear."""
    import torch

    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
    if op is None:
        return None
    g = torch.Generator(device="cpu").manual_seed(0)
    a, w = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    with torch.no_grad():
        return 2 * n**3 / _best_seconds(lambda: op(a, w.T, None, "none", [], ""), repeats)


def numpy_copy_bandwidth(megabytes: int, repeats: int = 3) -> float:
    """Bytes/s of np.copyto on a `megabytes` buffer (read + write counted)."""
    import numpy as np

    n = megabytes * 2**20 // 8
    src = np.ones(n)
    dst = np.empty_like(src)
    return 2 * src.nbytes / _best_seconds(lambda: np.copyto(dst, src), repeats)


def torch_copy_bandwidth(megabytes: int, device: str, repeats: int = 3) -> float:
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    src = torch.ones(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _best_seconds(lambda: dst.copy_(src), repeats, sync)


def measure_rates(quick: bool = False, device: str = "cpu", progress: Callable[[str], None] = lambda s: None,
                  reduced: dict | None = None) -> tuple[dict, dict]:
    """(GEMM FLOP/s by name, copy bandwidth in bytes/s by name); `reduced` receives the n of any
    bf16 kernel timed below the others' n (torch_bfloat16_rates)."""
    n = 768 if quick else 2048
    rates: dict[str, float] = {}
    progress("machine: numpy GEMM")
    rates["numpy_float32_gemm"] = numpy_gemm_rate(n, "float32")
    rates["numpy_float64_gemm"] = numpy_gemm_rate(n, "float64")
    progress("machine: torch GEMM")
    rates["torch_float32_gemm"] = torch_gemm_rate(n, "float32")
    onednn = onednn_float32_rate(n)
    if onednn is not None:
        rates["torch_float32_onednn_linear"] = onednn
    rates["torch_float64_gemm"] = torch_gemm_rate(n, "float64")
    bf16, bf16_reduced = torch_bfloat16_rates(n)
    rates.update(bf16)
    if reduced is not None:
        reduced.update(bf16_reduced)
    progress("machine: copy bandwidth")
    bandwidth = {"numpy_copy": numpy_copy_bandwidth(64 if quick else 512),
                 "torch_cpu_copy": torch_copy_bandwidth(64 if quick else 512, "cpu")}
    if device.startswith("cuda"):

        progress("machine: CUDA GEMM and bandwidth")
        nc = 4096 if quick else 8192
        from torch_impl.device import tf32_matmuls

        with tf32_matmuls(False):
            rates["cuda_float32_gemm"] = torch_gemm_rate(nc, "float32", device, repeats=5)
        with tf32_matmuls(True):
            rates["cuda_tf32_gemm"] = torch_gemm_rate(nc, "float32", device, repeats=5)
        rates["cuda_bfloat16_gemm"] = torch_gemm_rate(nc, "bfloat16", device, repeats=5)
        bandwidth["cuda_copy"] = torch_copy_bandwidth(1024, device, repeats=5)
    return rates, bandwidth


def peaks_from(rates: dict, bandwidth: dict) -> dict:
    """The rates the report divides by, one per precision (and the copy bandwidth)."""
    peaks = {
        "numpy_float32": rates["numpy_float32_gemm"],
        "numpy_float64": rates["numpy_float64_gemm"],
        "torch_float32": max(rates["torch_float32_gemm"], rates.get("torch_float32_onednn_linear", 0.0)),
        "torch_float64": rates["torch_float64_gemm"],
        "torch_bfloat16": max(rates[k] for k in BF16_KERNELS),
        "copy_bandwidth": max(bandwidth["numpy_copy"], bandwidth["torch_cpu_copy"]),
    }
    if "cuda_float32_gemm" in rates:
        peaks.update(cuda_float32=rates["cuda_float32_gemm"], cuda_tf32=rates["cuda_tf32_gemm"],
                     cuda_bfloat16=rates["cuda_bfloat16_gemm"], cuda_copy_bandwidth=bandwidth["cuda_copy"])
    return peaks


PEAK_NOW_REPEATS = 5  # best of at least 5 calls ...
PEAK_NOW_MIN_S = 0.3  # ... and of at least 0.3 s of timed calls per kernel


def peak_now(name: str, quick: bool = False) -> float | None:
    """One CPU peak measured again now (the kernels and sizes measure_rates uses), or None for a
    name this does not re-measure. Used before skipping a backend on a peak that another tenant's
    load may have lowered at the start of the run, and beside each step that a target divides by
    a peak (head_to_head.step_against_peak). A measurement stands alone there (it is the pair's
    GEMM rate), so it is the best of PEAK_NOW_REPEATS calls and of PEAK_NOW_MIN_S of calls at
    least: one interrupted call cannot lower it."""
    n = 768 if quick else 2048
    if name in ("numpy_float32", "numpy_float64"):
        return numpy_gemm_rate(n, name.removeprefix("numpy_"), repeats=PEAK_NOW_REPEATS, min_total_s=PEAK_NOW_MIN_S)
    if name == "torch_bfloat16":
        return max(torch_bfloat16_rates(n, repeats=PEAK_NOW_REPEATS, min_total_s=PEAK_NOW_MIN_S)[0].values())
    return None


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: another process competing for the cores shows here."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def measure(quick: bool = False, device: str = "cpu", progress: Callable[[str], None] = lambda s: None) -> dict:
    """Everything about the machine; `peaks` holds the rates the report divides by."""
    load = load_average()
    reduced: dict = {}
    rates, bandwidth = measure_rates(quick, device, progress, reduced)
    cuda = None
    if device.startswith("cuda"):
        import torch

        props = torch.cuda.get_device_properties(device)
        cuda = {"name": props.name, "memory_gb": props.total_memory / 1e9, "capability": f"{props.major}.{props.minor}",
                "cuda": torch.version.cuda}
    return {"cpu": cpu_info(), "cuda": cuda, "libraries": library_versions(), "blas": blas_info(),
            "gemm_n": 768 if quick else 2048, "gemm_n_reduced": reduced, "gemm_flops_per_s": rates,
            "bandwidth_bytes_per_s": bandwidth,
            "peaks": peaks_from(rates, bandwidth), "load_average_at_start": load}


def remeasure(info: dict, quick: bool, device: str, progress: Callable[[str], None] = lambda s: None) -> dict:
    """Measure the peaks again at the end of the run; keep the higher of each (a core busy with
    someone else's work at one of the two moments lowers only that one), and record both."""
    reduced: dict = {}
    rates, bandwidth = measure_rates(quick, device, progress, reduced)
    info["gemm_n_reduced_at_end"] = reduced
    start, end = dict(info["peaks"]), peaks_from(rates, bandwidth)
    info["peaks_at_start"], info["peaks_at_end"] = start, end
    info["peaks"] = {k: max(start[k], end.get(k, 0.0)) for k in start}
    info["load_average_at_end"] = load_average()
    info["peak_drift"] = {k: end[k] / start[k] - 1.0 for k in start if start[k] and k in end}
    return info


# The widest matrix units a CPU has, most capable first: CPUs of one model name differ in these
# (the same "AMD EPYC" name has come with AVX2 only and with AVX-512 BF16), and they decide
# which precision is fast, so a results folder named after the CPU names them too.
SIMD_TIERS = (("amx_tile", "amx"), ("avx512_bf16", "avx512-bf16"), ("avx512f", "avx512"), ("avx2", "avx2"))


def short_name(info: dict) -> str:
    """A directory-safe machine name, e.g. 'amd-epyc-avx2-2c', 'intel-xeon-amx-2c' or 'nvidia-h100'."""
    if info.get("cuda"):
        base = info["cuda"]["name"]
    else:
        cpu = info["cpu"]
        model = cpu["model"]
        for noise in ("(R)", "(TM)", "(tm)", " Processor", " CPU"):
            model = model.replace(noise, "")
        tier = next((name for flag, name in SIMD_TIERS if flag in cpu.get("simd", ())), None)
        tail = f"{tier}-{cpu['usable_cpus']}c" if tier else f"{cpu['usable_cpus']}c"
        return f"{_slug(model)[:40 - len(tail) - 1].strip('-')}-{tail}"  # the model name cut, never the tail
    return _slug(base)[:40]


def _slug(text: str) -> str:
    """Lower case, runs of anything but letters and digits as one '-'."""
    keep = "".join(ch.lower() if ch.isalnum() else "-" for ch in text)
    return "-".join(part for part in keep.split("-") if part)
