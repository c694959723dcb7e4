"""numpy_ref: GPT-2 in float64 NumPy, every derivative by hand; the oracle for torch_impl.

Imports only numpy, the standard library and `regex` (tokenizer); never torch. Import the
modules you need directly (`from numpy_ref.tensor import Tensor`): this file imports nothing,
so `import numpy_ref` stays cheap and torch-free.
"""
