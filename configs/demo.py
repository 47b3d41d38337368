"""Demo: fine-tune the real pretrained stories260K model to answer questions about short stories.

    python -m sft_jax.train --config configs/demo.py --workdir /tmp/demo

Runs in about a minute on 2 CPU cores from bundled data only. Prints a before/after table:
held-out loss, perplexity and token accuracy, exact match of the greedy answer (near 0 before:
the pretrained model just continues the story; high after), and the perplexity of general
stories (sft_jax/assets/general), which shows what the fine-tuning cost. The measured figures
and timings, with their date and machine, are in docs/benchmarks.md ("The demo").
"""

from sft_jax.assets import asset_path
from sft_jax.configs import base


def get_config():
    c = base.get_config()
    c.model.path = asset_path("stories260K")
    c.data.train_files = asset_path("demo/train.jsonl")
    c.data.eval_files = asset_path("demo/eval.jsonl")
    c.data.seq_len = 256
    c.optim.learning_rate = 3e-3
    c.optim.warmup_ratio = 0.05
    c.optim.weight_decay = 0.0
    c.train.global_batch_size = 16
    c.train.epochs = 1.0
    c.train.log_every = 10
    c.eval.every_steps = 40
    c.eval.batch_size = 16
    c.eval.generate_examples = 200
    c.eval.max_new_tokens = 8
    c.eval.samples = 4  # generations logged at every periodic eval
    c.eval.general_text_files = asset_path("general/stories.txt")  # forgetting check
    c.checkpoint.every_steps = 40
    return c
