"""Where and how the model runs: device, precision, TF32, torch.compile, and which was chosen.

`plan_runtime()` picks the fastest path that is still correct for the device it finds and
returns a `RuntimePlan` that says what it picked (`plan.describe()`); every choice can be
overridden by argument. Nothing here reads environment variables: the numerics of a run are
decided by the code that asks for the plan.

Defaults, per device:

| device | parameters | autocast | TF32 matmuls | torch.compile | attention (SDPA) |
| --- | --- | --- | --- | --- | --- |
| CUDA, compute capability >= 8.0 | float32 | bfloat16 | on | on | flash / memory-efficient |
| CUDA, older | float32 | float16 (needs a GradScaler to train) | off (no TF32 units) | on | memory-efficient |
| MPS | float32 | off | n/a | off | MPS kernel |
| CPU | float32 | off (bf16 is slower without AMX/AVX-512 BF16) | n/a | off (compile time dominates small runs) | CPU flash kernel |

float64 (`precision="fp64"`) is for tight parity checks against the NumPy oracle, never speed.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn.utils.parametrize  # noqa: F401 (stored_tensor)

PRECISIONS = ("auto", "fp32", "fp64", "bf16", "fp16", "tf32")


def choose_device(preferred: str | torch.device | None = None) -> torch.device:
    """`preferred` if given (checked to exist), else CUDA, else MPS, else the CPU."""
    if preferred is not None:
        device = torch.device(preferred)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {preferred!r} was asked for but CUDA is not available")
        if device.type == "mps" and not _mps_available():
            raise ValueError(f"device {preferred!r} was asked for but MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def _mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX-512 BF16: the CPUs where bf16 GEMMs beat float32 ones. Asked of torch.cpu's
    feature tests (private, present across the 2.x releases): torch.backends.cpu.get_cpu_capability()
    names only the vector width ("AVX2", "AVX512", ...), never AMX or BF16."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool((amx is not None and amx()) or (avx512_bf16 is not None and avx512_bf16()))


def cpu_vendor() -> str:
    """The CPU's vendor id from /proc/cpuinfo ("GenuineIntel", "AuthenticAMD", ...), "" where it
    cannot be read (not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id":
                    return value.strip()
    except OSError:
        pass
    return ""


def stored_tensor(module: torch.nn.Module, name: str) -> torch.Tensor:
    """module's tensor `name` as stored, for its device and dtype: a parametrized one's original,
    which is not computed (the parametrization runs at every read of the attribute itself)."""
    if torch.nn.utils.parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, name)


def onednn_fp32_products() -> bool:
    """Whether float32 training products on this CPU go through oneDNN instead of MKL: an AMD CPU
    with AVX-512. MKL, torch's BLAS, does not take its AVX-512 kernels on AMD CPUs (its verbose
    banner names no AVX-512 there), while oneDNN does (ONEDNN_VERBOSE: brg_matmul:avx512_core).
    Measured on a 2-core AMD EPYC with AVX-512 (Zen 4), GPT-2 small, B*T = 256: the block's
    products 11-37% faster forward and 3-19% for dx (two probes), a whole training step 0.912x
    the time (median of 10 alternating pairs). On an Intel CPU MKL already runs AVX-512 (oneDNN ran the forward shapes
    2% slower to 14% faster on a Xeon with AMX), and on an AVX2-only AMD CPU whole steps with
    oneDNN were 3% slower: MKL stays there. Decided from the hardware, so a run and its resume
    take the same kernels, and from `torch.backends.mkldnn.enabled` at each call: a user who turns
    oneDNN off gets MKL."""
    return torch.backends.mkldnn.enabled and _onednn_pays_here()


@functools.cache
def _onednn_pays_here() -> bool:
    """The hardware half of onednn_fp32_products, asked once per process."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
    return (op is not None and torch.backends.cpu.get_cpu_capability() == "AVX512"
            and cpu_vendor() == "AuthenticAMD")


_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


try:  # functorch's introspection (private, but stable across the 2.x releases)
    from torch._C._functorch import (TransformType, get_unwrapped, is_batchedtensor, is_functionaltensor,
                                     is_gradtrackingtensor)
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
except ImportError:  # a torch without them has no vmap either
    retrieve_all_functorch_interpreters = None


def under_vmap() -> bool:
    """Whether a torch.func.vmap transform is active (at any level). Outside every transform this
    is one C call (about 0.1 us)."""
    if not _functorch_active() or retrieve_all_functorch_interpreters is None:
        return False
    return any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())


def under_forward_ad() -> bool:
    """Whether forward-mode AD is active: torch.func.jvp (at any level; jacfwd runs it under vmap)
    or a torch.autograd.forward_ad dual level. torch's fused SDPA kernels have no forward
    derivative, so attention takes its explicit path there."""
    if _forward_ad_level() >= 0:
        return True
    if not _functorch_active() or retrieve_all_functorch_interpreters is None:
        return False
    return any(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters())


def _forward_ad_level() -> int:
    """The innermost torch.autograd.forward_ad dual level entered, -1 outside every one (a private
    module global, read once per call; present across the 2.x releases)."""
    return getattr(torch.autograd.forward_ad, "_current_level", -1)


def vmapped_values(t: torch.Tensor) -> torch.Tensor | None:
    """The plain tensor under `t` if torch.func.vmap batches it at some level (every functorch
    wrapper removed: the vmap-ed dimensions included), else None. A batched tensor's values cannot
    be branched on, but the plain tensor under it can: that is how the input checks run under vmap.
    (Under jacfwd, hessian or a vmap over parameters only, ids and targets are not batched and the
    ordinary checks run.)"""
    if not _functorch_active() or retrieve_all_functorch_interpreters is None:
        return None
    batched = False
    while True:
        if is_batchedtensor(t):
            batched = True
        elif not (is_gradtrackingtensor(t) or is_functionaltensor(t)):
            return t if batched else None
        t = get_unwrapped(t)


def as_int64_index(t: torch.Tensor, what: str) -> torch.Tensor:
    """Integer ids or targets as int64, the index type embedding, gather and the loss take.
    Every narrower or unsigned integer dtype converts exactly (and is then range-checked in int64,
    not in its own dtype, where V itself could wrap around); uint64 may not fit and is refused."""
    if t.dtype == torch.int64:
        return t
    if t.dtype == torch.uint64:
        raise TypeError(f"{what} of dtype torch.uint64 may not fit in int64; pass int64 (or int32)")
    return t.to(torch.int64)


def check_range_vmapped(plain: torch.Tensor, n: int, what: str) -> None:
    """ValueError naming the first value of `plain` (from vmapped_values) outside [0, n)."""
    bad = (plain < 0) | (plain >= n)
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{what} {int(plain[index])} is outside [0, {n}) (vocab_size={n}; under torch.func.vmap, "
                         f"at index {index} of the batched values, shape {tuple(plain.shape)})")


def plain_eager() -> bool:
    """Eager torch, with no torch.compile tracing, no torch.func transform (grad, jacrev, ...) and
    no torch.autograd.forward_ad dual level active: where torch_impl's own CPU autograd Functions
    (head slices, kept-gradient linears, the embedding that takes a tied head's gradient, bf16
    layouts) and decode.py's step may run. They have no compile, functorch or forward-derivative
    rules, so under any of these the same math runs as plain torch ops."""
    return not torch.compiler.is_compiling() and not _functorch_active() and _forward_ad_level() < 0


@dataclass(frozen=True)
class RuntimePlan:
    device: torch.device
    param_dtype: torch.dtype  # what the parameters are stored in
    autocast_dtype: torch.dtype | None  # matmuls and activations under torch.autocast, or None
    tf32: bool  # CUDA float32 matmuls on TF32 tensor cores (10 mantissa bits)
    compile: bool  # wrap the model in torch.compile
    fused_adamw: bool  # torch.optim.AdamW(fused=True) runs on this device
    threads: int  # CPU intra-op threads (torch.get_num_threads at planning time)
    reasons: tuple[str, ...] = ()  # why each default was taken, for describe()

    def describe(self) -> str:
        """One line naming every choice, e.g. for a log or a benchmark record."""
        ac = f"autocast {str(self.autocast_dtype).removeprefix('torch.')}" if self.autocast_dtype else "no autocast"
        parts = [
            f"device {self.device}" + (f" ({self.threads} threads)" if self.device.type == "cpu" else ""),
            f"params {str(self.param_dtype).removeprefix('torch.')}",
            ac,
            f"TF32 {'on' if self.tf32 else 'off'}",
            "torch.compile" if self.compile else "eager",
            f"AdamW {'fused' if self.fused_adamw else 'foreach'}",
            f"attention {sdpa_kernel_name(self)}",
        ]
        if self.device.type == "cpu" and not self.compile:
            parts.append(cpu_kernels(self.autocast_dtype, self.param_dtype))
        text = ", ".join(parts)
        return text + (f" [{'; '.join(self.reasons)}]" if self.reasons else "")

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context for forward passes (a no-op without an autocast dtype)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def apply(self) -> None:
        """Set the process-wide switches this plan needs (TF32 matmul precision on CUDA)."""
        if self.device.type == "cuda":
            set_tf32_switches(self.tf32, self.tf32)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move `model` to the device and dtype, apply the switches, compile if planned.

        Returns the module to call (the compiled wrapper when compiling; its parameters are the
        original model's, so optimizers and state_dict() use `model` either way).
        """
        self.apply()
        model.to(device=self.device, dtype=self.param_dtype)
        return torch.compile(model) if self.compile else model

    def make_adamw(self, params, **kwargs) -> torch.optim.Optimizer:
        """torch.optim.AdamW, fused where the device supports it, else the multi-tensor one."""
        if self.fused_adamw:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        return torch.optim.AdamW(params, foreach=True, **kwargs)


def cpu_kernels(autocast_dtype: torch.dtype | None, param_dtype: torch.dtype = torch.float32) -> str:
    """torch_impl's own CPU paths an eager model takes with this autocast dtype (or None) and
    parameter dtype."""
    if autocast_dtype is None:
        return ("CPU paths: output head in vocabulary slices with the loss fused (head.py), gradients and "
                "logits in kept memory (kept_buffers.py), "
                + ("float32 training products through oneDNN (AMD CPU with AVX-512, which MKL does not use; "
                   "linear.py, head.py), " if param_dtype == torch.float32 and onednn_fp32_products() else "")
                + "one-token decoding steps in few calls (decode.py) with products split over the cores (linear.py)")
    if autocast_dtype == torch.bfloat16 and not cpu_has_fast_bf16():
        return "CPU paths: bf16 products with the weights cast into fast layouts (linear.bf16_linear)"
    if autocast_dtype == torch.bfloat16:
        from torch_impl.attention import SDPA_FP32_BELOW_T  # attention.py imports this module

        return ("CPU paths: training products as autocast computes them, bf16 weight copies and gradients in "
                f"kept memory (linear.kept_bf16_linear), float32 attention below {SDPA_FP32_BELOW_T} queries "
                "(attention.py)")
    return "CPU paths: torch's autocast kernels"


def tf32_switches() -> tuple[bool, bool]:
    """(float32 CUDA matmuls on TF32, cuDNN convolutions on TF32), whichever of torch's two APIs
    set them: reading the legacy `allow_tf32` flags raises once a program has used the newer
    `fp32_precision` settings (torch 2.9 on), so each is read through the legacy flag and, where
    that refuses, through the new one."""
    try:
        matmul = bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:
        matmul = torch.backends.cuda.matmul.fp32_precision == "tf32"
    try:
        cudnn = bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        cudnn = torch.backends.cudnn.conv.fp32_precision == "tf32"
    return matmul, cudnn


def set_tf32_switches(matmul: bool, cudnn: bool) -> None:
    """Set both TF32 switches: through the legacy flags, and, where a program uses the newer
    `fp32_precision` settings and those do not follow (cuDNN's does not), through those too."""
    torch.backends.cuda.matmul.allow_tf32 = bool(matmul)
    torch.backends.cudnn.allow_tf32 = bool(cudnn)
    if tf32_switches() != (bool(matmul), bool(cudnn)):
        torch.backends.cuda.matmul.fp32_precision = "tf32" if matmul else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if cudnn else "ieee"


@contextlib.contextmanager
def tf32_matmuls(enabled: bool):
    """Both TF32 switches set to `enabled` inside the block, and put back as they were after it."""
    before = tf32_switches()
    set_tf32_switches(enabled, enabled)
    try:
        yield
    finally:
        set_tf32_switches(*before)


def sdpa_kernel_name(plan: RuntimePlan) -> str:
    """The scaled-dot-product-attention kernel torch will pick for this plan (without masks)."""
    dtype = plan.autocast_dtype or plan.param_dtype
    if plan.device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(plan.device)
        if dtype in (torch.float16, torch.bfloat16) and major >= 8:
            return "SDPA flash"
        return "SDPA memory-efficient"
    if plan.device.type == "cpu":
        # every float dtype: _scaled_dot_product_flash_attention_for_cpu (profiled, torch 2.13); the
        # CPU flash kernel takes no dropout, so training with attention dropout runs the math one
        return "SDPA CPU flash (the math kernel when training with dropout > 0)"
    return f"SDPA ({plan.device.type})"


def plan_runtime(device: str | torch.device | None = None, precision: str = "auto",
                 compile: bool | None = None) -> RuntimePlan:
    """The fastest correct plan for `device` (default: the best one present).

    precision: "auto" (the table in this module's docstring), "fp32" (float32, TF32 off),
    "tf32" (float32 storage, TF32 matmuls on CUDA), "bf16" / "fp16" (float32 parameters,
    autocast), "fp64" (float64 everywhere, for parity checks).
    compile: None for the device default, or force it on / off.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    dev = choose_device(device)
    reasons: list[str] = []
    param_dtype = torch.float64 if precision == "fp64" else torch.float32
    autocast_dtype = None
    tf32 = False
    if dev.type == "cuda":
        major, _ = torch.cuda.get_device_capability(dev)
        ampere = major >= 8
        if precision == "auto":
            autocast_dtype = torch.bfloat16 if ampere else torch.float16
            tf32 = ampere
            reasons.append("CUDA: autocast and TF32 use the tensor cores" if ampere
                           else "CUDA before Ampere: fp16 autocast, no bf16 or TF32 units")
        elif precision == "tf32":
            tf32 = ampere
        elif precision in ("bf16", "fp16"):
            autocast_dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            tf32 = ampere
    else:
        if precision == "tf32":
            reasons.append("TF32 exists only on CUDA: plain float32")
        elif precision in ("bf16", "fp16"):
            autocast_dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        elif precision == "auto" and dev.type == "cpu":
            if cpu_has_fast_bf16():
                autocast_dtype = torch.bfloat16
                reasons.append("CPU with AMX / AVX-512 BF16: bf16 autocast")
            else:
                reasons.append("CPU without bf16 units: float32 is the fastest")
    if compile is None:
        compile = dev.type == "cuda"
        reasons.append("torch.compile on" if compile else f"eager on {dev.type}: compile time outweighs the gain")
    fused = dev.type in ("cuda", "cpu", "mps")
    return RuntimePlan(device=dev, param_dtype=param_dtype, autocast_dtype=autocast_dtype, tf32=tf32,
                       compile=bool(compile), fused_adamw=fused, threads=torch.get_num_threads(),
                       reasons=tuple(reasons))
