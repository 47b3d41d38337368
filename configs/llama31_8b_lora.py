"""Llama-3.1-8B-Instruct chat fine-tune with LoRA r=16 on all linear layers; one 80 GB GPU.

    python -m sft_jax.train --config configs/llama31_8b_lora.py --workdir runs/llama31_lora

    # Cloud TPU v5p-8 (4 chips, one host); the workdir must be a directory every host can write:
    launch/tpu_vm.sh --name llama-lora --zone us-east5-a --type v5p-8 -- \
        --config configs/llama31_8b_lora.py --workdir /mnt/shared/llama31_lora \
        --config.train.micro_batches=4

    # afterwards: the merged model (transformers / vLLM) or the PEFT adapter, then a chat
    python -m sft_jax.export --workdir runs/llama31_lora --out runs/llama31_lora_hf
    python -m sft_jax.export --workdir runs/llama31_lora --out runs/llama31_lora_peft --peft
    python -m sft_jax.generate --model runs/llama31_lora_hf

Model: the Hub id below is fetched once at start-up (gated: accept the license on the Hub and
log in first); a local Hugging Face directory works too (`--config.model.path=/path`).

Data: `data/chat.jsonl`, one OpenAI-style conversation per line,
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
(ShareGPT `conversations` rows work as well; the format is recognised per row). Every assistant
turn is trained, rendered with Llama 3.1's own chat template; 2% is held out for eval loss.
Change the file with `--config.data.train_files=...`; see docs/bring_your_data.md.

Hyperparameters: the usual LoRA settings (lr 2e-4, 3% warmup, cosine to 10% of the peak,
2 epochs, clip 1.0, no weight decay, alpha = 2 r, dropout 0.05). A step is 16 packed rows of
4096 tokens (~65k tokens), accumulated as 16 micro-batches of one row on one GPU (4 of 4 rows,
one per chip, on a v5p-8).

Memory per device (python -m sft_jax.plan --platform gpu, docs/tpu_pod.md): on one 80 GB GPU
15.11 GiB of parameters (the frozen bf16 base is 14.96) + 0.16 adapter gradients + 0.31 Adam
moments + 5.85 activations of one 4096-token row with remat="full" (estimate) = 21.43 GiB.

Topology: a TPU v5p-8 (`v5p:2x2x1`, 4 chips) as above; it also fits a v5e-8 (`v5e:2x4`, 8 x
16 GiB) with one row per chip per micro-batch. The TPU compiler's figure for the latter, at
this model's shapes (`DIR` holds only Llama-3.1-8B's config.json), comes from
    python -m sft_jax.plan --config configs/llama31_8b_lora.py --topology v5e:2x4 --compile \
        --config.model.path=DIR --config.train.global_batch_size=8 --config.train.micro_batches=1
its result, dated, is in docs/benchmarks.md (TPU compiler) and docs/tpu_pod.md.
"""

from sft_jax.configs import base


def get_config():
    c = base.get_config()
    c.model.path = "meta-llama/Llama-3.1-8B-Instruct"
    c.model.dtype = "bfloat16"  # compute; the adapters keep float32 master weights
    c.model.param_dtype = "float32"
    c.model.remat = "full"  # recompute each layer in the backward pass: 4096-token rows fit

    c.data.train_files = "data/chat.jsonl"
    c.data.eval_fraction = 0.02
    c.data.seq_len = 4096
    c.data.chat_template = "tokenizer"  # Llama 3.1's template (prefix-preserving)
    c.data.train_on = "all_assistant"

    c.lora.enabled = True
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.dropout = 0.05
    c.lora.targets = ("*_proj",)  # q k v o gate up down
    c.lora.base_dtype = "bfloat16"

    c.optim.learning_rate = 2e-4
    c.optim.warmup_ratio = 0.03
    c.optim.end_lr_ratio = 0.1
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 1.0

    c.train.global_batch_size = 16
    c.train.micro_batches = 16  # one row per micro-batch on one device
    c.train.epochs = 2.0
    c.train.log_every = 10

    c.eval.every_steps = 200
    c.eval.batch_size = 4
    c.checkpoint.every_steps = 200
    c.checkpoint.every_minutes = 30.0  # bounds the work lost to a preemption
    c.checkpoint.keep = 2

    # One axis over all devices: FSDP shards the frozen base; batch rows split over it too.
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    return c
