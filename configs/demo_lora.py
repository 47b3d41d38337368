"""Demo with LoRA: the stories260K question-answering demo, training only rank-16 adapters.

    python -m sft_jax.train --config configs/demo_lora.py --workdir /tmp/demo_lora
    python -m sft_jax.export --workdir /tmp/demo_lora --out /tmp/demo_lora_hf          (merged)
    python -m sft_jax.export --workdir /tmp/demo_lora --out /tmp/demo_lora_peft --peft (adapter)

Same data and steps as configs/demo.py. LoRA wants a higher learning rate than full fine-tuning
(its updates pass through the low-rank product), hence 1e-2 for this tiny model. Prints held-out
exact match before and after, like the full demo; the checkpoints hold only the adapters.
"""

from configs import demo


def get_config():
    c = demo.get_config()
    c.lora.enabled = True
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.base_dtype = "float32"  # stories260K is tiny; bfloat16 saves memory on real models
    c.optim.learning_rate = 1e-2
    return c
