"""Gemma 3 1B (instruction-tuned, text-only) with LoRA r=16: a TPU v5e-8 or one 24 GB GPU.

    # Cloud TPU v5e-8 (8 chips of 16 GiB, one host; v5e needs its own runtime version):
    launch/tpu_vm.sh --name gemma --zone us-west4-a --type v5litepod-8 \
        --version v2-alpha-tpuv5-lite -- \
        --config configs/gemma3_lora.py --workdir /mnt/shared/gemma3_lora

    # one 24 GB GPU: one row per micro-batch
    python -m sft_jax.train --config configs/gemma3_lora.py --workdir runs/gemma3_lora \
        --config.train.micro_batches=32

    python -m sft_jax.export --workdir runs/gemma3_lora --out runs/gemma3_lora_peft --peft

Model: google/gemma-3-1b-it (gated: accept the license on the Hub and log in first). Only the
text-only Gemma 3 checkpoints (Gemma3ForCausalLM: 270m, 1b) load; the 4b/12b/27b checkpoints
are vision-language models (Gemma3ForConditionalGeneration) and are refused.

Data: `data/alpaca.json`, Alpaca instruction rows (a JSON list, or JSONL):
    {"instruction": "...", "input": "", "output": "..."}
rendered with Gemma's own chat template (<start_of_turn>user ... <end_of_turn>); the response
and its <end_of_turn> are trained. 2% is held out for eval loss.

Hyperparameters: lr 1e-4, 5% warmup, cosine to 10% of the peak, 3 epochs, clip 1.0, no weight
decay, r=16, alpha=32, dropout 0.05, all seven linear projections. A step is 32 packed rows of
2048 tokens; on a v5e-8 each micro-batch has one row per chip.

Memory (`python -m sft_jax.plan --platform tpu`, docs/tpu_pod.md): per v5e chip (16 GiB),
0.27 GiB of parameters (the frozen bf16 base, FSDP over 8 chips, is 0.23) + 39 MiB adapter
gradients + 77 MiB Adam moments + 6.78 GiB of activations (estimate; Gemma's 262k-token
vocabulary makes the float32 logits the largest term) = 7.17 GiB.

Topology: a TPU v5e-8 (`v5e:2x4`). The TPU compiler's figure at this model's shapes (`DIR`
holds only gemma-3-1b-it's config.json) comes from
    python -m sft_jax.plan --config configs/gemma3_lora.py --topology v5e:2x4 --compile \
        --config.model.path=DIR
its result, dated, is in docs/benchmarks.md (TPU compiler) and docs/tpu_pod.md: above the
plan's estimate here, mostly the float32 loss over the 262k-token vocabulary.
"""

from sft_jax.configs import base


def get_config():
    c = base.get_config()
    c.model.path = "google/gemma-3-1b-it"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"  # adapters' master weights
    c.model.remat = "dots"

    c.data.train_files = "data/alpaca.json"
    c.data.eval_fraction = 0.02
    c.data.seq_len = 2048
    c.data.chat_template = "tokenizer"  # Gemma 3's template (prefix-preserving)
    c.data.train_on = "all_assistant"

    c.lora.enabled = True
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.dropout = 0.05
    c.lora.targets = ("*_proj",)
    c.lora.base_dtype = "bfloat16"

    c.optim.learning_rate = 1e-4
    c.optim.warmup_ratio = 0.05
    c.optim.end_lr_ratio = 0.1
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 1.0

    c.train.global_batch_size = 32
    c.train.micro_batches = 4
    c.train.epochs = 3.0
    c.train.log_every = 10

    c.eval.every_steps = 100
    c.eval.batch_size = 8
    c.checkpoint.every_steps = 100
    c.checkpoint.every_minutes = 30.0
    c.checkpoint.keep = 2

    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    return c
