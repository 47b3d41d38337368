"""LoRA family as pure transforms of the parameter tree: LoRA, rsLoRA, DoRA, LoRA+, QLoRA.

    tree.py   adapters (init, merge, delta, DoRA magnitudes, shardings of a/b/m)
    peft.py   PEFT adapter files both ways (adapter_config.json + adapter_model.safetensors)
    quant.py  blockwise int8 / NF4 storage of the frozen base (QLoRA)

The model side is `sft_jax.model.Einsum` (the "lora" variable collection); the training side is
`sft_jax.state.create_train_state` (frozen base + trainable adapters) and `sft_jax.optim`
(LoRA+). See docs/lora.md.
"""

from sft_jax.lora.peft import (
    from_peft_tensors,
    peft_config,
    read_peft_adapter,
    to_peft_tensors,
    write_peft_adapter,
)
from sft_jax.lora.quant import Quantized, dequantize, quantize, quantize_kernels
from sft_jax.lora.tree import (
    ALL_LINEAR,
    KERNELS,
    adapter_specs,
    column_norm,
    count,
    delta,
    init_adapters,
    init_magnitudes,
    lora_scale,
    merge,
    merged_kernel,
    target_paths,
)

__all__ = [
    "ALL_LINEAR",
    "KERNELS",
    "Quantized",
    "adapter_specs",
    "column_norm",
    "count",
    "delta",
    "dequantize",
    "from_peft_tensors",
    "init_adapters",
    "init_magnitudes",
    "lora_scale",
    "merge",
    "merged_kernel",
    "peft_config",
    "quantize",
    "quantize_kernels",
    "read_peft_adapter",
    "target_paths",
    "to_peft_tensors",
    "write_peft_adapter",
]
