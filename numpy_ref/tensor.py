"""A reverse-mode autograd engine over NumPy arrays, small enough to read in one sitting.

A `Tensor` wraps an `np.ndarray` (float64 by default; float32 is kept as float32, never promoted)
and remembers the operation that made it. `loss.backward()` sorts the graph topologically
(iteratively, so a graph thousands of operations deep does not hit Python's recursion limit)
and walks it from the output to the inputs, applying each operation's vector-Jacobian product
(VJP): given the upstream gradient `g = dL/d(out)`, the VJP returns `dL/d(input)` for every
input. Gradients reaching a tensor along several paths are summed.

Operations keep references to their inputs' arrays, not copies (a Tensor wraps the array it is
given). Writing into a tensor's `.data` (or the array it wraps) after using it, and before
`backward`, can make the backward use the new values; PyTorch catches this with a version counter,
this engine does not, so treat arrays in a graph as read-only until its backward has run.

Every primitive below is one block: the forward, then directly under it its VJP as a named
function whose comment gives the math. Broadcasting is undone by one helper, `unbroadcast`.
Layers with hand-derived backward passes plug in as single operations through `custom_op`.

References: HIPS/autograd (per-primitive VJPs, `unbroadcast`), micrograd (the topological
walk), PyTorch's derivatives.yaml (the conventions at ties and kinks: `maximum` splits the
gradient at ties, `max` over an axis shares it evenly among tied maxima, `relu'(0) = 0`).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterator, Sequence

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# Whether operations record the graph. A module-level switch (like torch's) rather than an
# argument, because `no_grad()` must reach operations called deep inside model code.
_grad_enabled = True


def is_grad_enabled() -> bool:
    return _grad_enabled


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Inside this block, operations compute values only: no graph, no `requires_grad` outputs."""
    global _grad_enabled
    previous = _grad_enabled
    _grad_enabled = False
    try:
        yield
    finally:
        _grad_enabled = previous


class Tensor:
    """An ndarray plus what autograd needs: `requires_grad`, `grad`, and the op that made it."""

    # NumPy defers to Tensor's reflected operators: `ndarray * Tensor` calls `Tensor.__rmul__`.
    __array_ufunc__ = None

    def __init__(self, data, requires_grad: bool = False, dtype=None):
        self.data = _as_float_array(data, dtype)
        self.requires_grad = bool(requires_grad)
        self.grad: np.ndarray | None = None
        # Set only on tensors made by an operation while recording: the op's inputs (None for
        # constants), its VJP and what the VJP needs. A tensor without a VJP is a leaf.
        self._parents: tuple[Tensor | None, ...] = ()
        self._vjp: Callable | None = None
        self._saved: tuple = ()
        self._op = ""

    # ---- array-like views ----
    shape = property(lambda self: self.data.shape)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    dtype = property(lambda self: self.data.dtype)

    # == and != would fall back to identity (x == 0 is False for any x), where NumPy compares
    # elements and <, > raise: a comparison gives no gradient, so each is a TypeError here too.
    # The hash stays identity's (the engine keys nothing by it; a set of Tensors keeps working).
    __hash__ = object.__hash__

    def __eq__(self, other):
        raise TypeError("Tensor == is not supported (no gradient flows through a comparison): compare .data")

    def __ne__(self, other):
        raise TypeError("Tensor != is not supported (no gradient flows through a comparison): compare .data")

    def __iter__(self):
        # Without it Python iterates through __getitem__ and a 0-d tensor yields nothing
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d tensor")
        return (self[i] for i in range(len(self)))

    def __len__(self) -> int:
        return len(self.data)

    def __bool__(self) -> bool:
        # NumPy's rule: one element is true when nonzero, more raise. Without this, Python falls
        # back on __len__ and any non-empty tensor, Tensor([0.0]) included, would be true.
        return bool(self.data)

    def __repr__(self) -> str:
        op = f", op={self._op}" if self._op else ""
        return f"Tensor({self.data!r}, requires_grad={self.requires_grad}{op})"

    def numpy(self) -> np.ndarray:
        return self.data

    def item(self) -> float:
        return self.data.item()

    @property
    def is_leaf(self) -> bool:
        return self._vjp is None

    def detach(self) -> Tensor:
        """The same values (shared, not copied) cut off from the graph."""
        return Tensor(self.data)

    def zero_grad(self) -> None:
        """Forget the accumulated gradient; the next `backward` starts this tensor's from zero."""
        self.grad = None

    def backward(self, grad=None) -> None:
        """Accumulate d(self)/d(leaf), weighted by `grad`, into every leaf's `.grad`.

        `grad` is the upstream gradient, of this tensor's shape and dtype; it may be left out
        only for a single-element tensor (a loss), where it is 1. The graph is kept (torch's
        `retain_graph=True`): a second call adds the same gradients again.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad (made under no_grad, or from constants)")
        if grad is None:
            if self.size != 1:
                raise ValueError(f"backward() without a gradient needs a single-element tensor; this one has shape {self.shape}")
            grad = np.ones(self.shape, dtype=self.dtype)
        grad = np.asarray(grad.data if isinstance(grad, Tensor) else grad)
        if grad.shape != self.shape:
            raise ValueError(f"backward(): gradient shape {grad.shape} differs from the tensor's shape {self.shape}")
        if grad.dtype != self.dtype:
            raise TypeError(f"backward(): gradient dtype {grad.dtype} differs from the tensor's dtype {self.dtype}")
        _run_backward(self, grad)

    # ---- operators: thin wrappers over the primitives below ----
    def __add__(self, other): return add(self, other)
    def __radd__(self, other): return add(other, self)
    def __sub__(self, other): return sub(self, other)
    def __rsub__(self, other): return sub(other, self)
    def __mul__(self, other): return mul(self, other)
    def __rmul__(self, other): return mul(other, self)
    def __truediv__(self, other): return div(self, other)
    def __rtruediv__(self, other): return div(other, self)
    def __neg__(self): return neg(self)
    def __pow__(self, exponent): return pow(self, exponent)
    def __rpow__(self, base): return pow(base, self)
    def __matmul__(self, other): return matmul(self, other)
    def __rmatmul__(self, other): return matmul(other, self)
    def __getitem__(self, index): return getitem(self, index)

    def exp(self): return exp(self)
    def log(self): return log(self)
    def tanh(self): return tanh(self)
    def sqrt(self): return sqrt(self)
    def relu(self): return relu(self)
    def sum(self, axis=None, keepdims=False): return sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return mean(self, axis, keepdims)
    def max(self, axis=None, keepdims=False): return max(self, axis, keepdims)
    def reshape(self, *shape): return reshape(self, shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape)
    def permute(self, *axes): return permute(self, axes[0] if len(axes) == 1 and not isinstance(axes[0], int) else axes)
    def transpose(self, axis0=-2, axis1=-1): return transpose(self, axis0, axis1)

    @property
    def T(self):
        """All axes reversed (NumPy's `.T`)."""
        return permute(self, tuple(range(self.ndim - 1, -1, -1)))


# ---- building blocks of the engine -----------------------------------------------------------


def _as_float_array(data, dtype=None) -> np.ndarray:
    """float32 and float64 arrays are kept as they are; Python numbers, lists and integer or
    boolean arrays become float64 (or `dtype`). Other float widths are refused unless `dtype`
    asks for the conversion; anything that is not a real number (None, complex, strings,
    objects) is refused even then, because NumPy would turn None into NaN, drop an imaginary
    part, or parse "2" as 2.0."""
    if isinstance(data, Tensor):
        data = data.data
    array = np.asarray(data)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"Tensor data must be real numbers (float, integer or bool), got {data!r:.60} of dtype {array.dtype}")
    if dtype is not None:
        dtype = np.dtype(dtype)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"Tensor dtype must be float32 or float64, got {dtype}")
        return array.astype(dtype, copy=False)
    if array.dtype in FLOAT_DTYPES:
        return array
    if array.dtype.kind in "biu":
        return array.astype(np.float64)
    raise TypeError(f"Tensor data must be float32 or float64 (or integers/bools, made float64), got {array.dtype}")


def _common_dtype(tensors: Sequence[Tensor]) -> np.dtype:
    """The one float dtype of an op's tensor inputs; mixing float32 and float64 is an error."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        raise TypeError(f"operands mix dtypes {sorted(str(d) for d in dtypes)}; cast one explicitly")
    return dtypes.pop() if dtypes else np.dtype(np.float64)


def _operands(*values) -> tuple[Tensor, ...]:
    """Tensors stay; constants (numbers, arrays) become constant tensors of the tensors' dtype.

    A float array constant of one or more dimensions must already have that dtype: converting
    float64 into a float32 computation (or the reverse) silently is exactly the drift this engine
    refuses. Numbers, 0-d arrays and NumPy scalars are converted (one value, like a literal).
    """
    dtype = _common_dtype([v for v in values if isinstance(v, Tensor)])
    out = []
    for v in values:
        if isinstance(v, Tensor):
            out.append(v)
            continue
        array = np.asarray(v)
        if array.dtype.kind == "f" and array.ndim > 0 and array.dtype != dtype:
            raise TypeError(f"constant array of dtype {array.dtype} in a {dtype} computation; cast it explicitly")
        out.append(Tensor(array, dtype=dtype))
    return tuple(out)


def _make(data: np.ndarray, op: str, parents: Sequence[Tensor | None], vjp: Callable, *saved) -> Tensor:
    """Wrap an op's output; record its inputs and VJP when recording and any input needs a gradient."""
    live = [p for p in parents if p is not None]
    dtype = _common_dtype(live)
    data = np.asarray(data)
    if data.dtype != dtype:
        raise AssertionError(f"{op}: output dtype {data.dtype} drifted from the inputs' {dtype}")
    out = Tensor(data)
    out._op = op
    if _grad_enabled and any(p.requires_grad for p in live):
        out.requires_grad = True
        out._parents = tuple(parents)
        out._vjp = vjp
        out._saved = saved
    return out


def _topological_order(root: Tensor) -> list[Tensor]:
    """Every tensor that `root` depends on and that requires grad, inputs before outputs.

    Depth-first with an explicit stack: a node is pushed twice, first to expand its inputs and
    then (marked `expanded`) to be emitted after all of them.
    """
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        for parent in node._parents:
            if parent is not None and parent.requires_grad and id(parent) not in visited:
                stack.append((parent, False))
    return order


def _run_backward(root: Tensor, grad: np.ndarray) -> None:
    """Walk the graph outputs-first, summing each node's incoming gradients, then passing them on."""
    pending = {id(root): grad}  # id(tensor) -> dL/d(tensor) summed over the paths seen so far
    for node in reversed(_topological_order(root)):
        g = pending.pop(id(node), None)
        if g is None:  # every path from the output to this node had a zero (None) gradient
            continue
        if node.is_leaf:
            # A fresh, writable array: never a view of an upstream gradient or a user's array.
            node.grad = np.array(g, dtype=node.dtype) if node.grad is None else node.grad + g
            continue
        grads = node._vjp(g, *node._saved)
        if len(grads) != len(node._parents):
            raise AssertionError(f"{node._op}: VJP returned {len(grads)} gradients for {len(node._parents)} inputs")
        for i, (parent, pg) in enumerate(zip(node._parents, grads)):
            if parent is None or not parent.requires_grad or pg is None:
                continue
            pg = np.asarray(pg)
            if pg.shape != parent.shape or pg.dtype != parent.dtype:
                raise AssertionError(
                    f"{node._op}: gradient for input {i} has shape {pg.shape} dtype {pg.dtype}; "
                    f"the input has shape {parent.shape} dtype {parent.dtype}")
            # Not `+=`: a VJP may hand the same array to several inputs (add passes g through).
            pending[id(parent)] = pg if id(parent) not in pending else pending[id(parent)] + pg


def unbroadcast(grad: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum `grad` down to `shape`, undoing NumPy broadcasting.

    An input broadcast along an axis was used once per position of that axis, so its gradient
    is the sum over that axis: first over the leading axes broadcasting added, then over the
    axes where the input had size 1.
    """
    while grad.ndim > len(shape):
        grad = grad.sum(axis=0)  # (extra, *shape') -> (*shape')
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad


def _axis_index(axis, ndim: int) -> int:
    """`axis` from NumPy's range [-ndim, ndim) as an index in [0, ndim); never wrapped silently."""
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):  # True is no axis
        raise TypeError(f"axis {axis!r} must be an integer")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for an array of {ndim} dimensions")
    return int(axis) % ndim


def _normalize_axes(axis, ndim: int) -> tuple[int, ...]:
    """The sorted, non-negative axes a reduction runs over (all of them for None)."""
    if axis is None:
        return tuple(range(ndim))
    given = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    axes = [_axis_index(a, ndim) for a in given]
    if len(set(axes)) != len(axes):
        raise ValueError(f"axes {given} name the same axis twice (for an array of {ndim} dimensions)")
    return tuple(sorted(axes))


# ---- elementwise arithmetic ------------------------------------------------------------------


def add(a, b) -> Tensor:
    a, b = _operands(a, b)
    return _make(a.data + b.data, "add", (a, b), add_vjp, a.shape, b.shape)


def add_vjp(g, a_shape, b_shape):
    # d(a+b)/da = 1, d(a+b)/db = 1
    return unbroadcast(g, a_shape), unbroadcast(g, b_shape)


def sub(a, b) -> Tensor:
    a, b = _operands(a, b)
    return _make(a.data - b.data, "sub", (a, b), sub_vjp, a.shape, b.shape)


def sub_vjp(g, a_shape, b_shape):
    # d(a-b)/da = 1, d(a-b)/db = -1
    return unbroadcast(g, a_shape), unbroadcast(-g, b_shape)


def mul(a, b) -> Tensor:
    a, b = _operands(a, b)
    return _make(a.data * b.data, "mul", (a, b), mul_vjp, a.data, b.data)


def mul_vjp(g, a, b):
    # d(a*b)/da = b, d(a*b)/db = a
    return unbroadcast(g * b, a.shape), unbroadcast(g * a, b.shape)


def div(a, b) -> Tensor:
    a, b = _operands(a, b)
    return _make(a.data / b.data, "div", (a, b), div_vjp, a.data, b.data)


def div_vjp(g, a, b):
    # d(a/b)/da = 1/b, d(a/b)/db = -a/b^2, evaluated as -((a/b)/b) (torch's order): b*b alone
    #   overflows or underflows in float32 for |b| beyond about 1e19 or under 1e-19 while the
    #   quotient a/b^2 itself is representable.
    return unbroadcast(g / b, a.shape), unbroadcast(-g * ((a / b) / b), b.shape)


def neg(a) -> Tensor:
    (a,) = _operands(a)
    return _make(-a.data, "neg", (a,), neg_vjp)


def neg_vjp(g):
    # d(-a)/da = -1
    return (-g,)


def pow(a, p) -> Tensor:
    """`a ** p`; `p` a number or a tensor (a tensor exponent needs a non-negative base)."""
    a, p = _operands(a, p)
    out = a.data ** p.data
    return _make(out, "pow", (a, p), pow_vjp, a.data, p.data, out)


def pow_vjp(g, a, p, out):
    # d(a^p)/da = p a^(p-1), taken as 0 where p = 0 (a^0 = 1 is flat, even at a = 0 where
    #   0 * 0^(-1) would be NaN); d(a^p)/dp = a^p log(a), taken as 0 where a = 0 and p >= 0.
    #   Both conventions are torch's (pow_backward_self, pow_backward_exponent).
    with np.errstate(divide="ignore", invalid="ignore"):
        da = np.where(p == 0, 0, g * p * a ** (p - 1))
        dp = np.where((a == 0) & (p >= 0), 0, g * out * np.log(a))
    return unbroadcast(da, a.shape), unbroadcast(dp, p.shape)


def exp(a) -> Tensor:
    (a,) = _operands(a)
    out = np.exp(a.data)
    return _make(out, "exp", (a,), exp_vjp, out)


def exp_vjp(g, out):
    # d(e^a)/da = e^a
    return (g * out,)


def log(a) -> Tensor:
    (a,) = _operands(a)
    return _make(np.log(a.data), "log", (a,), log_vjp, a.data)


def log_vjp(g, a):
    # d(log a)/da = 1/a
    return (g / a,)


def tanh(a) -> Tensor:
    (a,) = _operands(a)
    out = np.tanh(a.data)
    return _make(out, "tanh", (a,), tanh_vjp, out)


def tanh_vjp(g, out):
    # d(tanh a)/da = 1 - tanh(a)^2
    return (g * (1 - out * out),)


def sqrt(a) -> Tensor:
    (a,) = _operands(a)
    out = np.sqrt(a.data)
    return _make(out, "sqrt", (a,), sqrt_vjp, out)


def sqrt_vjp(g, out):
    # d(sqrt a)/da = 1 / (2 sqrt a)
    return (g / (2 * out),)


def maximum(a, b) -> Tensor:
    a, b = _operands(a, b)
    return _make(np.maximum(a.data, b.data), "maximum", (a, b), maximum_vjp, a.data, b.data)


def maximum_vjp(g, a, b):
    # d max(a,b)/da = [a > b] + [a = b]/2, d max(a,b)/db = [b > a] + [a = b]/2 (ties split).
    # Written as "0 where the other side wins" so that a NaN (no side wins, out is NaN) passes g
    # to both, as torch's maximum backward does, rather than a silent 0.
    half = g * 0.5
    da = np.where(a < b, 0, np.where(a == b, half, g))
    db = np.where(b < a, 0, np.where(a == b, half, g))
    return unbroadcast(da, a.shape), unbroadcast(db, b.shape)


def relu(a) -> Tensor:
    (a,) = _operands(a)
    out = np.maximum(a.data, 0)
    return _make(out, "relu", (a,), relu_vjp, out)


def relu_vjp(g, out):
    # d relu(a)/da = [a > 0] (0 at a = 0); a NaN passes g (NaN <= 0 is false), as in torch
    return (np.where(out <= 0, 0, g),)


# ---- matrix product --------------------------------------------------------------------------


def matmul(a, b) -> Tensor:
    """`a @ b` with NumPy's rules: batched over leading axes (broadcast), 1-D operands promoted."""
    a, b = _operands(a, b)
    out = a.data @ b.data  # (..., n, k) @ (..., k, m) -> (..., n, m)
    return _make(out, "matmul", (a, b), matmul_vjp, a.data, b.data)


def matmul_vjp(g, a, b):
    # d(a@b)/da = g @ b^T, d(a@b)/db = a^T @ g, on the 2-D (matrix) view of each operand
    a2 = a[None, :] if a.ndim == 1 else a  # (k,) -> (1, k)
    b2 = b[:, None] if b.ndim == 1 else b  # (k,) -> (k, 1)
    g2 = g[..., None] if b.ndim == 1 else g  # (..., n) -> (..., n, 1)
    g2 = g2[..., None, :] if a.ndim == 1 else g2  # (..., m) -> (..., 1, m)
    da = unbroadcast(g2 @ np.swapaxes(b2, -1, -2), a2.shape)  # (..., n, m) @ (..., m, k) -> (..., n, k), summed to a2.shape
    db = unbroadcast(np.swapaxes(a2, -1, -2) @ g2, b2.shape)  # (..., k, n) @ (..., n, m) -> (..., k, m), summed to b2.shape
    return da.reshape(a.shape), db.reshape(b.shape)


# ---- reductions ------------------------------------------------------------------------------


def sum(a, axis=None, keepdims: bool = False) -> Tensor:
    (a,) = _operands(a)
    axes = _normalize_axes(axis, a.ndim)
    out = a.data.sum(axis=axes, keepdims=keepdims)  # a.shape -> `axes` dropped (or kept as 1)
    return _make(out, "sum", (a,), sum_vjp, a.shape, axes, keepdims)


def sum_vjp(g, a_shape, axes, keepdims):
    # d(sum_i a_i)/da_j = 1: the gradient is copied back along the summed axes
    if not keepdims:
        g = np.expand_dims(g, axes)  # reduced shape -> same ndim as a, size 1 on `axes`
    return (np.broadcast_to(g, a_shape),)


def mean(a, axis=None, keepdims: bool = False) -> Tensor:
    """The sum divided by the number of summed elements (composed, so no VJP of its own)."""
    (a,) = _operands(a)
    count = int(np.prod([a.shape[i] for i in _normalize_axes(axis, a.ndim)]))
    if count == 0:
        raise ValueError(f"mean over axis {axis} of shape {a.shape}: no elements, the mean is undefined")
    return sum(a, axis, keepdims) * (1.0 / count)


def max(a, axis=None, keepdims: bool = False) -> Tensor:
    (a,) = _operands(a)
    axes = _normalize_axes(axis, a.ndim)
    out = a.data.max(axis=axes, keepdims=True)  # kept for the VJP; dropped below if asked
    result = out if keepdims else out.squeeze(axis=axes)
    return _make(result, "max", (a,), max_vjp, a.data, out, axes, keepdims)


def max_vjp(g, a, out, axes, keepdims):
    # d max(a)/da_j = [a_j = max] / (number of tied maxima): shared evenly, as torch.amax does
    if not keepdims:
        g = np.expand_dims(g, axes)  # reduced shape -> same ndim as a
    is_max = a == out
    count = is_max.sum(axis=axes, keepdims=True).astype(a.dtype)  # (..., 1, ...) per reduced slice
    # A NaN makes its slice's max NaN, equal to no element (count 0): that slice's gradient is
    # NaN, as in torch, not a silent zero.
    share = np.where(count > 0, g / np.maximum(count, 1), np.nan)
    return (np.where(is_max | (count == 0), share, 0),)


# ---- shape -----------------------------------------------------------------------------------


def reshape(a, shape) -> Tensor:
    (a,) = _operands(a)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    out = a.data.reshape(shape)  # a.shape -> shape (same number of elements)
    return _make(out, "reshape", (a,), reshape_vjp, a.shape)


def reshape_vjp(g, a_shape):
    # reshaping moves no value: the gradient is reshaped back
    return (g.reshape(a_shape),)


def permute(a, axes) -> Tensor:
    """Reorder the axes: output axis i is input axis `axes[i]`."""
    (a,) = _operands(a)
    given = tuple(axes)
    axes = tuple(_axis_index(x, a.ndim) for x in given)
    if sorted(axes) != list(range(a.ndim)):
        raise ValueError(f"permute: axes {given} are not a permutation of {a.ndim} axes")
    out = a.data.transpose(axes)  # (d_0, ..., d_k) -> (d_axes[0], ..., d_axes[k])
    return _make(out, "permute", (a,), permute_vjp, axes)


def permute_vjp(g, axes):
    # the inverse permutation puts every gradient back where its value came from
    return (g.transpose(np.argsort(axes)),)


def transpose(a, axis0: int = -2, axis1: int = -1) -> Tensor:
    """Swap two axes (torch's `transpose(dim0, dim1)`; default: the last two, `k^T` in attention)."""
    (a,) = _operands(a)
    axis0, axis1 = _axis_index(axis0, a.ndim), _axis_index(axis1, a.ndim)
    axes = list(range(a.ndim))
    axes[axis0], axes[axis1] = axes[axis1], axes[axis0]
    return permute(a, axes)


def concatenate(tensors: Sequence, axis: int = 0) -> Tensor:
    """NumPy's `concatenate` along one existing axis (axis=None, which flattens first, is refused
    by name: reshape each to (-1,) and join on axis 0)."""
    tensors = _operands(*tensors)
    if axis is None:
        raise TypeError("concatenate: axis=None is not supported; reshape each tensor to (-1,) and join on axis 0")
    if not tensors:
        raise ValueError("concatenate: needs at least one tensor")
    axis = _axis_index(axis, tensors[0].ndim)
    out = np.concatenate([t.data for t in tensors], axis=axis)  # sizes on `axis` add up
    sizes = [t.shape[axis] for t in tensors]
    return _make(out, "concatenate", tensors, concatenate_vjp, sizes, axis)


def concatenate_vjp(g, sizes, axis):
    # each input receives the slice of the gradient where its values were placed
    return tuple(np.split(g, np.cumsum(sizes)[:-1], axis=axis))


def split(a, indices_or_sections, axis: int = 0) -> list[Tensor]:
    """NumPy's `split`, as slices of `a` (so each piece's gradient flows back through indexing)."""
    (a,) = _operands(a)
    axis = _axis_index(axis, a.ndim)
    n = a.shape[axis]
    if isinstance(indices_or_sections, (int, np.integer)):
        sections = int(indices_or_sections)
        if sections < 1 or n % sections:
            raise ValueError(f"split: an axis of size {n} does not divide into {sections} equal parts")
        bounds = [i * (n // sections) for i in range(sections + 1)]
    else:
        bounds = [0] + [int(i) for i in indices_or_sections] + [n]
    lead = (slice(None),) * axis
    return [getitem(a, lead + (slice(start, stop),)) for start, stop in zip(bounds[:-1], bounds[1:])]


# ---- indexing --------------------------------------------------------------------------------


def getitem(a, index) -> Tensor:
    """`a[index]`: slices, integers, `None`, `...`, integer arrays and boolean masks."""
    (a,) = _operands(a)
    index = _plain_index(index)
    out = a.data[index]  # a.shape -> NumPy indexing rules
    return _make(out, "getitem", (a,), getitem_vjp, a.shape, index)


def getitem_vjp(g, a_shape, index):
    # d a[index] / da scatters g back to the positions read; a position read k times gets the
    # sum of its k gradients (np.add.at accumulates repeats; `x[idx] += g` would keep only one)
    da = np.zeros(a_shape, dtype=g.dtype)
    np.add.at(da, index, g)
    return (da,)


def take_along_axis(a, indices, axis: int) -> Tensor:
    """NumPy's `take_along_axis`: `out[..., i, ...] = a[..., indices[..., i, ...], ...]` on `axis`."""
    (a,) = _operands(a)
    indices = np.array(indices.data if isinstance(indices, Tensor) else indices)  # a copy: see _plain_index
    if indices.dtype.kind not in "iu":
        raise TypeError(f"take_along_axis: indices must be integers, got {indices.dtype}")
    axis = _axis_index(axis, a.ndim)
    out = np.take_along_axis(a.data, indices, axis=axis)  # size on `axis` -> indices.shape[axis]
    return _make(out, "take_along_axis", (a,), take_along_axis_vjp, a.shape, indices, axis)


def take_along_axis_vjp(g, a_shape, indices, axis):
    # d out / d a scatters g back to the positions taken, summing repeats (np.add.at): the full
    # index is `indices` on `axis` and the position itself on every other axis
    index = []
    for d in range(len(a_shape)):
        if d == axis:
            index.append(indices)
            continue
        along = np.arange(g.shape[d]) if a_shape[d] != 1 else np.zeros(g.shape[d], dtype=np.intp)
        index.append(along.reshape([-1 if k == d else 1 for k in range(len(a_shape))]))  # (n_d,) -> broadcastable
    da = np.zeros(a_shape, dtype=g.dtype)
    np.add.at(da, tuple(index), g)
    return (da,)


def _plain_index(index):
    """An index with Tensors replaced by their (integer) arrays, as a tuple or single item."""
    def plain(item):
        if isinstance(item, Tensor):
            raise TypeError("index with an integer ndarray, not a float Tensor")
        # A copy of an array or list: the backward scatters through it later, and the caller
        # changing it in between (a reused index buffer) would move the gradient silently
        if isinstance(item, np.ndarray):
            return item.copy()
        return copy.deepcopy(item) if isinstance(item, list) else item
    return tuple(plain(i) for i in index) if isinstance(index, tuple) else plain(index)


# ---- selection -------------------------------------------------------------------------------


def where(condition, a, b) -> Tensor:
    """`a` where `condition` is true, else `b` (all three broadcast together)."""
    condition = np.array(condition)  # a copy: the backward reads it (see _plain_index)
    if condition.dtype != np.bool_:
        raise TypeError(f"where: condition must be a boolean array, got {condition.dtype}")
    a, b = _operands(a, b)
    out = np.where(condition, a.data, b.data)
    return _make(out, "where", (a, b), where_vjp, condition, a.shape, b.shape)


def where_vjp(g, condition, a_shape, b_shape):
    # d where(c, a, b)/da = [c], d where(c, a, b)/db = [not c]
    return unbroadcast(np.where(condition, g, 0), a_shape), unbroadcast(np.where(condition, 0, g), b_shape)


def masked_fill(a, mask, value: float) -> Tensor:
    """`a` with `value` wherever `mask` is true (composed from `where`; `value` gets no gradient)."""
    (a,) = _operands(a)
    return where(mask, Tensor(value, dtype=a.dtype), a)  # Tensor() refuses None, which NumPy makes NaN


# ---- the custom-op hook ----------------------------------------------------------------------


def custom_op(forward_fn: Callable, backward_fn: Callable, *inputs, **static) -> Tensor:
    """Plug a hand-derived forward/backward pair into the engine as one operation.

    `inputs` are Tensors (differentiable) or arrays (constants, e.g. token ids), passed to
    `forward_fn(*arrays, **static) -> (out_array, cache)`. On the way back,
    `backward_fn(dout, cache)` returns one gradient per input, in order (None for constants).
    The output must have the dtype of the Tensor inputs.
    """
    arrays = [x.data if isinstance(x, Tensor) else np.asarray(x) for x in inputs]
    out, cache = forward_fn(*arrays, **static)
    parents = tuple(x if isinstance(x, Tensor) else None for x in inputs)
    name = getattr(forward_fn, "__name__", "custom_op")
    return _make(out, name, parents, _custom_vjp, backward_fn, cache, len(inputs), name)


def _custom_vjp(g, backward_fn, cache, n_inputs, name):
    # the VJP is the layer's own hand-derived backward
    grads = backward_fn(g, cache)
    grads = (grads,) if not isinstance(grads, (tuple, list)) else tuple(grads)
    if len(grads) != n_inputs:
        raise ValueError(f"{name}: backward returned {len(grads)} gradients for {n_inputs} inputs")
    return grads
