"""Data-parallel training on torch.distributed: W processes, each holding the whole model and the
whole optimiser, each taking its own rows of every batch; the gradients are summed across the
processes after the backward, so every process takes the step one process takes on the batch.

    micro-batch i of the step, B_i rows -> process r of W takes rows [r B_i // W, (r+1) B_i // W)
    loss_ri = mean loss over its rows' targets (n_ri of them; N = the step's targets, all processes)
    grad    = sum_r sum_i d(loss_ri n_ri / N)/dparam = d(mean loss over all N targets)/dparam

The inner sum is each process's backward (train.py weights each micro-batch by n_ri / N); the
outer one is a single all_reduce (SUM) of the gradients, packed into one flat buffer per dtype.
Every process draws the dropout masks of the whole micro-batch from the same generator and keeps
its rows, so W processes use the masks one process uses: the run does not depend on W beyond
the order of floating-point sums (parity_tests/test_distributed.py: 2 processes against 1).

What must agree across the processes is checked, not assumed: the weights are broadcast from
process 0 when training starts; the loss reported is the all-reduced sum, so a non-finite loss
on any process stops every process at the same step (no process waits forever on a peer that
stopped); after the all_reduce the gradients, their norm and the step are identical everywhere.
Process 0 writes the checkpoints, the log and the plot, and tells the others whether it
succeeded. Evaluation runs on every process (the same batches and weights: the same result).

Backends: gloo on CPU, nccl on CUDA (one GPU per process, cuda:<local rank>). `from_env` joins a
group launched by `torchrun --nproc-per-node W` (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT);
`spawn(fn, W)` starts W processes on this machine (what `gpt-oracle train --nproc W` uses).

Reference: torch.nn.parallel.DistributedDataParallel does the same sum (as a mean), overlapping
it with the backward in buckets; here it is one call after the backward, to be read and checked.
This module is torch_impl's own: numpy_ref trains in one process.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist


class PeerFailed(RuntimeError):
    """Raised by a process that stops because another one failed (process 0's save): the other's
    error is the one to report."""


class ProcessFailed(RuntimeError):
    """A spawned process failed: `rank`, the exception's type name `kind` and its one-line
    `message`, the root cause where several processes failed (see `spawn`)."""

    def __init__(self, rank: int, kind: str, message: str) -> None:
        super().__init__(f"process {rank} of the group failed: {kind}: {message}")
        self.rank, self.kind, self.message = rank, kind, message


class DataParallel:
    """This process's place in a process group: `rank` of `world_size` (the group must be
    initialised, e.g. by `spawn` or `from_env`)."""

    def __init__(self, rank: int, world_size: int) -> None:
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        if not dist.is_initialized():
            raise RuntimeError("DataParallel needs an initialised process group (torch.distributed."
                               "init_process_group; spawn() and from_env() make one)")
        if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise ValueError(f"rank {rank} of {world_size} is not this process's place in the group "
                             f"(rank {dist.get_rank()} of {dist.get_world_size()})")
        self.rank, self.world_size = rank, world_size

    @classmethod
    def from_env(cls, backend: str = "gloo") -> "DataParallel":
        """Join the group torchrun describes in the environment. `backend`: "gloo" (the CPU, the
        default) or "nccl" (CUDA: this process's GPU is cuda:LOCAL_RANK, set here; the caller puts
        its model there). The nccl path has not run in these sessions (no GPU was lent)."""
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"not launched by torchrun: the environment lacks {missing}")
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            dist.init_process_group(backend)
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def is_main(self) -> bool:
        """Process 0: the one that writes."""
        return self.rank == 0

    def rows(self, B: int) -> slice:
        """This process's rows of a batch of B: [r B // W, (r+1) B // W). A batch with fewer rows
        than processes would leave one with nothing to compute: a ValueError naming both."""
        if B < self.world_size:
            raise ValueError(f"a batch of {B} rows cannot be split over {self.world_size} processes (each needs "
                             f"at least one row); use a batch size >= {self.world_size}")
        return slice(self.rank * B // self.world_size, (self.rank + 1) * B // self.world_size)

    def sum(self, value: float) -> float:
        """`value` summed over the processes (float64; a NaN anywhere is NaN everywhere)."""
        t = torch.tensor([value], dtype=torch.float64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())

    def all_agree(self, ok: bool) -> bool:
        """True on every process iff `ok` is True on every process."""
        t = torch.tensor([1 if ok else 0], dtype=torch.int64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def broadcast_parameters(self, model: torch.nn.Module) -> None:
        """Every parameter and buffer as process 0 has it (a model built from the same seed already
        is; this makes it so whatever the caller did)."""
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.data, src=0)

    def sum_gradients(self, model: torch.nn.Module) -> None:
        """Each parameter's .grad summed over the processes, in one all_reduce per dtype: the
        gradients are packed into one flat buffer, reduced, and unpacked. A parameter with no
        gradient on this process contributes zeros (and then holds the sum); one with no gradient
        on any process keeps none, as in one process (an optimiser then leaves it alone)."""
        params = [p for p in model.parameters() if p.requires_grad]
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int64, device=self._device())
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        params = [p for p, h in zip(params, has.tolist()) if h]
        for dtype in sorted({p.dtype for p in params}, key=str):
            group = [p for p in params if p.dtype == dtype]
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in group:
                summed = flat[offset:offset + p.numel()].view_as(p)
                if p.grad is None:
                    p.grad = summed.clone()
                else:
                    p.grad.copy_(summed)
                offset += p.numel()

    def _device(self) -> torch.device:
        """Where a collective's tensors live: the CPU for gloo, this process's GPU for nccl."""
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn: Callable, world_size: int, *args, backend: str | None = None, threads: int | None = None,
          timeout_s: float = 600.0) -> None:
    """Run `fn(parallel, *args)` in `world_size` new processes on this machine, each in one process
    group (gloo on CPU; nccl when `backend="nccl"`, process r on cuda:r), and wait for all of them.
    Each process gets `threads` torch threads (default: the cores over the processes, at least 1).
    A collective that waits longer than `timeout_s` for a peer fails rather than hangs. `fn` must
    be importable by name (a module-level function): the processes are started fresh.

    A failure is raised here as one ProcessFailed naming the root cause: each process records its
    own exception, and where several failed, one that failed of itself is preferred to those that
    failed because a peer did (a closed connection, PeerFailed), whichever process exited first.
    A process interrupted (SIGINT, or its parent gone: each dies with the parent) is a failure too.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    backend = backend or "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"nccl with {world_size} processes needs {world_size} GPUs; "
                         f"{torch.cuda.device_count()} are visible")
    threads = threads or max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                 else os.cpu_count() or 1) // world_size)
    with tempfile.TemporaryDirectory(prefix="gpt-oracle-spawn-") as reports:
        try:
            torch.multiprocessing.spawn(_entry, args=(fn, world_size, free_port(), backend, threads, timeout_s,
                                                      reports, args), nprocs=world_size, join=True)
        except Exception as err:  # noqa: BLE001 - torch's report of the first process it saw exit
            raise _root_cause(Path(reports), world_size, err) from None


def _secondary(err: BaseException) -> bool:
    """Whether `err` is a process stopping because a peer did, not a failure of its own."""
    text = str(err)
    return isinstance(err, (PeerFailed, dist.DistBackendError)) or any(
        words in text for words in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def _root_cause(reports: Path, world_size: int, err: BaseException) -> ProcessFailed:
    """The failure to report, from the processes' own records (see spawn)."""
    found = []
    for rank in range(world_size):
        path = reports / f"error.{rank}.json"
        if path.is_file():
            found.append(json.loads(path.read_text(encoding="utf-8")))
    if not found:  # killed before it could write (a signal): torch's own words, last line
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        return ProcessFailed(getattr(err, "error_index", -1), type(err).__name__, lines[-1] if lines else "")
    best = min(found, key=lambda r: (r["secondary"], r["rank"]))
    return ProcessFailed(best["rank"], best["kind"], best["message"])


def _entry(rank: int, fn: Callable, world_size: int, port: int, backend: str, threads: int, timeout_s: float,
           reports: str, args: tuple) -> None:
    """One spawned process: join the group, run fn, leave the group; its exception recorded."""
    # torch arms "SIGINT when the parent dies" (prctl); a process started with SIGINT ignored (a
    # background job of a script) would not hear it and train on as an orphan.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        try:
            fn(DataParallel(rank, world_size), *args)
        finally:
            dist.destroy_process_group()
    except BaseException as err:  # noqa: BLE001 - recorded for the parent, then raised on
        record = {"rank": rank, "kind": type(err).__name__, "secondary": _secondary(err),
                  "message": " ".join(str(err).split()) or type(err).__name__}
        Path(reports, f"error.{rank}.json").write_text(json.dumps(record), encoding="utf-8")
        if isinstance(err, KeyboardInterrupt):  # torch's wrapper would exit 0 on it: a failure, not a success
            raise SystemExit(130) from None
        raise
