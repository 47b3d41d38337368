"""PEFT adapters on fused projections (Phi-3/4's `qkv_proj` and `gate_up_proj`) <-> our
adapters on the split kernels (q_proj, k_proj, v_proj; gate_proj, up_proj).

Import is exact: a fused adapter's delta B @ A (B [rows of q, k, v, R], A [R, D]) is, row block by
row block, B_q @ A, B_k @ A, B_v @ A, so each split kernel gets the shared A and its rows of B
(and of a DoRA magnitude, which is per output row). Training then moves the copies of A apart,
which a fused adapter of rank R cannot express; so export writes a fused adapter of rank n * R
(n = 3 for qkv, 2 for gate/up): A stacks the n adapters' A, B is block-diagonal, and
`rank_pattern` / `alpha_pattern` give PEFT that rank with the scale unchanged (alpha * n, or
alpha * sqrt(n) with rsLoRA). Importing such an adapter again finds the block-diagonal B and
recovers the n rank-R adapters exactly. Export needs all parts of a fused module adapted (a
fused module is adapted whole).
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from sft_jax.lora.tree import get_path, is_expert_path

# PEFT's fused module -> (its HF parent group, our kernels in its row order).
FUSED = {
    "qkv_proj": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "gate_up_proj": ("mlp", ("gate_proj", "up_proj")),
}
_SPLIT_KEY = re.compile(
    r"^(?P<layer>.*\.layers\.\d+)\.(?P<group>self_attn|mlp)\.(?P<name>q_proj|k_proj|v_proj|"
    r"gate_proj|up_proj)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$"
)


def _fused_name(name: str) -> str:
    return next(f for f, (_, parts) in FUSED.items() if name in parts)


def fuse_peft_tensors(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PEFT tensors of split adapters -> the fused modules' (module docstring): A stacked,
    B block-diagonal, magnitudes concatenated; ValueError when only some parts are adapted."""
    out: dict[str, np.ndarray] = {}
    groups: dict[tuple[str, str], dict[str, dict[str, np.ndarray]]] = {}
    for key, value in tensors.items():
        match = _SPLIT_KEY.match(key)
        if match is None:
            out[key] = value
            continue
        fused = _fused_name(match["name"])
        parts = groups.setdefault((match["layer"], fused), {})
        parts.setdefault(match["kind"], {})[match["name"]] = value
    for (layer, fused), kinds in groups.items():
        group, names = FUSED[fused]
        missing = [n for n in names if n not in kinds["lora_A.weight"]]
        if missing:
            raise ValueError(
                f"PEFT adapts {fused} whole, but {', '.join(missing)} of {layer} "
                f"{'is' if len(missing) == 1 else 'are'} not adapted here: target "
                f"{', '.join(names)} together"
            )
        prefix = f"{layer}.{group}.{fused}"
        a = [kinds["lora_A.weight"][n] for n in names]
        b = [kinds["lora_B.weight"][n] for n in names]
        out[f"{prefix}.lora_A.weight"] = np.concatenate(a)
        block = np.zeros((sum(x.shape[0] for x in b), sum(x.shape[1] for x in b)), b[0].dtype)
        row = col = 0
        for x in b:
            block[row : row + x.shape[0], col : col + x.shape[1]] = x
            row, col = row + x.shape[0], col + x.shape[1]
        out[f"{prefix}.lora_B.weight"] = block
        if "lora_magnitude_vector" in kinds:
            m = [kinds["lora_magnitude_vector"][n] for n in names]
            out[f"{prefix}.lora_magnitude_vector"] = np.concatenate(m)
    return out


def fused_config(config: dict[str, Any], rank: int, alpha: float, rslora: bool) -> dict:
    """adapter_config.json for `fuse_peft_tensors`' adapters: the fused modules as targets,
    with the rank n * r and the alpha that keeps PEFT's scale alpha / r (alpha / sqrt(r))."""
    targets = set(config["target_modules"])
    patterns: dict[str, dict[str, float]] = {"rank_pattern": {}, "alpha_pattern": {}}
    for fused, (_, names) in FUSED.items():
        if targets & set(names):
            targets = (targets - set(names)) | {fused}
            n = len(names)
            patterns["rank_pattern"][fused] = n * rank
            patterns["alpha_pattern"][fused] = alpha * (math.sqrt(n) if rslora else n)
    return {**config, "target_modules": sorted(targets), **patterns}


def check_patterns(cfg: dict[str, Any], file: str) -> None:
    """rank_pattern / alpha_pattern are read only where they name fused modules at the
    adapter's own scale (as `fused_config` writes them); anything else would change a module's
    scale, which one scale for all modules here cannot follow."""
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    rank, alpha, rslora = cfg.get("r", 8), cfg.get("lora_alpha", 8), cfg.get("use_rslora", False)
    for name in set(ranks) | set(alphas):
        r, a = ranks.get(name, rank), alphas.get(name, alpha)
        scale = (lambda a, r: a / math.sqrt(r)) if rslora else (lambda a, r: a / r)
        if name not in FUSED or not math.isclose(scale(a, r), scale(alpha, rank)):
            field = "rank_pattern" if name in ranks else "alpha_pattern"
            raise ValueError(
                f"{file}: '{field}' (per-module ranks or alphas) is not supported (only for a "
                f"fused module at the adapter's own scale; {name!r} is not)"
            )


def split_fused(
    per_path: dict[tuple[str, ...], dict[str, dict[int, np.ndarray]]],
    params: dict,
    rank: int | None,
) -> dict[tuple[str, ...], dict[str, dict[int, np.ndarray]]]:
    """Per-layer PEFT parts of fused adapters (paths ending in qkv_proj / gate_up_proj) as the
    parts of our split kernels' adapters (module docstring); other paths unchanged."""
    out = {}
    for path, parts in per_path.items():
        if path[-1] not in FUSED or is_expert_path(path):  # a MoE layer's experts: unfused
            out[path] = parts
            continue
        names = FUSED[path[-1]][1]
        try:
            rows = [
                int(np.prod(get_path(params, (*path[:-1], n, "kernel")).shape[2:])) for n in names
            ]
        except (KeyError, TypeError):
            raise ValueError(f"PEFT adapter adapts {path[-1]}, which this model lacks") from None
        ends = np.cumsum([0, *rows])
        width = next(iter(parts["a"].values())).shape[0]
        n = len(names)
        blocks = width == n * (rank or 0) and all(
            _block_diagonal(b, ends, rank) for b in parts["b"].values()
        )
        if not blocks and rank is not None and width != rank:
            raise ValueError(
                f"PEFT adapter's {path[-1]} has rank {width}, neither r={rank} nor a "
                f"block-diagonal {n} x {rank}"
            )
        for j, name in enumerate(names):
            cols = slice(j * rank, (j + 1) * rank) if blocks else slice(None)
            split = {
                "a": {i: a[cols] for i, a in parts["a"].items()},
                "b": {i: b[ends[j] : ends[j + 1], cols] for i, b in parts["b"].items()},
            }
            if "m" in parts:
                split["m"] = {i: m[ends[j] : ends[j + 1]] for i, m in parts["m"].items()}
            out[(*path[:-1], name)] = split
    return out


def _block_diagonal(b: np.ndarray, ends: np.ndarray, rank: int | None) -> bool:
    """Whether B [rows, n * rank] is zero outside its n diagonal blocks."""
    if not rank:
        return False
    mask = np.zeros(b.shape, bool)
    for j in range(len(ends) - 1):
        mask[ends[j] : ends[j + 1], j * rank : (j + 1) * rank] = True
    return not np.any(b[~mask])
