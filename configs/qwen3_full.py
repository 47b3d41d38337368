"""Qwen3 full fine-tuning (every weight trained): 4B on a TPU v5p-8, or 8B on a v5p-32 pod slice.

    # Qwen3-4B-Instruct-2507 on a Cloud TPU v5p-8 (4 chips, one host):
    launch/tpu_vm.sh --name qwen3-4b --zone us-east5-a --type v5p-8 -- \
        --config configs/qwen3_full.py --workdir /mnt/shared/qwen3_4b

    # the same on one 80 GB GPU: one row per micro-batch, Adam moments in bf16
    python -m sft_jax.train --config configs/qwen3_full.py --workdir runs/qwen3_4b \
        --config.train.micro_batches=32 --config.optim.state_dtype=bfloat16

    # Qwen3-8B on a v5p-32 slice (16 chips on 4 hosts; every host runs the same command):
    launch/tpu_vm.sh --name qwen3-8b --zone us-east5-a --type v5p-32 -- \
        --config configs/qwen3_full.py:8b --workdir /mnt/shared/qwen3_8b

    python -m sft_jax.export --workdir /mnt/shared/qwen3_4b --out qwen3_4b_sft   # HF directory

Presets (`configs/qwen3_full.py:NAME`): `4b` (default) Qwen/Qwen3-4B-Instruct-2507, `8b`
Qwen/Qwen3-8B. Hub ids are fetched at start-up; a local directory works too
(`--config.model.path=/path`).

Data: `data/sharegpt.json`, ShareGPT conversations (a JSON list, or JSONL):
    {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}
Qwen3-4B-Instruct-2507's template renders earlier turns unchanged, so every assistant turn is
trained. Qwen3-8B's stock template drops the <think> block of earlier assistant turns (it is not
prefix-preserving), so the 8b preset trains the last assistant turn of each conversation; to
train every turn, point `data.chat_template` at a prefix-preserving .jinja file
(docs/bring_your_data.md).

Hyperparameters: the usual full fine-tuning settings (lr 1e-5, 5% warmup, cosine to 10% of the
peak, 2 epochs, clip 1.0, weight decay 0.01, bf16 compute with float32 master weights and Adam
moments). A step is 32 packed rows of 4096 tokens (~131k tokens) for 4b, 64 rows for 8b.

Memory (`python -m sft_jax.plan --config configs/qwen3_full.py[:8b] --devices N
--device_memory_gib G`, run on a local copy of the model's config.json; docs/tpu_pod.md):
  4b on 4 x 95 GiB (mesh fsdp=4, 2 rows per chip per micro-batch, remat full, --platform tpu):
     3.75 GiB weights + 3.75 gradients + 7.49 Adam + 16.32 activations (estimate) = 31.30 GiB
     per chip: fits.
  4b on 1 x 80 GiB with micro_batches=32 (1 row, --platform gpu): 14.98 + 14.98 + 29.97 +
     20.90 = 80.83 GiB: does NOT fit with float32 Adam moments; with
     --config.optim.state_dtype=bfloat16 the moments take 14.98 and the total is 65.85 GiB: fits.
  8b on 16 x 95 GiB (fsdp=16, 2 rows per chip): 1.91 + 1.91 + 3.81 + 16.31 = 23.93 GiB: fits.

Topology: 4b on a TPU v5p-8 (`v5p:2x2x1`), 8b on a v5p-32 (`v5p:2x2x4`). The TPU compiler's
figure for 4b at its real shapes (`DIR` holds only Qwen3-4B-Instruct-2507's config.json) comes
from
    python -m sft_jax.plan --config configs/qwen3_full.py --topology v5p:2x2x1 --compile \
        --config.model.path=DIR
its result, dated, is in docs/benchmarks.md (TPU compiler) and docs/tpu_pod.md; for 8b run the
same with `:8b --topology v5p:2x2x4`.
"""

from sft_jax.configs import base

PRESETS = {
    # name: (hub id, train_on, global batch rows, micro-batches)
    "4b": ("Qwen/Qwen3-4B-Instruct-2507", "all_assistant", 32, 4),
    "8b": ("Qwen/Qwen3-8B", "last_assistant", 64, 2),
}


def get_config(preset: str = "4b"):
    if preset not in PRESETS:
        raise ValueError(f"configs/qwen3_full.py: unknown preset {preset!r}; use {list(PRESETS)}")
    model_path, train_on, batch, micro = PRESETS[preset]
    c = base.get_config()
    c.model.path = model_path
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"  # master weights and Adam moments in float32
    c.model.remat = "full"  # recompute each layer in the backward pass: 4096-token rows fit

    c.data.train_files = "data/sharegpt.json"
    c.data.eval_fraction = 0.02
    c.data.seq_len = 4096
    c.data.chat_template = "tokenizer"
    c.data.train_on = train_on

    c.optim.learning_rate = 1e-5
    c.optim.warmup_ratio = 0.05
    c.optim.end_lr_ratio = 0.1
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0

    c.train.global_batch_size = batch
    c.train.micro_batches = micro
    c.train.epochs = 2.0
    c.train.log_every = 10

    c.eval.every_steps = 200
    c.eval.batch_size = batch // micro
    c.checkpoint.every_steps = 200
    c.checkpoint.every_minutes = 30.0
    c.checkpoint.keep = 2

    # Fully sharded data parallel over every chip: weights, gradients and Adam moments are split
    # 1/N per chip, and the batch rows are split over the same axis.
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    return c
