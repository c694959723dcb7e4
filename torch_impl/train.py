"""Pretraining with torch: the loop of the book's chapter 5 and appendix D, resumable.

One optimiser step (the mean loss over every target of its micro-batches, N in all):

    model.zero_grad(set_to_none=True)                                  starts from no gradients
    for each of `grad_accum` micro-batches (inputs, targets), each (B_i, T):
        loss = cross_entropy(model(inputs), targets) / (N / n_i)       (B_i, T) -> (), n_i = B_i T
        loss.backward()                                                gradients add up
    norm = clip_grad_norm(all gradients, grad_clip)                    global L2 norm
    lr = lr_at_step(step)                                              warmup, then cosine
    optimizer.step()

Every `eval_every` steps: the mean loss over every target of the first `eval_batches` batches of
the training and validation sets (unshuffled, so every evaluation sees the same batches), a
greedy sample from `sample_prompt`, one line in `log.jsonl`, and the loss plot. Every `checkpoint_every` steps
and at the end: a checkpoint (see `save_run`).

Randomness is explicit: dropout masks come from a torch.Generator seeded with `seed` (the model
is called with `dropout_masks`, so torch's global generator is never used); the batch order
comes from the DataLoader's own seed. A checkpoint stores the step, that generator's state, the
data position (epoch, batch within the epoch), the optimiser state and the loss history, so a
run killed and resumed from its last checkpoint ends bit for bit where an uninterrupted run
ends (on CPU; GPU kernels may not be deterministic).

A non-finite loss or gradient norm (checked with or without clipping) stops the run before the
optimiser touches the weights, with a message; nothing is saved, so the last good checkpoint
stays as it was.

Mixed precision (`autocast_dtype=torch.bfloat16`, float32 model only): the forward passes of
training and evaluation run under bf16 autocast, products in bf16 with float32 accumulation,
while the weights, their gradients and the optimiser state stay float32; backward runs outside
the autocast region, as torch recommends. The greedy sample decodes in float32 (on CPUs that is
the faster decode; linear.py). fp16 is refused: it needs loss scaling, which this loop does not
do. The checkpoint records the autocast dtype and a resume keeps it; on CUDA it also records
whether float32 matmuls ran on TF32 (torch.backends.cuda.matmul.allow_tf32, a process-wide
switch), and `Trainer.resume` sets that switch back as the run had it (off for a state from
before it was recorded), so a resumed run does not change precision with the GPU it lands on.

Several processes (`parallel`, torch_impl/distributed.py): each takes its rows of every
micro-batch (and those rows of the whole batch's dropout masks), its micro-batch losses weighted
by their share of the step's targets over all processes; after the backward the gradients are
summed across the processes, so each takes the step one process would take on the whole batch.
Process 0 writes; a non-finite loss anywhere stops every process at the same step.

numpy_ref/train.py is the same loop over the NumPy model with hand-written backward passes.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch

from torch_impl.device import set_tf32_switches, tf32_switches
from torch_impl.optim import (build_optimizer, clip_grad_norm, load_optimizer_state, lr_at_step, optimizer_state,
                              set_lr)
from torch_impl.train_log import TextProgress, finite_or_null
from torch_impl.train_run import (BatchStream, NonFiniteLoss, TrainResult, TrainSettings, check_finite_weights,
                                  check_same_data, check_same_model, data_fingerprint, fixed_batches, finish_run,
                                  load_run, record_eval, save_run)


def dropout_masks(model, B: int, T: int, gen: torch.Generator) -> dict[str, torch.Tensor] | None:
    """Explicit inverted-dropout masks for every site of DROPOUT_MASKS (0 or 1/(1-p)); None at p=0."""
    cfg = model.config
    p = cfg.drop_rate
    if p == 0.0:
        return None
    C, nh = cfg.emb_dim, cfg.n_heads
    like = dict(device=model.device, dtype=model.dtype)

    def mask(*shape: int) -> torch.Tensor:
        keep = torch.rand(shape, generator=gen, device=gen.device) >= p
        return keep.to(**like) / (1.0 - p)

    masks = {"embedding": mask(B, T, C)}  # (B, T, C)
    for i in range(cfg.n_layers):
        masks[f"h.{i}.attn.weights"] = mask(B, nh, T, T)  # (B, nh, T, T)
        masks[f"h.{i}.attn.out"] = mask(B, T, C)
        masks[f"h.{i}.mlp.out"] = mask(B, T, C)
    return masks


@torch.no_grad()
def evaluate(model, batches) -> float:
    """Mean loss over every target of `batches`, in eval mode (no dropout): each batch's mean loss
    weighted by its B * T targets, so a short last batch counts for the targets it holds (the
    book's `calc_loss_loader` averages per batch; the two agree when the batches have one size)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in batches:
        _, loss = model(inputs.to(model.device), targets.to(model.device))
        total += float(loss) * targets.numel()  # (B, T): B * T targets
        count += targets.numel()
    model.train(was_training)
    return total / count


def dtype_name(dtype: torch.dtype) -> str:
    """"float32" for torch.float32: as the trainer state stores a model's dtype (numpy_ref's names)."""
    return str(dtype).removeprefix("torch.")


def autocast_name(dtype: torch.dtype | None) -> str | None:
    """"bfloat16" for torch.bfloat16, None for no autocast: as the trainer state stores it."""
    return None if dtype is None else dtype_name(dtype)


def autocast_dtype_named(name) -> torch.dtype | None:
    """The inverse of autocast_name, for a trainer state's value (checked)."""
    if name is None:
        return None
    if name != "bfloat16":
        raise ValueError(f"trainer state: autocast {name!r} is not one this trainer runs (bfloat16 or null)")
    return torch.bfloat16


def check_autocast(model, autocast_dtype: torch.dtype | None) -> None:
    """Mixed precision is bf16 autocast over a float32 model (see top); anything else is refused."""
    if autocast_dtype is None:
        return
    if autocast_dtype == torch.float16:
        raise ValueError("autocast float16 needs loss scaling, which this trainer does not do; use bfloat16")
    if autocast_dtype != torch.bfloat16:
        raise ValueError(f"autocast_dtype must be None or torch.bfloat16, got {autocast_dtype!r}")
    if model.dtype != torch.float32:
        raise ValueError(f"bf16 autocast trains a float32 model (float32 weights, gradients and optimiser "
                         f"state); this model is {str(model.dtype).removeprefix('torch.')}")


def _check_split(loader, world_size: int) -> None:
    """ValueError, before anything trains, unless every batch of `loader` has a row for each of the
    `world_size` processes (its last batch, with drop_last=False, too)."""
    n, B = len(loader.dataset), loader.batch_size
    rows = [B] + ([n % B] if not loader.drop_last and n % B else [])
    if min(rows) < world_size:
        raise ValueError(f"a batch of {min(rows)} rows (batch_size={B}, {n} windows, drop_last={loader.drop_last}) "
                         f"cannot be split over {world_size} processes; use drop_last=True or a batch size whose "
                         f"batches all have at least {world_size} rows")


class Trainer:
    """Trains `model` (a torch_impl GPTModel) on `train_loader`; see the module docstring."""

    def __init__(self, model, train_loader, val_loader, settings: TrainSettings, *, out_dir=None,
                 encoding=None, on_step=None, progress_cls=TextProgress, plot=None,
                 autocast_dtype: torch.dtype | None = None, parallel=None) -> None:
        """`parallel`: a torch_impl.distributed.DataParallel when this is one of W processes training
        together (each takes its rows of every batch; process 0 writes); None for one process."""
        check_autocast(model, autocast_dtype)
        self.model, self.settings = model, settings
        self.autocast_dtype = autocast_dtype  # None: every op in the model's dtype
        self.parallel = parallel
        self.checkpoints = out_dir is not None  # on every process: each takes part in each save
        writes = parallel is None or parallel.is_main
        self.out_dir = Path(out_dir) if out_dir is not None and writes else None
        self.encoding = encoding
        self.progress_cls = progress_cls  # (total, initial, enabled, desc) -> update/write/close
        self.plot = plot  # plot(path, history), e.g. gpt_oracle.train_report.save_loss_plot
        self.on_step = on_step  # called as on_step(trainer) after every step (tests use it to "kill" a run)
        s = settings
        self.optimizer = build_optimizer(model, s.optimizer, lr=s.max_lr, betas=s.betas, eps=s.eps,
                                         weight_decay=s.weight_decay, momentum=s.momentum, decay=s.decay)
        self.stream = BatchStream(train_loader)
        self.eval_sets = {"train": fixed_batches(train_loader, s.eval_batches),
                          "val": fixed_batches(val_loader, s.eval_batches) if val_loader is not None else None}
        # saved with the data position: a resume on other validation text would evaluate another set
        self.val_fingerprint = data_fingerprint(val_loader) if val_loader is not None else None
        self.gen = torch.Generator(device=model.device).manual_seed(s.seed)
        self.step = 0
        self.tokens_seen = 0
        self.history = {"steps": [], "evals": []}
        if parallel is not None:
            _check_split(train_loader, parallel.world_size)
            parallel.broadcast_parameters(model)  # every process starts from process 0's weights

    # ---- checkpoints ------------------------------------------------------------------------

    def autocast(self):
        """The autocast region of the forward passes (a no-op without an autocast dtype)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.model.device.type, dtype=self.autocast_dtype)

    def evaluate(self, batches) -> float:
        """`evaluate` of the model under this trainer's autocast."""
        with self.autocast():
            return evaluate(self.model, batches)

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON-ready trainer state, tensors) for `save_run`."""
        opt_state, tensors = optimizer_state(self.optimizer, self.model)
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "settings": self.settings.to_dict(),
                 "data": {"epoch": self.stream.epoch, "index": self.stream.index,
                          "fingerprint": self.stream.fingerprint, "val_fingerprint": self.val_fingerprint},
                 "rng": self.gen.get_state().tolist(), "optimizer": opt_state,
                 "history": finite_or_null(self.history),  # strict JSON: a NaN loss (no validation set) as null
                 "dtype": dtype_name(self.model.dtype), "autocast": autocast_name(self.autocast_dtype),
                 "tf32": self.model.device.type == "cuda" and tf32_switches()[0]}
        if self.model.dtype != torch.float32:
            # model.safetensors holds float32; exact weights for resuming go with the trainer state.
            tensors.update({f"param.{k}": v.detach().clone() for k, v in self.model.state_dict().items()})
        return state, tensors

    def restore(self, state: dict, tensors: dict[str, torch.Tensor], params: dict | None = None,
                config=None) -> None:
        """Position this trainer at a saved state. The model is checked first: the state's dtype,
        and `config` (the checkpoint's, when given) field by field, against this model's. Then the
        trainer's own parts (optimiser, data position, random state), each checked whole; the
        caller's model is written last (`params`, a checkpoint's weights, then the exact weights a
        non-float32 run saves beside its float32 checkpoint), so a state refused on the way leaves
        the model as it was."""
        check_trainer_state(state, self.settings.steps)
        check_same_model(config, state.get("dtype"), self.model.config, dtype_name(self.model.dtype))
        saved = state.get("autocast")  # states written before the option trained without autocast
        if saved != autocast_name(self.autocast_dtype):
            raise ValueError(f"trainer state trained with autocast {saved} but this trainer has "
                             f"{autocast_name(self.autocast_dtype)}; resume with the saved one")
        exact = self.model.dtype != torch.float32
        wanted = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        for source, prefix, given in (("checkpoint", "", params), ("trainer state", "param.", tensors if exact else None)):
            if given is None:
                continue
            missing = [prefix + k for k, shape in wanted.items()
                       if prefix + k not in given or tuple(given[prefix + k].shape) != shape]
            if missing:  # checked before anything changes
                raise KeyError(f"{source} lacks (or has the wrong shape for) {missing[:3]}")
            extra = [k for k in given if k.startswith(prefix) and k[len(prefix):] not in wanted]
            if prefix == "" and extra:  # another model's weights
                raise KeyError(f"checkpoint has weights this model lacks: {sorted(extra)[:3]}")
        # The data and the random state are checked before the optimiser's state, which is the
        # first thing to change (it is checked whole first), so a refused state changes nothing.
        check_same_data(state["data"].get("fingerprint"), self.stream.fingerprint)
        check_same_data(state["data"].get("val_fingerprint"), self.val_fingerprint, "validation")
        position = self.stream.check_position(int(state["data"]["epoch"]), int(state["data"]["index"]))
        try:
            rng = torch.tensor(state["rng"], dtype=torch.uint8)
            torch.Generator(device=self.gen.device).set_state(rng)  # a state of another size or device raises here
        except (RuntimeError, TypeError, OverflowError) as err:  # torch's message, as a bad-input error
            raise ValueError(f"trainer state: rng is no random state of this generator ({err})") from None
        load_optimizer_state(self.optimizer, self.model, state["optimizer"],
                             {k: v for k, v in tensors.items() if not k.startswith("param.")})
        self.stream.seek(*position)
        self.gen.set_state(rng)
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.history = {k: [[math.nan if v is None else v for v in entry] for entry in entries]  # null: NaN
                        for k, entries in state["history"].items()}
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                if params is not None:
                    v.copy_(torch.as_tensor(params[k]))
                if exact:
                    v.copy_(tensors[f"param.{k}"])

    def save(self) -> Path | None:
        if not self.checkpoints:
            return None
        check_finite_weights(dict(self.model.named_parameters()), self.step)  # NonFiniteLoss: float32 files
        if self.parallel is None:
            return save_run(self.out_dir, self.step, self.model.config, self.model.state_dict(), *self.state(),
                            backend="torch")
        # Process 0 writes; every process learns whether it did, so none trains on past a failed save.
        path, error = None, None
        if self.parallel.is_main:
            try:
                path = save_run(self.out_dir, self.step, self.model.config, self.model.state_dict(), *self.state(),
                                backend="torch")
            except Exception as err:  # noqa: BLE001 - re-raised below, after the others are told
                error = err
        if not self.parallel.all_agree(error is None):
            if error is not None:
                raise error
            from torch_impl.distributed import PeerFailed

            raise PeerFailed(f"process 0 failed to write the checkpoint of step {self.step}")
        return path

    # ---- the loop -------------------------------------------------------------------------

    def train_step(self) -> float:
        """One optimiser step over `grad_accum` micro-batches; returns the mean loss over all their
        targets, each micro-batch's mean counting by its share n_i / N of the step's targets (as
        numpy_ref/train.py: the step on the union of the micro-batches)."""
        s, model = self.settings, self.model
        model.train()
        # backward() adds to .grad: drop whatever is there (a caller's backward, or the micro-batches
        # of a step stopped by a non-finite loss), so the step is the gradient of its own batches.
        model.zero_grad(set_to_none=True)
        total = 0.0
        batches = [self.stream.next() for _ in range(s.grad_accum)]  # (B_i, T) each
        n_step = sum(targets.numel() for _, targets in batches)  # N
        for batch in batches:
            inputs, targets = (t.to(model.device) for t in batch)
            masks = dropout_masks(model, inputs.shape[0], inputs.shape[1], self.gen)  # the whole batch's
            self.tokens_seen += inputs.numel()  # every process's rows
            if self.parallel is not None:  # this process's rows, and their masks (distributed.py)
                rows = self.parallel.rows(inputs.shape[0])
                inputs, targets = inputs[rows], targets[rows]
                # copies: a view of the rows would keep the whole batch's masks alive through the backward
                masks = None if masks is None else {k: m[rows].clone() for k, m in masks.items()}
            share = n_step / targets.numel()  # N / n_i: grad_accum when the micro-batches are of one size
            with self.autocast():
                _, loss = model(inputs, targets, dropout_masks=masks)  # (B, T) -> (), float32
            value = float(loss.detach())
            if not math.isfinite(value) and self.parallel is None:  # with peers: checked on the sum below
                raise NonFiniteLoss(f"non-finite loss {value} at step {self.step + 1}")
            (loss / share).backward()  # d(loss n_i / N)/dparam, accumulated into .grad
            total += value / share
        if self.parallel is not None:
            total = self.parallel.sum(total)  # a NaN on any process is a NaN on every one: all stop here
            if not math.isfinite(total):
                raise NonFiniteLoss(f"non-finite loss {total} at step {self.step + 1}")
            self.parallel.sum_gradients(model)  # the whole batch's gradient, the same on every process
        # The norm is checked with or without clipping: a finite loss can still have an inf gradient.
        if s.grad_clip is not None:
            norm = clip_grad_norm(model.parameters(), s.grad_clip)
        else:
            norm = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
        if not math.isfinite(norm):
            raise NonFiniteLoss(f"non-finite gradient norm {norm} at step {self.step + 1}")
        set_lr(self.optimizer, lr_at_step(self.step, max_lr=s.max_lr, min_lr=s.min_lr,
                                          warmup_steps=s.warmup_steps, total_steps=s.steps))
        self.optimizer.step()
        model.zero_grad(set_to_none=True)  # frees the gradients' memory for evaluation and checkpoints
        self.step += 1
        return total

    def sample(self) -> str | None:
        s = self.settings
        if self.encoding is None or not s.sample_prompt or s.sample_tokens == 0:
            return None
        from torch_impl.generate import generate

        ids = torch.tensor([self.encoding.encode(s.sample_prompt)], dtype=torch.int64)  # (1, T)
        out = generate(self.model, ids, s.sample_tokens)  # greedy: (1, T) -> (1, T + n)
        return self.encoding.decode(out[0].tolist())

    def fit(self) -> TrainResult:
        s = self.settings
        shows = s.progress and (self.parallel is None or self.parallel.is_main)
        progress = self.progress_cls(s.steps, self.step, enabled=shows, desc="train (torch)")
        start, start_tokens = time.perf_counter(), self.tokens_seen
        try:
            while self.step < s.steps:
                loss = self.train_step()
                self.history["steps"].append([self.step, self.tokens_seen, loss])
                rate = (self.tokens_seen - start_tokens) / max(time.perf_counter() - start, 1e-9)
                progress.update(self.step, loss, rate)
                if s.eval_every and (self.step % s.eval_every == 0 or self.step == s.steps):
                    record_eval(self, lambda _, batches: self.evaluate(batches), progress)
                if self.checkpoints and self.step < s.steps and s.checkpoint_every and \
                        self.step % s.checkpoint_every == 0:
                    self.save()
                if self.on_step is not None:
                    self.on_step(self)
            progress.close()
            # With or without a checkpoint: a finite loss and gradient can still step the weights
            # to inf (a huge learning rate); the run then ends not ok, as a save would end it.
            check_finite_weights(dict(self.model.named_parameters()), self.step)
            self.save()
        except NonFiniteLoss as err:
            progress.close()
            return finish_run(self, str(err), ok=False, seconds=time.perf_counter() - start)
        return finish_run(self, "finished", ok=True, seconds=time.perf_counter() - start)

    @classmethod
    def resume(cls, run_dir, model, train_loader, val_loader, **kwargs) -> "Trainer":
        """A trainer positioned exactly at the last checkpoint under `run_dir` (model weights
        loaded into `model`); the settings and the autocast dtype are the saved ones (an
        `autocast_dtype` passed here must be the saved one). A model of another config or dtype
        than the checkpoint's is refused (ValueError naming each difference) before anything changes."""
        settings, config, state, tensors, params = load_run(run_dir, backend="torch")
        # Before the trainer is made, whose own checks (autocast over a float64 model) would speak first.
        check_same_model(config, state.get("dtype"), model.config, dtype_name(model.dtype))
        saved = autocast_dtype_named(state.get("autocast"))
        if kwargs.get("autocast_dtype", saved) != saved:
            raise ValueError(f"{run_dir} trained with autocast {state.get('autocast')}, not "
                             f"{autocast_name(kwargs['autocast_dtype'])}")
        kwargs["autocast_dtype"] = saved
        trainer = cls(model, train_loader, val_loader, settings, out_dir=kwargs.pop("out_dir", run_dir), **kwargs)
        trainer.restore(state, tensors, params, config)  # the weights last, once the state is accepted
        if model.device.type == "cuda":  # the run's own TF32 setting (see top), once the resume is accepted
            set_tf32_switches(bool(state.get("tf32", False)), bool(state.get("tf32", False)))
        return trainer


def check_trainer_state(state, steps: int) -> None:
    """The trainer state's own fields, before anything is restored from it: a TypeError or
    ValueError naming the key. `step`, `tokens_seen` and the data position are ints >= 0 (a float
    step was cut to an int, a negative one trained until the schedule refused it), the step at
    most the run's `steps` and, for AdamW, the optimiser's own step count (its bias correction and
    the schedule must agree); `data` an object and `history` an object of lists of entries."""
    if not isinstance(state, dict):
        raise TypeError(f"trainer state must be an object, got {type(state).__name__}")

    def count(where: str, value) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"trainer state: {where} must be an int, got {value!r}")
        if value < 0:
            raise ValueError(f"trainer state: {where} must be >= 0, got {value}")
        return value

    for key in ("step", "tokens_seen", "data", "history", "optimizer", "rng"):
        if key not in state:
            raise KeyError(f"trainer state lacks {key!r}")
    step = count("step", state["step"])
    count("tokens_seen", state["tokens_seen"])
    if step > steps:
        raise ValueError(f"trainer state: step {step} is past the run's {steps} steps")
    data = state["data"]
    if not isinstance(data, dict):
        raise TypeError(f"trainer state: data must be an object, got {type(data).__name__}")
    for key in ("epoch", "index"):
        count(f"data.{key}", data.get(key))
    history = state["history"]
    if not isinstance(history, dict) or not all(
            isinstance(entries, list) and all(isinstance(entry, list) for entry in entries)
            for entries in history.values()):
        raise TypeError("trainer state: history must be an object of lists of [step, value, ...] entries")
    optimizer = state["optimizer"]
    if isinstance(optimizer, dict) and optimizer.get("kind") == "adamw" and optimizer.get("step") != step:
        raise ValueError(f"trainer state: step {step} differs from the AdamW state's step {optimizer.get('step')!r}")
