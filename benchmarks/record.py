"""One benchmark measurement as a record, with its derived numbers computed in one place.

A `Result` is what every benchmark returns: what ran (section, config, backend, operation,
B, T), how long it took (`Timing`), and from that tokens/s, FLOP/s and the fraction of the
measured peak it is compared against. A piece that could not run is a `Result` with status
`n/a` (a module not written yet, a path this device lacks) or `error`, with the reason: the
report shows it, the run goes on.
"""

from __future__ import annotations

import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable

from benchmarks.stats import Timing


@dataclass
class Result:
    section: str  # machine | layer | forward | train_step | decode | sweep
    config: str
    backend: str  # numpy-float64, numpy-float32, torch-fp32, torch-bf16, torch-compile, hf-fp32, ...
    what: str  # the operation, e.g. "attention backward", "train step", "decode (KV cache)"
    B: int = 0
    T: int = 0
    tokens: int = 0  # tokens processed (or generated) per timed call
    flops: float = 0.0  # FLOPs per timed call by the documented formula (0: not counted)
    peak_name: str = ""  # key into machine["peaks"]
    timing: Timing | None = None
    memory: dict | None = None
    status: str = "ok"  # ok | n/a | error
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def seconds(self) -> float | None:
        return self.timing.median if self.timing else None

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.timing.median if self.timing and self.tokens and self.timing.median > 0 else None

    @property
    def flop_per_s(self) -> float | None:
        return self.flops / self.timing.median if self.timing and self.flops and self.timing.median > 0 else None

    def fraction_of_peak(self, peaks: dict) -> float | None:
        peak = peaks.get(self.peak_name)
        rate = self.flop_per_s
        return rate / peak if peak and rate else None

    def to_dict(self, peaks: dict | None = None) -> dict:
        d = asdict(self)
        d["timing"] = self.timing.to_dict() if self.timing else None
        d["seconds"] = self.seconds
        d["tokens_per_s"] = self.tokens_per_s
        d["flop_per_s"] = self.flop_per_s
        d["fraction_of_peak"] = self.fraction_of_peak(peaks or {})
        return d


def unavailable(section: str, config: str, backend: str, what: str, reason: str, **kw) -> Result:
    return Result(section, config, backend, what, status="n/a", note=reason, **kw)


PROJECT_PACKAGES = ("numpy_ref", "torch_impl", "benchmarks", "parity_tests", "gpt_oracle")


def guarded(make: Callable[[], Result | list[Result]], section: str, config: str, backend: str, what: str
            ) -> list[Result]:
    """Run one benchmark; a missing optional library (transformers, ...) or a path not written
    becomes `n/a`, any other exception an `error` row, this project's own failed imports included
    (a broken numpy_ref / torch_impl / benchmarks module is a defect, not an absent option)."""
    try:
        out = make()
    except (ImportError, NotImplementedError) as exc:
        missing = getattr(exc, "name", None) or ""
        if missing.split(".")[0] not in PROJECT_PACKAGES:
            return [unavailable(section, config, backend, what, f"not available: {type(exc).__name__}: {exc}")]
        return [Result(section, config, backend, what, status="error",
                       note=f"{type(exc).__name__}: {exc} (this project's own module)")]
    except Exception as exc:  # noqa: BLE001 - reported in the results, never swallowed silently
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        return [Result(section, config, backend, what, status="error",
                       note=f"{type(exc).__name__}: {exc} (at {frame.filename}:{frame.lineno})")]
    return out if isinstance(out, list) else [out]
