"""`gpt-oracle bench`: measure the machine, then time both trees against it.

Modules: `machine` (peak GEMM rates, copy bandwidth, what the machine and its libraries are),
`stats` (timing with warm-up, medians and spread), `memory` (peak memory per call), `flops`
(the one FLOP formula, see README.md), `backends` (numpy_ref, torch_impl and Hugging Face
behind one interface), `bench_layers`, `bench_model`, `head_to_head` (the Hugging Face ratios,
the two taking turns call by call), `accuracy` (the error budget of each fast-path setting
against the float64 oracle), `report` (table, JSON, markdown), `plots` and `runner` (the plan
and the progress display). `bench_tokenizer` belongs to the tokenizer.
"""
