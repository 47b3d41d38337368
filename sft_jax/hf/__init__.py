"""Hugging Face in and out: `config.json` <-> ModelConfig, safetensors <-> our parameter tree.

Modules: `config` (config.json parsing, family features, what is unsupported and why),
`config_export` (config.json for a random init), `params`
(the tensor name/layout table, import into target shardings, the export plan; `tensor_spec` one
entry of it, `mxfp4` gpt-oss's dequantization) and `safetensors`
(bf16-capable reader and streaming writer), `hub` (hub ids -> local snapshot directories),
`qwen35` (Qwen3.5's config.json and its multimodal wrapper), `gemma4` (Gemma 4's config.json).
`sft_jax.export` writes whole HF directories.
"""

from sft_jax.hf.config import (
    SUPPORTED_ARCHITECTURES,
    ModelFileError,
    UnsupportedModelError,
    build_model_config,
    load_model_config,
    read_config_json,
)
from sft_jax.hf.config_export import hf_config_dict
from sft_jax.hf.hub import (
    absolute_local_paths,
    looks_like_hub_id,
    resolve_config_hub_ids,
    resolve_model_dir,
)
from sft_jax.hf.multimodal import copied_tensors, is_multimodal
from sft_jax.hf.params import (
    HfTensor,
    MoeLayout,
    check_checkpoint,
    export_layout,
    hf_tensor_plan,
    load_params,
    to_hf_tensor,
)
from sft_jax.hf.qwen35 import text_only_config

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "HfTensor",
    "ModelFileError",
    "MoeLayout",
    "UnsupportedModelError",
    "absolute_local_paths",
    "build_model_config",
    "check_checkpoint",
    "copied_tensors",
    "export_layout",
    "hf_config_dict",
    "hf_tensor_plan",
    "is_multimodal",
    "load_model_config",
    "load_params",
    "looks_like_hub_id",
    "read_config_json",
    "resolve_config_hub_ids",
    "resolve_model_dir",
    "text_only_config",
    "to_hf_tensor",
]
