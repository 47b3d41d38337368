"""Tiny: a randomly initialised 2-layer model on a slice of the demo data; used by the tests.

    python -m sft_jax.train --config configs/tiny.py --workdir /tmp/tiny

Finishes in seconds on CPU; the loss should fall from about ln(512) = 6.2.
"""

from sft_jax.assets import asset_path
from sft_jax.configs import base


def get_config():
    c = base.get_config()
    c.model.path = ""  # random init of c.model.arch (base defaults: 2 layers, hidden 64)
    c.data.tokenizer = asset_path("stories260K")
    c.data.train_files = asset_path("demo/train.jsonl")
    c.data.eval_files = asset_path("demo/eval.jsonl")
    c.data.max_eval_examples = 32
    c.data.seq_len = 128
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 2
    c.train.global_batch_size = 8
    c.train.max_steps = 12
    c.train.log_every = 4
    c.train.progress_bar = False
    c.eval.batch_size = 8
    c.checkpoint.async_save = False
    return c
