"""`gpt-oracle check`'s checkpoint rows (checks.py runs them for every configuration): files
written by either tree and read by both, the tensors' names and shapes as the Hugging Face hub's
GPT-2 has them, and a tied model's config.json in the hub's GPT-2 layout. Rows, tolerances and the model builders are checks.py's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from parity_tests.compare import compare
from parity_tests.tolerances import forward_tol

if TYPE_CHECKING:
    from parity_tests.checks import Row


# The keys of the config.json published with OpenAI's GPT-2 on the Hugging Face hub
# (openai-community/gpt2): no tie_word_embeddings (GPT2Config's default, True, applies), n_ctx
# beside n_positions, and no gpt_oracle block.
HUB_GPT2_KEYS = ("activation_function", "architectures", "attn_pdrop", "bos_token_id", "embd_pdrop", "eos_token_id",
                 "initializer_range", "layer_norm_epsilon", "model_type", "n_ctx", "n_embd", "n_head", "n_layer",
                 "n_positions", "resid_pdrop", "vocab_size")


def hub_tensor_layout(config_d: dict) -> dict[str, tuple[int, ...]]:
    """The tensors of model.safetensors as transformers' GPT2LMHeadModel names and shapes them
    (Conv1D weights (in, out); c_attn's bias present even where the config has none, as zeros),
    with lm_head.weight (V, C) only for an untied head: written here from the configuration,
    not by either tree's writer."""
    C, V, n_ctx = config_d["emb_dim"], config_d["vocab_size"], config_d["context_length"]
    layout = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (n_ctx, C),
              "transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)}
    for i in range(config_d["n_layers"]):
        h = f"transformer.h.{i}."
        layout.update({h + "ln_1.weight": (C,), h + "ln_1.bias": (C,), h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
                       h + "attn.c_attn.weight": (C, 3 * C), h + "attn.c_attn.bias": (3 * C,),
                       h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
                       h + "mlp.c_fc.weight": (C, 4 * C), h + "mlp.c_fc.bias": (4 * C,),
                       h + "mlp.c_proj.weight": (4 * C, C), h + "mlp.c_proj.bias": (C,)})
    if not config_d["tie_embeddings"]:
        layout["lm_head.weight"] = (V, C)
    return layout


def layout_problems(writer: str, path: Path, want: dict[str, tuple[int, ...]]) -> list[str]:
    """How a written model.safetensors differs from `want` (names, shapes, float32), in words."""
    from safetensors.numpy import load_file

    got = load_file(str(path))
    problems = [f"{writer} wrote no {k}" for k in want if k not in got]
    problems += [f"{writer} wrote an extra {k}" for k in got if k not in want]
    problems += [f"{writer}'s {k} is {got[k].shape} {got[k].dtype}, the hub's {want[k]} float32"
                 for k in want if k in got and (got[k].shape != want[k] or got[k].dtype != np.float32)]
    return problems


def checkpoint_rows(config_name: str, config_d: dict, seed: int = 0, device: str = "cpu") -> list[Row]:
    """Saved by either tree, loaded by both (torch_impl on `device`): the same logits."""
    import tempfile
    import torch

    from parity_tests import models
    from parity_tests.checks import Row, guarded, perturbed_numpy_model, row_from

    def run() -> list[Row]:
        from numpy_ref.model import GPTModel as NpModel
        from torch_impl.model import GPTModel as TModel

        np_model = perturbed_numpy_model(config_d, seed)
        ids, _ = models.random_batch(config_d, 2, min(6, config_d["context_length"]), seed)
        ids_t = torch.from_numpy(ids).to(device)
        logits = {}  # reader -> its logits; each model is dropped once run (a preset's is 1 GB in float64)

        def torch_reads(d) -> np.ndarray:
            with torch.no_grad():
                return models.to_numpy(TModel.from_pretrained(d, device=device).double().eval()(ids_t))

        layout = hub_tensor_layout(config_d)
        problems = []
        with tempfile.TemporaryDirectory() as d:
            np_model.save_pretrained(d)
            problems += layout_problems("numpy_ref", Path(d) / "model.safetensors", layout)
            logits["numpy->torch"] = torch_reads(d)
            logits["numpy->numpy"] = np.asarray(NpModel.from_pretrained(d)(ids))
        # The other way: saved by torch_impl (from the oracle's float64 weights), read by both; then,
        # for a tied model, its config.json cut to the keys of GPT-2's on the Hugging Face hub (no
        # tie_word_embeddings, whose default is True; no gpt_oracle block), read by both.
        with tempfile.TemporaryDirectory() as d:
            models.build_torch_model(config_d, np_model.params, dtype="float64", device=device).save_pretrained(d)
            problems += layout_problems("torch_impl", Path(d) / "model.safetensors", layout)
            logits["torch->numpy"] = np.asarray(NpModel.from_pretrained(d)(ids))
            logits["torch->torch"] = torch_reads(d)
            if config_d["tie_embeddings"]:
                written = json.loads((Path(d) / "config.json").read_text())
                hub_layout = {k: written[k] for k in HUB_GPT2_KEYS if k in written}
                (Path(d) / "config.json").write_text(json.dumps(hub_layout))
                logits["hub-style config.json ->torch"] = torch_reads(d)
                logits["hub-style config.json ->numpy"] = np.asarray(NpModel.from_pretrained(d)(ids))
        # Checkpoints hold float32: compare against the oracle run on the float32-rounded weights.
        rounded = {k: v.astype(np.float32).astype(np.float64) for k, v in np_model.params.items()}
        del np_model
        ref = np.asarray(models.build_numpy_model(config_d, seed=seed, params=rounded)(ids))
        tol = forward_tol("float64")
        label = f"checkpoint[{config_name}]"
        names = Row(f"{label} tensors as the hub's GPT-2 names them ({len(layout)}, both writers)", "float32",
                    float(len(problems)), None, "exact", "MISMATCH" if problems else "ok", "; ".join(problems[:3]))
        return [row_from(f"{label} {how} logits", "float64", [compare(how, got, ref, tol)], tol)
                for how, got in logits.items()] + [names]

    return guarded(f"checkpoint[{config_name}]", "float64", run)
