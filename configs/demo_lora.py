"""Demo with LoRA: the stories260K question-answering demo, training rank-16 adapters plus the
(tied) embedding as a PEFT `modules_to_save` module.

    python -m sft_jax.train --config configs/demo_lora.py --workdir /tmp/demo_lora
    python -m sft_jax.export --workdir /tmp/demo_lora --out /tmp/demo_lora_hf          (merged)
    python -m sft_jax.export --workdir /tmp/demo_lora --out /tmp/demo_lora_peft --peft (adapter)

Same data and steps as configs/demo.py. Why the embedding: in stories260K the EOS row of the tied
embedding / LM head points the same way (cosine > 0.999) as 238 byte-fallback rows the
pretraining never used, so no hidden state gives EOS more than a ~1/239 share; adapters on the
projections alone learn the answer word but cannot learn to stop (held-out exact match 0.000).
Training the embedding (32K values) separates EOS, as full fine-tuning does. See docs/lora.md.
LoRA wants a higher learning rate than full fine-tuning (its updates pass through the low-rank
product), hence 1e-2 for this tiny model. Checkpoints hold the adapters and the embedding copy.
"""

from configs import demo


def get_config():
    c = demo.get_config()
    c.lora.enabled = True
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.modules_to_save = ("embed_tokens",)
    c.lora.base_dtype = "float32"  # stories260K is tiny; bfloat16 saves memory on real models
    c.optim.learning_rate = 1e-2
    return c
