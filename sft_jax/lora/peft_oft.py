"""OFT and BOFT adapters in PEFT's format (sft_jax/lora/oft.py holds the math). OFT: one vector
per module and layer, as PEFT's OFT stores it,

    base_model.model.model.layers.{i}.self_attn.q_proj.oft_R.weight          [blocks, n]

with peft_type "OFT" and its settings (oft_block_size, block_share, coft, eps,
use_cayley_neumann, num_cayley_neumann_terms) in adapter_config.json (`oft_peft_config`).

BOFT: per module and layer a full matrix per block and butterfly factor, and the output scale,

    base_model.model.model.layers.{i}.self_attn.q_proj.boft_R    [factors, blocks, b, b]
    base_model.model.model.layers.{i}.self_attn.q_proj.boft_s    [out, 1]

PEFT uses only the skew part 0.5 (A - A^T) of each matrix: export writes that skew matrix of the
stored vector (so A = S), import keeps the upper triangle of 0.5 (A - A^T), which is the same
rotation. PEFT without its CUDA extension (on CPU always) builds one factor whatever
boft_n_butterfly_factor says, so an adapter of more factors loads in PEFT only where that
extension builds; sft_jax reads and writes any number.

sft_jax/lora/peft.py dispatches here by the tree's leaves and the config's peft_type.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sft_jax.lora import oft
from sft_jax.lora.peft_common import (
    PEFT_MODULE_NAME,
    PREFIX,
    PeftAdapterConfig,
    adapter_paths,
)
from sft_jax.lora.tree import SAVED, get_path, hf_layer, hf_module

OFT_SUFFIX = "oft_R.weight"
# The PEFT version whose OFT parametrisation (the Neumann series as changed in 0.18) is written;
# PEFT warns on a Neumann adapter that names none.
OFT_PEFT_VERSION = "0.21.0"
BOFT_KEYS = {"boft_R": "boft_R", "boft_s": oft.SCALE}  # PEFT's BOFT tensors -> parsed kinds


def oft_to_peft(
    path: tuple[str, ...], ad: dict[str, np.ndarray], period: int
) -> dict[str, np.ndarray]:
    """PEFT tensors of one OFT module (its stacked vectors [L, blocks, n], one per layer), or
    of one BOFT module (with `boft_s`: the skew matrices and the scale, see the docstring)."""
    tensors = {}
    for layer in range(ad[oft.PARAM].shape[0]):
        module = f"{PREFIX}.{hf_layer(path, layer, period)}.{hf_module(path)}"
        if oft.SCALE not in ad:
            tensors[f"{module}.{OFT_SUFFIX}"] = ad[oft.PARAM][layer].copy()
            continue
        tensors[f"{module}.boft_R"] = _skew(ad[oft.PARAM][layer])  # [F, blocks, b, b]
        tensors[f"{module}.boft_s"] = ad[oft.SCALE][layer].reshape(-1, 1).copy()
    return tensors


def _skew(vec: np.ndarray) -> np.ndarray:
    """`oft.skew` in numpy, float32: an export runs no XLA program (jax would compile one for
    each module's shape, op by op)."""
    b = oft.block_size(vec.shape[-1])
    rows, cols = np.triu_indices(b, 1)
    upper = np.zeros((*vec.shape[:-1], b, b), np.float32)
    upper[..., rows, cols] = vec
    return upper - np.swapaxes(upper, -1, -2)


def boft_from_peft(
    path: tuple[str, ...], parts: dict[str, dict[int, np.ndarray]], kernel: Any, n_in: int
) -> dict[str, np.ndarray]:
    """One BOFT module's per-layer boft_R [factors, blocks, b, b] and boft_s [out, 1] as our
    stacked `oft_r` [L, factors, blocks, n] and `boft_s` [L, *out], checked against its
    kernel."""
    layers = kernel.shape[0]
    if set(parts) != set(BOFT_KEYS.values()):
        raise ValueError(f"PEFT BOFT adapter of {'/'.join(path)} lacks boft_R or boft_s")
    matrices = np.stack([parts["boft_R"][i] for i in range(layers)]).astype(np.float32)
    if matrices.ndim != 5 or matrices.shape[-1] != matrices.shape[-2]:
        raise ValueError(f"PEFT boft_R of {'/'.join(path)} is not [factors, blocks, b, b]")
    skew = 0.5 * (matrices - np.swapaxes(matrices, -1, -2))
    b = skew.shape[-1]
    rows, cols = np.triu_indices(b, 1)
    vec = skew[..., rows, cols]
    fan_in = int(np.prod(kernel.shape[1 : 1 + n_in]))
    out_shape = kernel.shape[1 + n_in :]
    if vec.shape[2] * b != fan_in:
        raise ValueError(
            f"PEFT BOFT tensors of {'/'.join(path)} ({vec.shape[2]} blocks of {b}) do not fit "
            f"its {fan_in} input features"
        )
    oft.boft_block(fan_in, b, 0, vec.shape[1])  # its factors fit the blocks
    scales = [parts[oft.SCALE][i] for i in range(layers)]
    if any(x.size != int(np.prod(out_shape)) for x in scales):
        raise ValueError(f"PEFT boft_s of {'/'.join(path)} does not fit its output features")
    scale = np.stack([x.reshape(out_shape) for x in scales]).astype(np.float32)
    return {oft.PARAM: vec, oft.SCALE: scale}


def oft_stack(
    path: tuple[str, ...], per_layer: dict[int, np.ndarray], kernel: Any, n_in: int
) -> np.ndarray:
    """One OFT module's per-layer vectors [blocks, n] stacked, checked against its kernel's
    input width (blocks x b = in, or one shared block with b dividing in)."""
    vec = np.stack([per_layer[i] for i in range(len(per_layer))])
    fan_in = int(np.prod(kernel.shape[1 : 1 + n_in]))
    b = oft.block_size(vec.shape[-1])
    if fan_in % b or vec.shape[1] not in (1, fan_in // b):
        raise ValueError(
            f"PEFT OFT tensors of {'/'.join(path)} ({vec.shape[1]} blocks of {b}) do not fit "
            f"its {fan_in} input features"
        )
    return vec


def oft_peft_config(
    adapters: dict, cfg: Any, *, base: str, tied_embeddings: bool | None = None
) -> dict[str, Any]:
    """The adapter_config.json of an OFT adapter tree; `cfg`: its run's LoRA section (or that
    section as a dict) for the OFT settings. PEFT's OFTConfig cannot re-tie an LM head, so a
    trained tied embedding is refused."""
    get = cfg.get if isinstance(cfg, dict) else lambda k: getattr(cfg, k)
    saved = sorted(adapters.get(SAVED, {}))
    if "embed_tokens" in saved and tied_embeddings is not False:
        raise ValueError(
            "an OFT adapter with a trained tied embedding cannot be written for PEFT (its "
            "OFTConfig has no ensure_weight_tying); untie it or leave embed_tokens frozen"
        )
    return {
        "peft_type": "OFT",
        "task_type": "CAUSAL_LM",
        "peft_version": OFT_PEFT_VERSION,
        "r": 0,
        "oft_block_size": int(get("oft_block_size")),
        "target_modules": sorted({p[-1] for p in adapter_paths(adapters)}),
        "module_dropout": 0.0,
        "fan_in_fan_out": False,
        "bias": "none",
        "init_weights": True,
        "coft": bool(get("oft_coft")),
        "eps": float(get("oft_eps")),
        "block_share": bool(get("oft_block_share")),
        "use_cayley_neumann": bool(get("oft_cayley_neumann")),
        "num_cayley_neumann_terms": int(get("oft_neumann_terms")),
        "base_model_name_or_path": base,
        "inference_mode": True,
        "modules_to_save": [PEFT_MODULE_NAME.get(m, m) for m in saved] or None,
    }


def oft_adapter_config(path: str, cfg: dict) -> PeftAdapterConfig:
    """An OFT adapter_config.json: its rotation settings (sizes come from the tensors).
    Settings PEFT's Linear OFT honours that sft_jax does not reproduce are refused."""
    if cfg.get("bias", "none") != "none" or cfg.get("fan_in_fan_out", False):
        raise ValueError(f"{path}: OFT with bias training or fan_in_fan_out is not supported")
    neumann = bool(cfg.get("use_cayley_neumann", True))
    spec = oft.OftSpec(
        neumann_terms=int(cfg.get("num_cayley_neumann_terms", 5)) if neumann else 0,
        coft_eps=float(cfg.get("eps", 6e-5)) if cfg.get("coft", False) else None,
    )
    base = cfg.get("base_model_name_or_path") or ""
    return PeftAdapterConfig(1, 1.0, False, False, base, oft=spec, method="oft")


def boft_peft_config(
    adapters: dict, cfg: Any, *, base: str, tied_embeddings: bool | None = None
) -> dict[str, Any]:
    """The adapter_config.json of a BOFT adapter tree; `cfg`: its run's LoRA section (or that
    section as a dict) for the block size or count (the butterfly factors are the tree's); a
    trained tied embedding is refused (BOFTConfig cannot re-tie an LM head either)."""
    get = cfg.get if isinstance(cfg, dict) else lambda k: getattr(cfg, k)
    saved = sorted(adapters.get(SAVED, {}))
    if "embed_tokens" in saved and tied_embeddings is not False:
        raise ValueError(
            "a BOFT adapter with a trained tied embedding cannot be written for PEFT (its "
            "BOFTConfig has no ensure_weight_tying); untie it or leave embed_tokens frozen"
        )
    return {
        "peft_type": "BOFT",
        "task_type": "CAUSAL_LM",
        "boft_block_size": int(get("boft_block_size")),
        "boft_block_num": int(get("boft_block_num")),
        "boft_n_butterfly_factor": _factors(adapters),
        "target_modules": sorted({p[-1] for p in adapter_paths(adapters)}),
        "boft_dropout": 0.0,
        "fan_in_fan_out": False,
        "bias": "none",
        "init_weights": True,
        "base_model_name_or_path": base,
        "inference_mode": True,
        "modules_to_save": [PEFT_MODULE_NAME.get(m, m) for m in saved] or None,
    }


def _factors(adapters: dict) -> int:
    """The butterfly factors of a BOFT tree's vectors [L, factors, blocks, n] (one count)."""
    counts = {int(get_path(adapters, p)[oft.PARAM].shape[-3]) for p in adapter_paths(adapters)}
    if len(counts) != 1:
        raise ValueError(f"a BOFT tree's modules have {sorted(counts)} butterfly factors")
    return counts.pop()


def boft_adapter_config(path: str, cfg: dict) -> PeftAdapterConfig:
    """A BOFT adapter_config.json (sizes and the factor count come from the tensors).
    Settings PEFT's Linear BOFT honours that sft_jax does not reproduce are refused;
    boft_dropout acts in training only, so it is read and ignored."""
    if cfg.get("bias", "none") != "none" or cfg.get("fan_in_fan_out", False):
        raise ValueError(f"{path}: BOFT with bias training or fan_in_fan_out is not supported")
    base = cfg.get("base_model_name_or_path") or ""
    return PeftAdapterConfig(1, 1.0, False, False, base, oft=oft.BOFT_SPEC, method="boft")
