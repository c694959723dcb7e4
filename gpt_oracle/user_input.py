"""Bad input on the command line: one line on stderr, exit status 2, nothing written.

Every `gpt-oracle` command exits with

    0  success
    1  a real negative result: `check` or `diff` found a mismatch, `train` stopped on a
       non-finite loss
    2  bad input: an option, a path, a configuration, a device or a checkpoint that cannot be
       used (argparse's own usage errors exit 2 as well)

A command turns what the user typed into objects (numbers, configurations, paths, devices,
checkpoints) before it does any work or writes any file. Numbers are checked by the argparse
types below; the rest inside `with user_input("--option VALUE"):`, where the library's
documented bad-input exceptions (ValueError, which CheckpointError is, TypeError, OSError)
become a `UserError` that names the option. `@reports_user_errors` on a command's `run` prints
a UserError as `gpt-oracle COMMAND: error: MESSAGE` and returns 2. Anything raised outside
those boundaries is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

EXIT_OK = 0
EXIT_FAILED = 1  # a mismatch, a non-finite loss: the answer, not a usage problem
EXIT_USAGE = 2  # what argparse returns for its own usage errors
# The status a shell reports for a process that SIGPIPE ended (128 + 13): a command whose output
# pipe closed before its work was done (its result, printed by `print_result`, keeps its status).
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE

# What the library raises for input it refuses (CheckpointError and json's errors are
# ValueErrors; a missing or unreadable file is an OSError).
BAD_INPUT = (ValueError, TypeError, OSError)


def out_of_memory(err: BaseException) -> bool:
    """Whether an exception is an allocation failure: NumPy's MemoryError, or torch's RuntimeError
    from its allocators (torch.OutOfMemoryError on CUDA, "can't allocate memory" on the CPU)."""
    if isinstance(err, MemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and (type(err).__name__ == "OutOfMemoryError"
                                              or "can't allocate memory" in text or "out of memory" in text)


class UserError(Exception):
    """Bad input; the message names the option or file, the value and the limit."""


def one_line(exc: BaseException) -> str:
    """The exception's message on one line, without the noise of OSError's and KeyError's str()."""
    if isinstance(exc, OSError) and exc.strerror:  # "[Errno 2] ..." reads worse than the plain reason
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str) and " " not in exc.args[0]:
        return f"missing key {exc.args[0]!r}"  # a bare KeyError('step') says only "'step'"
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(text.splitlines()) or type(exc).__name__


@contextlib.contextmanager
def user_input(what: str | None) -> Iterator[None]:
    """Turn the library's bad-input exceptions raised inside into a UserError whose message
    starts with `what` (e.g. "--config bogus"). Keep the block to the call that reads the input:
    the same exception raised by a bug elsewhere must keep its traceback."""
    try:
        yield
    except UserError:
        raise
    except BAD_INPUT as exc:
        text = one_line(exc)
        if what and isinstance(exc, OSError) and exc.filename and str(exc.filename) in what:
            text = exc.strerror or text  # the path is named once
        raise UserError(f"{what}: {text}" if what else text) from exc


def reports_user_errors(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """For a command's `run(args)`: a UserError becomes one line on stderr and EXIT_USAGE."""
    command = run.__module__.rsplit(".", 1)[-1]

    @functools.wraps(run)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except UserError as err:
            print(f"gpt-oracle {command}: error: {err}", file=sys.stderr)
            return EXIT_USAGE
        except BrokenPipeError as exc:  # a reader left (`| head`, a FIFO) while the command still ran
            _discard_stdout()
            with contextlib.suppress(OSError):  # stderr may be the closed pipe too
                print(f"gpt-oracle {command}: stopped: {one_line(exc)} (the reader of its output left)",
                      file=sys.stderr)
            return EXIT_BROKEN_PIPE

    return wrapper


# ---- standard output that a reader may close (`gpt-oracle info | head -2`) --------------------


def print_result(text: str) -> None:
    """Print a command's result to stdout. A reader that stops early (`| head`) is no error: the
    rest of the text goes nowhere and the command goes on to return its own exit status, where
    Python would end it with a BrokenPipeError traceback (and again at exit, flushing stdout)."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        _discard_stdout()


def _discard_stdout() -> None:
    """Point stdout at the null device, so that later writes and the flush at exit succeed
    (Python's documented recipe for SIGPIPE: docs.python.org/3/library/signal.html)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a file descriptor (captured in tests): nothing to redirect
        pass


# ---- argparse types: the option's name, the value and the limit in one message ---------------


def path_text(text: str) -> str:
    """An argparse type for a file or folder option: any path but the empty one, which Path("")
    would read as the current directory (`--checkpoint "$UNSET"` must not check the folder you
    are in, nor `--out ""` train into it)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path (is the variable it came from unset?); give a file or folder")
    return text


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def int_in(low: int, high: int, *, high_text: str | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (`high_text` shows the limit, e.g. "2**64 - 1")."""
    limit = f"an integer in [{low}, {high_text or high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {limit}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {limit}, got {value}")
        return value

    parse.__name__ = limit
    return parse


def number_in(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = True
              ) -> Callable[[str], float]:
    """An argparse type: a finite float in the interval from low to high (closed at low and open
    at high unless told otherwise; high = inf means no upper limit)."""
    if math.isinf(high):
        limit = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        limit = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (math.isfinite(value) and above and below):
            raise argparse.ArgumentTypeError(f"must be {limit}, got {text}")
        return value

    parse.__name__ = limit
    return parse


# ---- devices and output files, checked before any work ---------------------------------------


def check_device(name: str, backend: str = "torch") -> None:
    """A UserError unless `name` is a torch device present on this machine (the numpy backend
    runs on the CPU only)."""
    if backend == "numpy":
        if name != "cpu":
            raise UserError(f"--device {name}: the numpy backend runs on the CPU only")
        return
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: not a torch device (expected cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise UserError(f"--device {name}: this torch ({torch.__version__}) was built without CUDA")
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: torch sees no CUDA device on this machine")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise UserError(f"--device {name}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise UserError(f"--device {name}: expected cpu, cuda, cuda:N or mps")


def check_dtype_on_device(dtype: str, device: str) -> None:
    """A UserError for --dtype tf32 off CUDA: TF32 is a mode of NVIDIA tensor cores for float32
    matmuls; elsewhere the run would be plain float32 judged by TF32's looser tolerance."""
    if dtype == "tf32" and not device.startswith("cuda"):
        raise UserError(f"--dtype tf32 on --device {device}: TF32 is a CUDA matmul mode; on {device} the "
                        f"products are plain float32 (use --dtype float32)")


def check_output_file(option: str, path: str) -> None:
    """A UserError unless a file can be written at `path` (its directory exists and takes a new
    file); checked before the work whose result goes there. Nothing at `path` is touched."""
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{option} {path}: is a directory")
    parent = target.parent
    if not parent.is_dir():
        raise UserError(f"{option} {path}: the directory {str(parent)!r} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{target.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise UserError(f"{option} {path}: cannot write in {str(parent)!r} ({exc.strerror or exc})") from None


# ---- prompts --------------------------------------------------------------------------------


def encode_prompt(encoding, prompt: str, option: str = "--prompt") -> list[int]:
    """The GPT-2 ids of a prompt typed on the command line, as the trees encode it (special tokens
    refused); a UserError naming `option` and the prompt when it has none or holds a special token."""
    shown = f"{option} {prompt!r}" if len(prompt) <= 60 else f"{option} {prompt[:60]!r}..."
    special = sorted(token for token in encoding.special_tokens_set if token in prompt)
    if special:  # the library's message speaks of encode()'s arguments, which a command line has not
        raise UserError(f"{shown}: holds the special token {special[0]!r}; a prompt is encoded as text, where "
                        f"special tokens are refused")
    with user_input(shown):
        ids = encoding.encode(prompt)
    if not ids:
        raise UserError(f"{shown}: the prompt must hold at least one token")
    return ids
