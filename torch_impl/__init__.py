"""torch_impl: the PyTorch fast path, the same GPT-2 as numpy_ref on CPU and CUDA.

Mirrors numpy_ref's file and function names (`layernorm.py::layernorm_forward` in both trees),
config fields, parameter names and `(in, out)` weight layout, so the parity tests move weights
between the trees without special cases. Never imports numpy_ref. This file imports nothing:
import what you need directly, e.g. `from torch_impl.model import GPTModel`.
"""
