"""GPU benchmark: Llama-3.2-1B shapes, sequence 2048 packed, bf16 compute, fp32 master weights.

    python -m sft_jax.bench --config configs/bench/gpu_llama1b.py                 # full FT
    python -m sft_jax.bench --config configs/bench/gpu_llama1b.py --config.lora.enabled=True

Prints a summary, then one JSON line (workload gpu_llama1b, mode full|lora, tokens_per_s, step_s,
mfu against 989 TFLOP/s bf16 on H100/H200, peak_bytes, compile_s, bytes_per_param, ...).
Goals on one H100/H200: full fine-tuning >= 45% MFU, LoRA (r=16, all linear layers)
>= 40% MFU; persistent state <= 16.5 bytes/param (fp32 weights + Adam). All GPU workloads in one
call: `bash benchmarks/gpu_all.sh`.

Random init (`model.path=""`), synthetic packed data (sft_jax/bench.py); `data.train_files`
names the bundled demo file only so that the config parses: the bench ignores it.
Batch 4 x 2048 with the "dots" remat policy (saves projection outputs, recomputes attention):
settings that fit an 80 GB GPU with room to spare. Attention "auto" is cuDNN flash
attention on the GPU (packed segments as a mask, causal blocks skipped); the loss runs over
pieces of 512 positions, so the 4 x 2048 x 128k float32 logits (4.2 GB, twice with their
gradient) are never held at once. That saving costs step time on a GPU: where memory allows,
`--config.model.loss_chunk=0` with a larger batch is faster (docs/benchmarks.md has the
measured settings and their peaks).
"""

from sft_jax.assets import asset_path
from sft_jax.configs import base


def get_config():
    c = base.get_config()
    c.model.path = ""
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = "dots"
    c.model.attention = "auto"
    c.model.loss_chunk = 512
    a = c.model.arch
    a.vocab_size = 128256
    a.hidden_size = 2048
    a.intermediate_size = 8192
    a.num_layers = 16
    a.num_heads = 32
    a.num_kv_heads = 8
    a.head_dim = 64
    a.rope_theta = 500000.0
    a.rms_norm_eps = 1e-5
    a.tie_embeddings = True
    a.max_position_embeddings = 131072
    c.data.train_files = asset_path("demo/train.jsonl")  # ignored by the bench (synthetic data)
    c.data.seq_len = 2048
    c.data.pack_window = 512
    c.optim.learning_rate = 1e-5
    c.optim.warmup_steps = 0
    c.train.global_batch_size = 4
    c.train.micro_batches = 1
    c.train.max_steps = 100
    c.train.progress_bar = False
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.targets = ("*_proj",)  # all linear layers of the blocks
    c.lora.base_dtype = "bfloat16"
    return c
