"""Qwen3-30B-A3B (mixture of experts: 128 experts, 8 per token, 3B active parameters) chat
fine-tune with LoRA r=16 on the attention projections; a TPU v5p-8.

    # Cloud TPU v5p-8 (4 chips, one host); the workdir must be a directory every host can write:
    launch/tpu_vm.sh --name qwen3-moe-lora --zone us-east5-a --type v5p-8 -- \
        --config configs/qwen3_moe_lora.py --workdir /mnt/shared/qwen3_moe_lora

    # afterwards: the merged model (transformers / vLLM) or the PEFT adapter, then a chat
    python -m sft_jax.export --workdir runs/qwen3_moe_lora --out runs/qwen3_moe_lora_hf
    python -m sft_jax.export --workdir runs/qwen3_moe_lora --out runs/qwen3_moe_lora_peft --peft
    python -m sft_jax.generate --model runs/qwen3_moe_lora_hf

Model: the Hub id below is fetched once at start-up; a local Hugging Face directory works too
(`--config.model.path=/path`). The experts stay frozen (bf16); the router's load-balancing loss
is added with the model's own weight (router_aux_loss_coef 0.001 in its config.json), and the
training records show each expert's share of the tokens (expert_load, expert_load_max/min), so a
collapse onto a few experts is visible.

Data: `data/chat.jsonl`, one OpenAI-style conversation per line (ShareGPT rows work too); every
assistant turn is trained with Qwen3's own chat template; 2% is held out for eval loss.

Hyperparameters: the usual LoRA settings (lr 2e-4, 3% warmup, cosine to 10% of the peak,
2 epochs, clip 1.0, alpha = 2 r, dropout 0.05). A step is 16 packed rows of 4096 tokens,
accumulated as 4 micro-batches of 4 rows (one per chip).

Mesh: FSDP over the 4 chips shards the frozen base (61 GB of bf16 weights, 15 GB per chip).
Memory per chip, from the TPU compiler for v5p:2x2x1 (no TPU needed; dated, with the plan's
estimate, in docs/benchmarks.md, "Mixture of experts"):
    python benchmarks/tpu_compile_table.py --rows qwen3-30b-a3b-lora-v5p-8
18.84 of 95 GiB (parameters 14.31 + temporaries 4.53). `--config.mesh.expert=4
--config.mesh.fsdp=1` keeps 32 experts per chip and brings the tokens to them instead (row
qwen3-30b-a3b-lora-expert4-v5p-8: 19.56 GiB), but is slower at best on this model (its roofline
is 2.6x FSDP's): prefer FSDP here. Full fine-tuning of this model (configs/qwen3_full.py with
this model path) needs a v5p-32: 51.47 GiB per chip (row qwen3-30b-a3b-full-v5p-32).
"""

from configs import llama31_8b_lora


def get_config():
    """The Llama-3.1-8B LoRA recipe's settings (rank, lr, schedule, remat full, bf16 base,
    checkpoints) with this model, attention-only targets and 4 micro-batches."""
    c = llama31_8b_lora.get_config()
    c.model.path = "Qwen/Qwen3-30B-A3B-Instruct-2507"
    c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    c.train.micro_batches = 4  # 4 rows per micro-batch: one per chip of a v5p-8
    c.train.router_aux_loss_coef = -1.0  # the model's own (config.json)
    return c
