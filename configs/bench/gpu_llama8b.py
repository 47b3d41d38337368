"""GPU benchmark: Llama-3-8B shapes with LoRA r=16 on all linear layers, sequence 2048 packed.

    python -m sft_jax.bench --config configs/bench/gpu_llama8b.py

Prints a summary, then one JSON line (workload gpu_llama8b, mode lora, tokens_per_s, step_s, mfu
against 989 TFLOP/s bf16 on H100/H200, peak_bytes, compile_s, ...). Issue #8 goal: >= 45% MFU on
one GPU. LoRA is on by default here because full fine-tuning of 8B parameters with fp32 Adam
(~128 GB of state) does not fit one GPU; `--config.lora.enabled=False` tries it anyway.
All GPU workloads in one call: `bash benchmarks/gpu_all.sh`.

Random init (`model.path=""`) of the frozen base in bf16, synthetic packed data
(sft_jax/bench.py); `data.train_files` names the bundled demo file only so that the config
parses: the bench ignores it. Batch 2 x 2048 with the "dots" remat policy: a starting point that
fits 80 GB, not yet a tuned one.
"""

from configs import base
from sft_jax.assets import asset_path


def get_config():
    c = base.get_config()
    c.model.path = ""
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = "dots"
    a = c.model.arch
    a.vocab_size = 128256
    a.hidden_size = 4096
    a.intermediate_size = 14336
    a.num_layers = 32
    a.num_heads = 32
    a.num_kv_heads = 8
    a.head_dim = 128
    a.rope_theta = 500000.0
    a.rms_norm_eps = 1e-5
    a.tie_embeddings = False
    a.max_position_embeddings = 8192
    c.data.train_files = asset_path("demo/train.jsonl")  # ignored by the bench (synthetic data)
    c.data.seq_len = 2048
    c.data.pack_window = 512
    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 0
    c.train.global_batch_size = 2
    c.train.micro_batches = 1
    c.train.max_steps = 100
    c.train.progress_bar = False
    c.lora.enabled = True
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.targets = ("*_proj",)  # all linear layers of the blocks
    c.lora.base_dtype = "bfloat16"
    return c
