"""PEFT format both ways: `adapter_config.json` + `adapter_model.safetensors` with PEFT key names.

Per layer i and adapted module, PEFT stores (HF Linear layout, in = product of our input dims):

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight          [R, in]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight          [out, R]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_magnitude_vector  [out]   (DoRA)

The shared expert of Qwen2-MoE is `mlp.shared_expert.{gate,up,down}_proj`. A MoE layer's experts
are adapted as PEFT adapts transformers' fused expert parameters (`target_parameters`
"mlp.experts.gate_up_proj" [E, 2F, D] and "mlp.experts.down_proj" [E, D, F], its ParamWrapper):
one adapter per parameter, rank R per expert, stored as one Linear pair each,

    ...layers.{i}.mlp.experts[.base_layer].lora_A.weight   [E * R, in]   row e * R + r
    ...layers.{i}.mlp.experts[.base_layer].lora_B.weight   [out, R * E]  column r * E + e

(in = D, out = 2F for gate_up_proj; in = F, out = D for down_proj). PEFT nests one wrapper per
targeted parameter in the order the module defines them (gate_up_proj, then down_proj), and the
inner one's keys gain ".base_layer": with both targeted, gate_up_proj's adapter is
`experts.base_layer.lora_A`, down_proj's `experts.lora_A`; alone, either is `experts.lora_A`.
PEFT refuses dropout (and DoRA) on parameters, so an adapter with expert parameters is written
with lora_dropout 0 (dropout only acts in training; the adapter computes the same function).

OFT adapters (sft_jax/lora/oft.py) are converted in sft_jax/lora/peft_oft.py; what every method
shares (key prefixes, file names, saved modules, `PeftAdapterConfig`) is in
sft_jax/lora/peft_common.py.

Rank, alpha, rsLoRA and DoRA travel in adapter_config.json and are read from it on import
(`read_peft_config`, which also derives the scale); a run that continues from an adapter checks
them against its config, since a mismatch would silently change the adapter's scale.

Saved modules (`modules_to_save`) are stored as PEFT stores them, whole, under their HF keys
(`base_model.model.model.embed_tokens.weight`, `base_model.model.model.layers.{i}.
input_layernorm.weight`, `base_model.model.lm_head.weight`, ...). A trained tied embedding is
written once, as embed_tokens, with `ensure_weight_tying` so that PEFT ties the LM head to it;
on import a tied lm_head.weight (which PEFT itself also writes) is read as the embedding.

On a multimodal base (Gemma 3's `Gemma3ForConditionalGeneration`) the language model's modules
are `model.language_model.*`: export (`language_model=True`) writes the keys there and targets
them with a regular expression, so PEFT leaves the vision tower's q/k/v projections alone;
import reads those keys and refuses an adapter on any other module of the base. Its experts
are adapted only in Gemma 4 (parameters `experts.*`, a name no tower has).

A base with fused projections (Phi-3's qkv_proj and gate_up_proj) has its adapters fused on
export and split on import (sft_jax.lora.fused).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from sft_jax.lora import oft, prefix
from sft_jax.lora.fused import (
    FUSED,
    check_patterns,
    fuse_peft_tensors,
    fused_config,
    split_fused,
)
from sft_jax.lora.peft_common import (
    CONFIG_FILE,
    LANGUAGE_MODEL,
    MODEL_PREFIX,
    PEFT_MODULE_NAME,
    PREFIX,
    TEXT_MODEL,
    TEXT_PARTS,
    WEIGHTS_FILE,
    PeftAdapterConfig,
    adapter_paths,
    from_language_model,
    saved_from_peft,
    saved_to_peft,
)
from sft_jax.lora.peft_oft import (
    BOFT_KEYS,
    boft_adapter_config,
    boft_from_peft,
    oft_adapter_config,
    oft_stack,
    oft_to_peft,
)
from sft_jax.lora.tree import (
    EXPERT_KERNELS,
    EXPERTS,
    KERNELS,
    SAVEABLE,
    SAVED,
    SUBLAYER,
    adapted_kernel,
    get_path,
    hf_layer,
    hf_module,
    is_expert_path,
    set_path,
)


def to_peft_tensors(
    adapters: dict,
    tied_embeddings: bool = False,
    language_model: bool = False,
    fused: bool = False,
    period: int = 1,
) -> dict[str, np.ndarray]:
    """PEFT state dict of an adapter tree (see the module docstring), float32 numpy. With
    `tied_embeddings`, a saved embedding is also written as lm_head.weight, as PEFT does (its
    loader then expects that key); with `language_model`, keys of a multimodal base's language
    model; with `fused`, adapters of a base with fused projections (Phi-3: sft_jax.lora.fused).
    `period`: the layers a hybrid model scans as one block (its layers/layer_{j} leaves hold HF
    layers s * period + j)."""
    tensors = _text_model_tensors(adapters, tied_embeddings, period)
    if fused:
        tensors = fuse_peft_tensors(tensors)
    if not language_model:
        return tensors
    return {
        LANGUAGE_MODEL + k.removeprefix(TEXT_MODEL) if k.startswith(TEXT_MODEL) else k: v
        for k, v in tensors.items()
    }


def _text_model_tensors(
    adapters: dict, tied_embeddings: bool, period: int = 1
) -> dict[str, np.ndarray]:
    tensors = {}
    for path in adapter_paths(adapters):
        ad = {k: np.asarray(v, np.float32) for k, v in get_path(adapters, path).items()}
        if is_expert_path(path):
            wrapped = tuple(get_path(adapters, path[:-1]))
            tensors.update(_experts_to_peft(path, ad, wrapped, period))
            continue
        if oft.PARAM in ad:
            tensors.update(oft_to_peft(path, ad, period))
            continue
        layers, rank = ad["a"].shape[0], ad["a"].shape[-1]
        for layer in range(layers):
            prefix = f"{PREFIX}.{hf_layer(path, layer, period)}.{hf_module(path)}"
            tensors[f"{prefix}.lora_A.weight"] = ad["a"][layer].reshape(-1, rank).T.copy()
            tensors[f"{prefix}.lora_B.weight"] = ad["b"][layer].reshape(rank, -1).T.copy()
            if "m" in ad:
                tensors[f"{prefix}.lora_magnitude_vector"] = ad["m"][layer].reshape(-1).copy()
    for name, value in adapters.get(SAVED, {}).items():
        tensors.update(saved_to_peft(name, np.asarray(value, np.float32)))
    if tied_embeddings and "embed_tokens" in adapters.get(SAVED, {}):
        embed = tensors[MODEL_PREFIX + SAVEABLE["embed_tokens"][1]]
        tensors[MODEL_PREFIX + SAVEABLE["lm_head"][1]] = embed
    return tensors


def _expert_prefix(path: tuple[str, ...], layer: int, wrapped: tuple[str, ...]) -> str:
    """PEFT's module key of the experts' adapter `path[-1]` in `layer` when the adapters
    `wrapped` are on the same experts: one ".base_layer" per wrapper outside it."""
    order = [n for n in EXPERT_KERNELS if n in wrapped]  # HF's parameter order = nesting order
    depth = len(order) - 1 - order.index(path[-1])
    module = hf_module(path).rsplit(".", 1)[0]  # mlp.experts
    return f"{PREFIX}.{layer}.{module}" + ".base_layer" * depth


def _experts_to_peft(
    path: tuple[str, ...], ad: dict[str, np.ndarray], wrapped: tuple[str, ...], period: int
) -> dict[str, np.ndarray]:
    """PEFT tensors of one expert adapter: a [L, E, in, R] -> lora_A [E * R, in] (expert-major
    rows), b [L, E, R, out] -> lora_B [out, R * E] (rank-major columns), per layer."""
    tensors = {}
    layers, experts, fan_in, rank = ad["a"].shape
    for layer in range(layers):
        prefix = _expert_prefix(path, hf_layer(path, layer, period), wrapped)
        a = ad["a"][layer].transpose(0, 2, 1).reshape(experts * rank, fan_in)
        b = ad["b"][layer].transpose(2, 1, 0).reshape(-1, rank * experts)
        tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a)
        tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b)
    return tensors


def expert_parameters(target_parameters: tuple[str, ...]) -> tuple[str, ...]:
    """The expert parameters (gate_up_proj, down_proj, in HF's order) that PEFT's
    `target_parameters` adapt (PEFT matches them as suffixes of "model.layers.{i}.mlp.experts.
    {name}"); anything else is refused, since sft_jax adapts no other parameter."""
    found = set()
    for target in target_parameters:
        name = target.rsplit(".", 1)[-1]
        if name not in EXPERT_KERNELS or not (target == name or target.endswith(f"experts.{name}")):
            raise ValueError(f"target_parameters {target!r}: sft_jax adapts only the experts'")
        found.add(name)
    return tuple(n for n in EXPERT_KERNELS if n in found)


def _parse_name(name: str, experts: tuple[str, ...]) -> tuple[int, tuple[str, ...], str]:
    """PEFT key -> (layer, our adapter path, a | b | m); `experts`: the expert parameters the
    adapter targets (`expert_parameters`), which tell its nested wrappers apart."""
    parts = name.split(".")
    kinds = {"lora_A": "a", "lora_B": "b", "oft_R": oft.PARAM}
    kind = kinds.get(parts[-2]) if parts[-1] == "weight" else None
    if parts[-1] == "lora_magnitude_vector":
        kind, parts = "m", [*parts, "weight"]  # align module slicing below
    if parts[-1] in BOFT_KEYS:
        kind, parts = BOFT_KEYS[parts[-1]], [*parts, "weight"]
    if "layers" not in parts or kind is None or parts[: parts.index("layers")] != TEXT_PARTS:
        raise ValueError(f"unexpected PEFT tensor {name!r}")
    layer = int(parts[parts.index("layers") + 1])
    module = parts[parts.index("layers") + 2 : -2]
    depth = 0
    while module and module[-1] == "base_layer":
        module, depth = module[:-1], depth + 1
    group, *rest = module or [""]
    # Gemma 4's experts sit directly in the layer (ours: moe/experts, beside its dense mlp).
    path = (
        "layers",
        *{"self_attn": ["attn"], EXPERTS: ["moe", EXPERTS]}.get(group, [group]),
        *rest,
    )
    if path[-1] == EXPERTS and depth < len(experts):
        return layer, (*path, experts[len(experts) - 1 - depth]), kind
    if depth or (path[-1] not in KERNELS and path[-1] not in FUSED):
        raise ValueError(f"PEFT tensor {name!r} targets a module sft_jax does not adapt")
    return layer, path, kind


def _stack_layer(path: tuple[str, ...], parts: dict, params: dict) -> dict[str, np.ndarray]:
    """One adapter's per-layer PEFT tensors as our stacked a, b (and m), shaped after the
    kernel it adapts in `params`."""
    try:
        kernel, _, n_in = adapted_kernel(get_path(params, path[:-1]), path[-1])
    except (KeyError, TypeError):
        raise ValueError(f"PEFT adapter adapts {'/'.join(path)}, which this model lacks") from None
    layers = kernel.shape[0]
    if any(sorted(v) != list(range(layers)) for v in parts.values()):
        raise ValueError(f"PEFT adapter for {'/'.join(path)} does not cover all {layers} layers")
    if any(kind in parts for kind in BOFT_KEYS.values()):
        return boft_from_peft(path, parts, kernel, n_in)
    if oft.PARAM in parts:
        return {oft.PARAM: oft_stack(path, parts[oft.PARAM], kernel, n_in)}
    if is_expert_path(path):
        experts = kernel.shape[1]
        a = [parts["a"][i].reshape(experts, -1, kernel.shape[2]) for i in range(layers)]
        b = [parts["b"][i].reshape(parts["b"][i].shape[0], -1, experts) for i in range(layers)]
        return {
            "a": np.stack([x.transpose(0, 2, 1) for x in a]),
            "b": np.stack([x.transpose(2, 1, 0) for x in b]),
        }
    in_shape, out_shape = kernel.shape[1 : 1 + n_in], kernel.shape[1 + n_in :]
    ad = {
        "a": np.stack([parts["a"][i].T.reshape(*in_shape, -1) for i in range(layers)]),
        "b": np.stack([parts["b"][i].T.reshape(-1, *out_shape) for i in range(layers)]),
    }
    if "m" in parts:
        ad["m"] = np.stack([parts["m"][i].reshape(out_shape) for i in range(layers)])
    return ad


def from_peft_tensors(
    tensors: dict[str, np.ndarray],
    params: dict,
    dtype: Any = jnp.float32,
    target_parameters: tuple[str, ...] = (),
    rank: int | None = None,
) -> dict:
    """Inverse of `to_peft_tensors`, shaped after the kernels of `params`; `target_parameters`
    as in the adapter's config (which expert parameters its `experts` keys adapt); `rank` its r
    (fused adapters of rank 3r / 2r that are block-diagonal split back into rank-r ones)."""
    tensors = from_language_model(tensors)
    saved = saved_from_peft(tensors, params)
    experts = expert_parameters(tuple(target_parameters))
    period = sum(k.startswith(SUBLAYER) for k in params.get("layers", {}))  # hybrid: its period
    per_path: dict[tuple[str, ...], dict[str, dict[int, np.ndarray]]] = {}
    for name, value in tensors.items():
        layer, path, kind = _parse_name(name, experts)
        if period:  # HF layer i is entry i // period of layers/layer_{i % period}
            path, layer = (path[0], f"{SUBLAYER}{layer % period}", *path[1:]), layer // period
        rotation = kind == oft.PARAM or kind in BOFT_KEYS.values()
        parts = per_path.setdefault(path, {} if rotation else {"a": {}, "b": {}})
        parts.setdefault(kind, {})[layer] = np.asarray(value)
    per_path = split_fused(per_path, params, rank)
    adapters: dict = {}
    for path, parts in per_path.items():
        ad = _stack_layer(path, parts, params)
        set_path(adapters, path, {k: jnp.asarray(v, dtype) for k, v in ad.items()})
    if saved:
        adapters[SAVED] = {k: jnp.asarray(v, dtype) for k, v in sorted(saved.items())}
    return adapters


def peft_config(
    adapters: dict,
    *,
    rank: int,
    alpha: float,
    rslora: bool,
    dropout: float,
    base: str,
    tied_embeddings: bool | None = None,
    language_model: bool = False,
    fused: bool = False,
) -> dict[str, Any]:
    """The adapter_config.json that `peft.PeftModel.from_pretrained` reads. `tied_embeddings`
    (the base's tie_word_embeddings) is needed only when the embedding is a saved module: PEFT
    must then re-tie its LM head to the trained copy (ensure_weight_tying). `language_model`:
    the base is multimodal; target_modules is then a regular expression over its language
    model's modules only (PEFT full-matches a string against each module name). `fused`: the
    base fuses q/k/v and gate/up (Phi-3), so are the adapters (sft_jax.lora.fused)."""
    paths = adapter_paths(adapters)
    saved = sorted(adapters.get(SAVED, {}))
    if "embed_tokens" in saved and tied_embeddings is None:
        raise ValueError("peft_config needs tied_embeddings when embed_tokens is a saved module")
    parameters = sorted({hf_module(p) for p in paths if is_expert_path(p)})
    modules: Any = sorted({p[-1] for p in paths if not is_expert_path(p)})
    names = dict(PEFT_MODULE_NAME)
    if language_model:
        if any(not p.startswith(f"{EXPERTS}.") for p in parameters):  # tested: Gemma 4's only
            raise ValueError("a multimodal base's experts are not adapted by sft_jax")
        modules = rf"model\.language_model\.layers\.\d+\..*\.({'|'.join(modules)})"
        names["norm"] = "language_model.norm"
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": modules,
        "target_parameters": parameters or None,
        "use_rslora": rslora,
        "use_dora": any("m" in get_path(adapters, p) for p in paths),
        # PEFT refuses dropout on parameters; it acts only in training (see the docstring).
        "lora_dropout": 0.0 if parameters else dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "base_model_name_or_path": base,
        "inference_mode": True,
        # PEFT matches these as name suffixes: "norm" would also catch every layer norm.
        "modules_to_save": [names.get(m, m) for m in saved] or None,
        # A trained tied embedding must stay tied to the LM head when PEFT loads it.
        "ensure_weight_tying": bool(tied_embeddings) and "embed_tokens" in saved,
    }
    return fused_config(config, rank, alpha, rslora) if fused else config


def write_peft_adapter(
    out_dir: str,
    adapters: dict,
    config: dict[str, Any],
    language_model: bool = False,
    fused: bool = False,
    period: int = 1,
) -> None:
    """Writes adapter_config.json and adapter_model.safetensors (metadata format "pt"); a tied
    trained embedding (config ensure_weight_tying) also as lm_head.weight; `language_model`:
    keys of a multimodal base's language model, `fused`: fused projections (as `peft_config`
    was told), `period`: as in `to_peft_tensors` (a hybrid model's `ModelConfig.period`
    length)."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    if prefix.method_of(adapters):  # prefix / prompt tuning: PEFT's one prompt_embeddings
        tensors = prefix.to_peft_tensors(adapters)
    else:
        tied = config.get("ensure_weight_tying", False)
        tensors = to_peft_tensors(adapters, tied, language_model, fused, period)
    save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), {"format": "pt"})
    with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def read_peft_config(adapter_dir: str) -> PeftAdapterConfig:
    """adapter_config.json of a LoRA adapter; missing r / lora_alpha take PEFT's defaults (8).
    Per-module ranks or alphas (rank_pattern / alpha_pattern) are refused, since one scale is
    applied to every module here, except the scale-preserving ones of fused modules."""
    path = os.path.join(adapter_dir, CONFIG_FILE)
    with open(path, encoding="utf-8") as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if cfg.get("peft_type", "LORA") == "OFT":
        return oft_adapter_config(path, cfg)
    if cfg.get("peft_type") == "BOFT":
        return boft_adapter_config(path, cfg)
    method = prefix.method_of_config(cfg)
    if method is not None:
        if cfg.get("num_transformer_submodules", 1) != 1:
            raise ValueError(f"{path}: a decoder-only prefix has one transformer submodule")
        base = cfg.get("base_model_name_or_path") or ""
        return PeftAdapterConfig(1, 1.0, False, False, base, method=method)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(
            f"{path}: peft_type is {cfg['peft_type']!r}; only 'LORA', 'OFT', 'BOFT', "
            "'PREFIX_TUNING' and 'PROMPT_TUNING' are supported"
        )
    check_patterns(cfg, path)  # only the fused modules' scale-preserving ones
    rank, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise ValueError(f"{path}: 'r' must be a positive integer and 'lora_alpha' a number")
    return PeftAdapterConfig(
        rank=rank,
        alpha=float(alpha),
        rslora=bool(cfg.get("use_rslora", False)),
        dora=bool(cfg.get("use_dora", False)),
        base=cfg.get("base_model_name_or_path") or "",
        target_parameters=tuple(cfg.get("target_parameters") or ()),
    )


def read_peft_adapter(
    adapter_dir: str,
    params: dict,
    *,
    rank: int | None = None,
    alpha: float | None = None,
    rslora: bool | None = None,
    dora: bool | None = None,
    oft_spec: oft.OftSpec | None = None,
    method: str | None = None,
) -> dict:
    """A PEFT adapter directory -> adapter tree shaped after `params`. Rank, alpha, rsLoRA and
    DoRA (OFT: its rotation settings) come from its adapter_config.json (`read_peft_config`);
    the ones given here (a run's config.lora) must match it, since a mismatch would silently
    change the adapter's scale or rotations. `method` (config.lora.method), when given, must
    be the adapter's."""
    from safetensors.numpy import load_file

    cfg = read_peft_config(adapter_dir)
    asked = method or ("oft" if oft_spec is not None else "lora" if rank is not None else None)
    found = cfg.method
    if asked not in (None, found):
        raise ValueError(
            f"PEFT adapter {adapter_dir} is a {found.upper()} adapter but config.lora.method is "
            f"{asked!r}"
        )
    tensors = load_file(os.path.join(adapter_dir, WEIGHTS_FILE))
    if found in prefix.PEFT_TYPES:
        layers, _, kv_heads, head_dim = params["layers"]["attn"]["k_proj"]["kernel"].shape
        return prefix.from_peft_tensors(tensors, found, layers, kv_heads, head_dim)
    want: dict[str, Any] = {"OFT settings": oft_spec}
    got: dict[str, Any] = {"OFT settings": cfg.oft}
    if found == "lora":
        want = {"r": rank, "lora_alpha": alpha, "use_rslora": rslora, "use_dora": dora}
        got = {"r": cfg.rank, "lora_alpha": cfg.alpha, "use_rslora": cfg.rslora}
        got["use_dora"] = cfg.dora
    problems = [
        f"{k} is {got[k]!r} there but {want[k]!r} here"
        for k in want
        if want[k] is not None and got[k] != want[k]
    ]
    if problems:
        raise ValueError(
            f"PEFT adapter {adapter_dir} does not match config.lora: " + "; ".join(problems)
        )
    adapters = from_peft_tensors(
        tensors, params, target_parameters=cfg.target_parameters, rank=cfg.rank
    )
    has_m = any("m" in get_path(adapters, p) for p in adapter_paths(adapters))
    if has_m != cfg.dora:
        raise ValueError(
            f"{os.path.join(adapter_dir, CONFIG_FILE)}: use_dora is {cfg.dora} but "
            f"{WEIGHTS_FILE} {'has' if has_m else 'has no'} lora_magnitude_vector tensors"
        )
    return adapters
