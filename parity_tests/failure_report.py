"""How a failed oracle check is reported (oracle.check_layer, check_numpy_layer and
model_oracle.check_model): every tensor over tolerance in the order compared, a hint at where the
error starts, and Python lines that rerun the failing case in a fresh session."""

from __future__ import annotations

from typing import Callable, Iterable

from hypothesis import Phase

# hypothesis settings of every oracle check: one failure is raised, the first found (shrunk), not
# an ExceptionGroup of every distinct one; and no "explain" phase, which re-runs the function under
# test some 300 times after a failure to say which drawn values mattered (the message already
# names the sizes and the seed).
ONE_FAILURE = dict(report_multiple_bugs=False, phases=[p for p in Phase if p is not Phase.explain])


def failure_message(title: str, results: Iterable, hint: str, replay: list[str]) -> str:
    """`title`: the first tensor over tolerance; then every other one, the hint (if any), and
    the replay lines."""
    bad = [r for r in results if not r.ok]
    lines = [f"{title}: " + bad[0].message()]
    lines += ["  also over tolerance: " + r.message() for r in bad[1:]]
    if hint:
        lines.append("  " + hint)
    lines.append("  replay (paste after your own definitions):")
    lines += ["    " + line for line in replay]
    return "\n".join(lines)


def replay_lines(imports: list[str], call: str, functions: dict[str, Callable]) -> list[str]:
    """Python that reruns one failing case: `imports`, then `results = call`, then the failures.
    `functions`: the name each function is called by in `call` -> the function; where that is not
    the function's own name, a line says to bind it."""
    lines = list(imports)
    for name, fn in functions.items():
        if getattr(fn, "__name__", "") != name:
            lines.append(f"{name} = ...  # your function")
    return lines + [f"results = {call}", "print([r.message() for r in results if not r.ok])"]


def own_name(fn, placeholder: str) -> str:
    """The name a replay line calls `fn` by: its own, where that is an identifier (not a lambda)."""
    name = getattr(fn, "__name__", "")
    return name if name.isidentifier() else placeholder


def note_on_error(err: BaseException, what: str, inputs: dict) -> None:
    """Add to an exception raised by the function under test what it was given: the shapes, and
    the layout every oracle weight has (Python 3.11's exception notes; nothing before)."""
    if not hasattr(err, "add_note"):
        return
    shapes = ", ".join(f"{k}={tuple(v.shape)}" if hasattr(v, "shape") else f"{k}={v!r}" for k, v in inputs.items())
    err.add_note(f"raised by the function under test for {what} with {shapes}; every weight is (in, out), applied as "
                 f"x @ w + b: nn.Linear's (out, in) weight is w.t()")
