"""The CPU benchmark workload (also the sft_jax half of the TRL comparison).

    python -m sft_jax.bench --config configs/bench/cpu_small.py

Prints a summary, then one JSON line (workload cpu_small, mode full, tokens_per_s, step_s, mfu,
peak_bytes, compile_s, ...). Model: Llama architecture, random init, vocab 8192, hidden 256,
4 layers, 8 heads and 4 kv heads of 32, mlp 688; sequence 512, batch 8 packed rows, AdamW, fp32.
Variants: `--config.data.pack_split=True` (less padding), `--config.lora.enabled=True` (LoRA).
What it measured, on which machine and day, is in docs/benchmarks.md (Performance, current
figures).

Data is synthetic (sft_jax/bench.py: seeded prompts of 40-300 and completions of 20-200 tokens,
completion-only loss, best-fit packing); `data.train_files` names the bundled demo file only so
that the config parses, and the bench ignores it (and the tokenizer).
"""

from sft_jax.assets import asset_path
from sft_jax.configs import base


def get_config():
    c = base.get_config()
    c.model.path = ""  # random init of the arch below
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.remat = "none"
    # Unrolled layers: +10% tokens/s on CPU at 4 layers (docs/benchmarks.md, levers); compile
    # time is the same at this depth. Attention "auto" is "blocked" on CPU
    # (sft_jax/model/blocked_attention.py).
    c.model.scan_layers = False
    a = c.model.arch
    a.vocab_size = 8192
    a.hidden_size = 256
    a.intermediate_size = 688
    a.num_layers = 4
    a.num_heads = 8
    a.num_kv_heads = 4
    a.head_dim = 32
    a.tie_embeddings = False
    a.max_position_embeddings = 2048
    c.data.train_files = asset_path("demo/train.jsonl")  # ignored by the bench (synthetic data)
    c.data.seq_len = 512
    c.data.pack_window = 512
    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.0
    c.train.global_batch_size = 8
    c.train.micro_batches = 1
    c.train.max_steps = 100
    c.train.progress_bar = False
    return c
