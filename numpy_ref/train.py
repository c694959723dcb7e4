"""Pretraining in NumPy: the loop of the book's chapter 5 and appendix D, every step explicit.

One optimiser step (the gradient of the mean loss over every target of its `grad_accum`
micro-batches, N targets in all):

    grads = 0                                                       every step starts from zeros
    for each of `grad_accum` micro-batches (inputs, targets), each (B_i, T):
        masks = model.dropout_masks(B_i, T, rng)                    explicit dropout ({} at p = 0)
        logits, loss, cache = model.forward(inputs, targets, masks) (B_i, T) -> (B_i, T, V), ()
        grads += model.backward(cache) / (N / n_i)                  d(loss n_i / N)/dparams, n_i = B_i T
    norm = clip_grad_norm(grads, grad_clip)                         global L2 norm
    lr = lr_at_step(step)                                           warmup, then cosine
    optimizer.step(grads, lr)                                       params updated in place

Every `eval_every` steps: the mean loss over every target of the first `eval_batches`
unshuffled batches of the training and validation sets, a greedy sample from `sample_prompt`, a
line in `log.jsonl`, the loss plot. Every `checkpoint_every` steps and at the end: a checkpoint (numpy_ref/train_run.py).

Randomness is explicit: the dropout masks come from an np.random.Generator seeded with `seed`;
the batch order from the DataLoader's seed. A checkpoint stores the step, the generator's
state, the data position, the optimiser state (float64 moments) and exact copies of the weights
(model.safetensors holds float32), so a killed and resumed run ends bit for bit where an
uninterrupted run ends. A non-finite loss or gradient norm (checked with or without clipping)
stops the run before the weights change and saves nothing, so the last good checkpoint stays as
it was.

torch_impl/train.py is the same loop on autograd; in float64 the two agree step by step.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from numpy_ref.optim import build_optimizer, clip_grad_norm, global_grad_norm, lr_at_step
from numpy_ref.train_log import TextProgress, finite_or_null
from numpy_ref.train_run import (BatchStream, NonFiniteLoss, TrainResult, TrainSettings, check_finite_weights,
                                 check_same_data, check_same_model, data_fingerprint, fixed_batches, finish_run,
                                 load_run, record_eval, save_run)


def evaluate(model, batches) -> float:
    """Mean loss over every target of `batches`, without dropout: each batch's mean loss weighted
    by its B * T targets, so a short last batch counts for the targets it holds (the book's
    `calc_loss_loader` averages per batch; the two agree when the batches have one size)."""
    total, count = 0.0, 0
    for inputs, targets in batches:
        _, loss, _ = model.forward(inputs, targets)
        total += float(loss) * targets.size  # (B, T): B * T targets
        count += targets.size
    return total / count


def _optimizer(model, s: TrainSettings):
    if s.optimizer == "adamw":
        return build_optimizer(model.params, "adamw", lr=s.max_lr, betas=tuple(s.betas), eps=s.eps,
                               weight_decay=s.weight_decay, decay=s.decay)
    return build_optimizer(model.params, "sgd", lr=s.max_lr, momentum=s.momentum, weight_decay=s.weight_decay,
                           decay=s.decay)


class Trainer:
    """Trains `model` (a numpy_ref GPTModel) on `train_loader`; see the module docstring."""

    def __init__(self, model, train_loader, val_loader, settings: TrainSettings, *, out_dir=None,
                 encoding=None, on_step=None, progress_cls=TextProgress, plot=None) -> None:
        self.model, self.settings = model, settings
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.encoding = encoding
        self.progress_cls = progress_cls  # (total, initial, enabled, desc) -> update/write/close
        self.plot = plot  # plot(path, history), e.g. gpt_oracle.train_report.save_loss_plot
        self.on_step = on_step  # called as on_step(trainer) after every step
        self.optimizer = _optimizer(model, settings)
        self.stream = BatchStream(train_loader)
        self.eval_sets = {"train": fixed_batches(train_loader, settings.eval_batches),
                          "val": fixed_batches(val_loader, settings.eval_batches) if val_loader is not None else None}
        # saved with the data position: a resume on other validation text would evaluate another set
        self.val_fingerprint = data_fingerprint(val_loader) if val_loader is not None else None
        self.rng = np.random.default_rng(settings.seed)
        self.step = 0
        self.tokens_seen = 0
        self.history = {"steps": [], "evals": []}

    # ---- checkpoints ------------------------------------------------------------------------

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        opt_state, arrays = self.optimizer.state_dict()
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "settings": self.settings.to_dict(),
                 "data": {"epoch": self.stream.epoch, "index": self.stream.index,
                          "fingerprint": self.stream.fingerprint, "val_fingerprint": self.val_fingerprint},
                 "rng": self.rng.bit_generator.state, "optimizer": opt_state,
                 "history": finite_or_null(self.history),  # strict JSON: a NaN loss (no validation set) as null
                 "dtype": str(self.model.dtype)}
        if self.model.dtype != np.float32:
            # model.safetensors holds float32; the exact weights go with the trainer state.
            arrays.update({f"param.{k}": v.copy() for k, v in self.model.params.items()})
        return state, arrays

    def restore(self, state: dict, arrays: dict[str, np.ndarray], params: dict[str, np.ndarray] | None = None,
                config=None) -> None:
        """Position this trainer at a saved state. The model is checked first: the state's dtype,
        and `config` (the checkpoint's, when given) field by field, against this model's. Then the
        trainer's own parts (optimiser, data position, random state), each checked whole; the
        caller's model is written last (`params`, a checkpoint's weights, then the exact weights a
        non-float32 run saves beside its float32 checkpoint), so a state refused on the way leaves
        the model as it was."""
        check_trainer_state(state, self.settings.steps)
        check_same_model(config, state.get("dtype"), self.model.config, str(self.model.dtype))
        exact = self.model.dtype != np.float32
        for source, prefix, given in (("checkpoint", "", params), ("trainer state", "param.", arrays if exact else None)):
            if given is None:
                continue
            missing = [prefix + k for k, p in self.model.params.items() if np.shape(given.get(prefix + k)) != p.shape]
            if missing:  # checked before anything changes
                raise KeyError(f"{source} lacks (or has the wrong shape for) {missing[:3]}")
            extra = [k for k in given if k.startswith(prefix) and k[len(prefix):] not in self.model.params]
            if prefix == "" and extra:  # another model's weights
                raise KeyError(f"checkpoint has weights this model lacks: {sorted(extra)[:3]}")
        # The data and the random state are checked before the optimiser's state, which is the
        # first thing to change (it checks its whole state first), so a refused state changes nothing.
        check_same_data(state["data"].get("fingerprint"), self.stream.fingerprint)
        check_same_data(state["data"].get("val_fingerprint"), self.val_fingerprint, "validation")
        position = self.stream.check_position(int(state["data"]["epoch"]), int(state["data"]["index"]))
        type(self.rng.bit_generator)().state = state["rng"]  # a state of another generator raises here
        self.optimizer.load_state_dict(state["optimizer"], {k: v for k, v in arrays.items()
                                                            if not k.startswith("param.")})
        self.stream.seek(*position)
        self.rng.bit_generator.state = state["rng"]
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.history = {k: [[math.nan if v is None else v for v in entry] for entry in entries]  # null: NaN
                        for k, entries in state["history"].items()}
        for k, p in self.model.params.items():  # in place: the optimiser holds these arrays
            if params is not None:
                p[...] = params[k]
            if exact:
                p[...] = arrays[f"param.{k}"]

    def save(self) -> Path | None:
        if self.out_dir is None:
            return None
        check_finite_weights(self.model.params, self.step)  # NonFiniteLoss: a checkpoint holds float32
        return save_run(self.out_dir, self.step, self.model.config, self.model.params, *self.state(), backend="numpy")

    # ---- the loop -------------------------------------------------------------------------

    def train_step(self) -> float:
        """One optimiser step over `grad_accum` micro-batches; returns the mean loss over all their
        targets. Each micro-batch's mean loss counts by its share of the step's targets, n_i / N:
        a short last batch (drop_last=False) counts for the targets it holds, and the step is the
        step on the union of the micro-batches (with micro-batches of one size, N / n_i is
        grad_accum exactly)."""
        s, model = self.settings, self.model
        grads = {k: np.zeros_like(p) for k, p in model.params.items()}
        total = 0.0
        batches = [self.stream.next() for _ in range(s.grad_accum)]  # (B_i, T) each
        n_step = sum(targets.size for _, targets in batches)  # N
        for inputs, targets in batches:
            share = n_step / targets.size  # N / n_i
            masks = model.dropout_masks(inputs.shape[0], inputs.shape[1], self.rng)
            _, loss, cache = model.forward(inputs, targets, dropout_masks=masks or None)  # (B, T) -> ()
            value = float(loss)
            if not math.isfinite(value):
                raise NonFiniteLoss(f"non-finite loss {value} at step {self.step + 1}")
            for k, g in model.backward(cache).items():
                grads[k] += g / share  # d(loss n_i / N)/dparam, summed over micro-batches
            total += value / share
            self.tokens_seen += inputs.size
        # The norm is checked with or without clipping: a finite loss can still have an inf gradient.
        norm = clip_grad_norm(grads, s.grad_clip) if s.grad_clip is not None else global_grad_norm(grads)
        if not math.isfinite(norm):
            raise NonFiniteLoss(f"non-finite gradient norm {norm} at step {self.step + 1}")
        lr = lr_at_step(self.step, max_lr=s.max_lr, min_lr=s.min_lr, warmup_steps=s.warmup_steps,
                        total_steps=s.steps)
        self.optimizer.step(grads, lr=lr)
        self.step += 1
        return total

    def sample(self) -> str | None:
        s = self.settings
        if self.encoding is None or not s.sample_prompt or s.sample_tokens == 0:
            return None
        from numpy_ref.generate import generate

        ids = np.array([self.encoding.encode(s.sample_prompt)], dtype=np.int64)  # (1, T)
        out = generate(self.model, ids, s.sample_tokens)  # greedy: (1, T) -> (1, T + n)
        return self.encoding.decode(out[0].tolist())

    def fit(self) -> TrainResult:
        s = self.settings
        progress = self.progress_cls(s.steps, self.step, enabled=s.progress, desc="train (numpy)")
        start, start_tokens = time.perf_counter(), self.tokens_seen
        try:
            while self.step < s.steps:
                loss = self.train_step()
                self.history["steps"].append([self.step, self.tokens_seen, loss])
                rate = (self.tokens_seen - start_tokens) / max(time.perf_counter() - start, 1e-9)
                progress.update(self.step, loss, rate)
                if s.eval_every and (self.step % s.eval_every == 0 or self.step == s.steps):
                    record_eval(self, evaluate, progress)
                if self.out_dir is not None and self.step < s.steps and s.checkpoint_every and \
                        self.step % s.checkpoint_every == 0:
                    self.save()
                if self.on_step is not None:
                    self.on_step(self)
            progress.close()
            # With or without a checkpoint: a finite loss and gradient can still step the weights
            # to inf (a huge learning rate); the run then ends not ok, as a save would end it.
            check_finite_weights(self.model.params, self.step)
            self.save()
        except NonFiniteLoss as err:
            progress.close()
            return finish_run(self, str(err), ok=False, seconds=time.perf_counter() - start)
        return finish_run(self, "finished", ok=True, seconds=time.perf_counter() - start)

    @classmethod
    def resume(cls, run_dir, model, train_loader, val_loader, **kwargs) -> "Trainer":
        """A trainer positioned exactly at the last checkpoint under `run_dir` (weights loaded
        into `model`); the settings are the saved ones. A model of another config or dtype than the
        checkpoint's is refused (ValueError naming each difference) before anything changes."""
        settings, config, state, arrays, params = load_run(run_dir, backend="numpy")
        check_same_model(config, state.get("dtype"), model.config, str(model.dtype))  # before the trainer is made
        trainer = cls(model, train_loader, val_loader, settings, out_dir=kwargs.pop("out_dir", run_dir), **kwargs)
        trainer.restore(state, arrays, params, config)  # the weights last, once the state is accepted
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
