"""GPU benchmark: Llama-3-8B shapes with LoRA r=16 on all linear layers, sequence 2048 packed.

    python -m sft_jax.bench --config configs/bench/gpu_llama8b.py

Prints a summary, then one JSON line (workload gpu_llama8b, mode lora, tokens_per_s, step_s, mfu
against 989 TFLOP/s bf16 on H100/H200, peak_bytes, compile_s, ...). Goal: >= 45% MFU on
one GPU. LoRA is on by default here because full fine-tuning of 8B parameters with fp32 Adam
(~128 GB of state) does not fit one GPU; `--config.lora.enabled=False` tries it anyway.
All GPU workloads in one call: `bash benchmarks/gpu_all.sh`.

Random init (`model.path=""`) of the frozen base in bf16, synthetic packed data
(sft_jax/bench.py); `data.train_files` names the bundled demo file only so that the config
parses: the bench ignores it. Batch 2 x 2048 with the "dots" remat policy: settings that fit an
80 GB GPU. On a larger one, `--config.train.global_batch_size=4 --config.model.remat=none
--config.model.loss_chunk=0` is faster (docs/benchmarks.md has the measured settings).
"""

from configs.bench import gpu_llama1b


def get_config():
    """The 1B workload's settings (bf16 compute, fp32 masters, dots remat, packed 2048 rows,
    synthetic data) with the Llama-3-8B shapes and LoRA switched on."""
    c = gpu_llama1b.get_config()
    a = c.model.arch
    a.hidden_size = 4096
    a.intermediate_size = 14336
    a.num_layers = 32
    a.head_dim = 128
    a.tie_embeddings = False
    a.max_position_embeddings = 8192
    c.optim.learning_rate = 1e-4
    c.train.global_batch_size = 2
    c.lora.enabled = True
    return c
