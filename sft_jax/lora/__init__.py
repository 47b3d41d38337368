"""LoRA family as pure transforms of the parameter tree: LoRA, rsLoRA, DoRA, LoRA+, QLoRA, OFT,
BOFT, and prefix / prompt tuning.

    tree.py   adapters (`make_adapters`: the one adapter maker; init, merge, delta, DoRA
              magnitudes, shardings of a/b/m; `config_scale`: a config's LoRA scale)
    peft.py   PEFT adapter files both ways (adapter_config.json + adapter_model.safetensors);
              peft_oft.py: OFT's tensors and config, peft_common.py: what the methods share
    oft.py    OFT (orthogonal fine-tuning): Cayley / Neumann rotations of each kernel's input
    prefix.py prefix and prompt tuning trees (the model side: sft_jax/model/prefix.py), PEFT files
    quant.py  blockwise int8 / NF4 storage of the frozen base (QLoRA)

The model side is `sft_jax.model.layers.Einsum` (the "lora" variable collection); the training side
is `sft_jax.training.state` (`state_layout` / `create_train_state`: frozen base + trainable
adapters) and `sft_jax.training.optim` (LoRA+). See docs/lora.md.
"""

from sft_jax.lora.oft import OftSpec, rotations
from sft_jax.lora.oft import projected as oft_projected
from sft_jax.lora.oft import spec_of as oft_spec
from sft_jax.lora.peft import (
    PeftAdapterConfig,
    from_peft_tensors,
    peft_config,
    read_peft_adapter,
    read_peft_config,
    to_peft_tensors,
    write_peft_adapter,
)
from sft_jax.lora.peft_oft import boft_peft_config, oft_peft_config
from sft_jax.lora.quant import (
    Quantized,
    dequantize,
    einsum_dequantized,
    quantize,
    quantize_kernels,
    quantized_specs,
)
from sft_jax.lora.tree import (
    ALL_LINEAR,
    EXPERT_KERNELS,
    KERNELS,
    SAVEABLE_MODULES,
    SAVED,
    adapted_kernel,
    adapter_specs,
    add_saved_modules,
    apply_variables,
    column_norm,
    config_scale,
    count,
    delta,
    init_adapters,
    init_magnitudes,
    init_oft,
    lora_scale,
    make_adapters,
    merge,
    merged_kernel,
    saved_module_table,
    target_paths,
    with_saved_modules,
)

__all__ = [
    "ALL_LINEAR",
    "EXPERT_KERNELS",
    "KERNELS",
    "SAVEABLE_MODULES",
    "SAVED",
    "OftSpec",
    "PeftAdapterConfig",
    "Quantized",
    "adapted_kernel",
    "adapter_specs",
    "add_saved_modules",
    "apply_variables",
    "boft_peft_config",
    "column_norm",
    "config_scale",
    "count",
    "delta",
    "dequantize",
    "einsum_dequantized",
    "from_peft_tensors",
    "init_adapters",
    "init_magnitudes",
    "init_oft",
    "lora_scale",
    "make_adapters",
    "merge",
    "merged_kernel",
    "oft_peft_config",
    "oft_projected",
    "oft_spec",
    "peft_config",
    "quantize",
    "quantize_kernels",
    "quantized_specs",
    "read_peft_adapter",
    "read_peft_config",
    "rotations",
    "saved_module_table",
    "target_paths",
    "to_peft_tensors",
    "with_saved_modules",
    "write_peft_adapter",
]
