"""LoRA as pure functions over the parameter tree: adapters are a tree of their own.

Before (the model's parameters; layers stacked on a leading L axis):

    params/layers/attn/q_proj/kernel [L, D, N, H]    params/layers/mlp/up_proj/kernel [L, D, F]

After `init_adapters(params, targets, rank)`: a second tree with the same paths, holding for each
targeted kernel of shape [L, *in, *out] a down-projection `a` [L, *in, R] and an up-projection
`b` [L, R, *out] (B starts at zero, so the model is unchanged at step 0):

    adapters/layers/attn/q_proj/{a [L, D, R], b [L, R, N, H]}   adapters/layers/mlp/up_proj/{a, b}

Training differentiates only the adapter tree (the base tree is a constant of the loss, so no
weight gradient is ever formed for it: the model adds scale * (x @ a) @ b to x @ W instead of
materialising W + scale * a @ b). `merge` folds adapters into the kernels for export; PEFT
conversion (sft_jax/lora/peft.py) maps each layer's a/b to `lora_A.weight` [R, in] and
`lora_B.weight` [out, R]. DoRA adds a magnitude `m` [L, *out] per adapter (`init_magnitudes`).

Mixture-of-experts layers keep their experts as stacked leaves ([L, E, D, F] gate_proj and
up_proj, [L, E, F, D] down_proj) and are adapted per expert, as PEFT adapts transformers' fused
expert parameters (`target_parameters`): one adapter over gate and up together (HF's fused
gate_up_proj, output gate units then up units) and one over down, each with its own rank-R
a/b per expert (sft_jax/model/expert_lora.py `ExpertLora`):

    adapters/layers/mlp/experts/gate_up_proj/{a [L, E, D, R], b [L, E, R, 2F]}
    adapters/layers/mlp/experts/down_proj/{a [L, E, F, R], b [L, E, R, D]}

Targets name them explicitly ("experts", or "experts.gate_up_proj" / "experts.down_proj", also
as PEFT's "mlp.experts.gate_up_proj"): module globs such as the default "*_proj" adapt the
attention and dense (or shared-expert) projections only. DoRA on experts is refused, as PEFT
refuses it on parameters.

PEFT's `modules_to_save` (whole modules trained next to the adapters, e.g. the embedding a tiny
model needs to learn a new stop token) are full float32 copies under the adapter tree's key
"modules_to_save", keyed by HF module name (`add_saved_modules`):

    adapters/modules_to_save/{embed_tokens [V, D], norm [D], input_layernorm [L, D], ...}

`with_saved_modules` puts them in place of the frozen leaves, for the forward and for `merge`.

The other methods of `lora.method` keep the same paths with their own leaves: OFT a vector
`oft_r` [L, blocks, b (b - 1) / 2] per targeted kernel (BOFT [L, factors, blocks, n] and
`boft_s` [L, *out];
sft_jax/lora/oft.py), prefix tuning layers/attn/{prefix_k, prefix_v} [L, P, K, H] and prompt
tuning prompt_embeddings [P, D] (sft_jax/lora/prefix.py); `make_adapters` and `merge` dispatch
on them.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any

import jax
import jax.numpy as jnp

from sft_jax.lora import oft, prefix
from sft_jax.lora.quant import dequantize

# Kernels of the decoder: module name -> number of input dims after L. Their HF names come from
# their paths (`hf_module`): the shared expert's gate_proj is mlp.shared_expert.gate_proj.
KERNELS = {
    "q_proj": 1,
    "k_proj": 1,
    "v_proj": 1,
    "o_proj": 2,
    "gate_proj": 1,
    "up_proj": 1,
    "down_proj": 1,
    # Gated DeltaNet (Qwen3.5's linear attention, layers/layer_{j}/linear_attn).
    "in_proj_qkv": 1,
    "in_proj_z": 1,
    "in_proj_b": 1,
    "in_proj_a": 1,
    "out_proj": 1,
}
ALL_LINEAR = tuple(KERNELS)
# Adapters of a MoE layer's experts (HF's fused expert parameters) -> the stacked expert leaves
# [L, E, in, out] each one adapts; gate_up_proj's output is gate's and up's, concatenated.
EXPERT_KERNELS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
SUBLAYER = "layer_"  # a hybrid model's sub-layers: layers/layer_{j} (sft_jax/model/hybrid.py)
EXPERTS = "experts"  # the parent of the expert leaves, and the target naming all their adapters
SAVED = "modules_to_save"  # key of the trained full copies inside the adapter tree
# HF module name -> (our param path, HF weight key after "base_model.model."; {i} = layer).
# On a tied model "lm_head" names the shared embedding (`saved_module_table`).
SAVEABLE = {
    "embed_tokens": (("embed", "embedding"), "model.embed_tokens.weight"),
    "lm_head": (("lm_head", "kernel"), "lm_head.weight"),
    "norm": (("final_norm", "scale"), "model.norm.weight"),
    "input_layernorm": (
        ("layers", "attn_norm", "scale"),
        "model.layers.{i}.input_layernorm.weight",
    ),
    "post_attention_layernorm": (
        ("layers", "mlp_norm", "scale"),
        "model.layers.{i}.post_attention_layernorm.weight",
    ),
    "pre_feedforward_layernorm": (
        ("layers", "mlp_norm", "scale"),
        "model.layers.{i}.pre_feedforward_layernorm.weight",
    ),
    "post_feedforward_layernorm": (
        ("layers", "post_mlp_norm", "scale"),
        "model.layers.{i}.post_feedforward_layernorm.weight",
    ),
    "q_norm": (("layers", "attn", "q_norm", "scale"), "model.layers.{i}.self_attn.q_norm.weight"),
    "k_norm": (("layers", "attn", "k_norm", "scale"), "model.layers.{i}.self_attn.k_norm.weight"),
}
SAVEABLE_MODULES = tuple(SAVEABLE)


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA (keeps updates stable at large r)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def config_scale(cfg: Any) -> float:
    """The scale of a LoRA config (`alpha`, `rank`, `rslora`: `config.lora`, a saved run's
    section, an adapter_config.json): every user of a config's scale reads it here."""
    return lora_scale(cfg.alpha, cfg.rank, cfg.rslora)


def names_expert_adapter(pattern: str, name: str) -> bool:
    """Whether target `pattern` names the experts' adapter `name` (gate_up_proj, down_proj):
    "experts" names both; otherwise only a pattern that says "experts" (PEFT's parameter names
    "mlp.experts.down_proj", "experts.gate_up_proj", "experts.*") or "gate_up_proj", which no
    module shares. So module globs like "*_proj" or "down_proj" never reach the experts."""
    if pattern == EXPERTS:
        return True
    if EXPERTS not in pattern:
        return pattern == name == "gate_up_proj"
    return any(fnmatch.fnmatchcase(f"{p}{EXPERTS}.{name}", pattern) for p in ("", "mlp."))


def is_expert_path(path: tuple[str, ...]) -> bool:
    """Whether an adapter path (as `target_paths` gives) is one of a MoE layer's experts."""
    return len(path) > 1 and path[-2] == EXPERTS and path[-1] in EXPERT_KERNELS


def split_sublayer(path: tuple[str, ...]) -> tuple[int, tuple[str, ...]]:
    """(j, the path without it) for a hybrid model's sub-layer path ("layers", "layer_{j}",
    ...), whose leaves hold HF layers s * period + j; (0, path) for any other path."""
    if len(path) > 1 and path[0] == "layers" and path[1].startswith(SUBLAYER):
        index = path[1][len(SUBLAYER) :]
        if index.isdigit():
            return int(index), (path[0], *path[2:])
    return 0, path


def hf_layer(path: tuple[str, ...], index: int, period: int) -> int:
    """The HF layer of entry `index` on the layer axis of the leaf at `path` (a hybrid model
    scans periods of `period` layers; 1 otherwise)."""
    return index * period + split_sublayer(path)[0]


def hf_module(path: tuple[str, ...]) -> str:
    """The HF name inside a layer of what the adapter at `path` adapts: a module
    ("self_attn.q_proj", "mlp.shared_expert.gate_proj", "linear_attn.in_proj_qkv") or, for
    the experts, the parameter PEFT's target_parameters names ("mlp.experts.gate_up_proj";
    Gemma 4's experts, our moe/experts beside its dense mlp, are the layer's "experts")."""
    group, *rest = split_sublayer(path)[1][1:]
    return ".".join([*{"attn": ["self_attn"], "moe": []}.get(group, [group]), *rest])


def target_paths(params: dict, targets: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Paths (without the trailing "kernel") of the layer kernels whose module name matches a
    pattern in `targets` (fnmatch globs such as "*_proj" or exact names such as "q_proj"), and
    the experts' adapter paths (.../experts/gate_up_proj, .../experts/down_proj) that a target
    names (`names_expert_adapter`)."""
    found = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(str(getattr(p, "key", p)) for p in path)
        if keys[0] != "layers":
            continue
        if keys[-2:] == (EXPERTS, "gate_proj"):  # one visit per MoE layer's experts
            for name in EXPERT_KERNELS:
                if any(names_expert_adapter(pattern, name) for pattern in targets):
                    found.append((*keys[:-1], name))
        elif keys[-1] == "kernel" and keys[-2] in KERNELS and _any_match(keys[-2], targets):
            found.append(keys[:-1])
    if not found:
        raise ValueError(
            f"LoRA targets {targets} match no layer kernel; choose from {ALL_LINEAR} (and, on a "
            f"mixture-of-experts model, {EXPERTS!r} or {EXPERTS}.{'/'.join(EXPERT_KERNELS)})"
        )
    return found


def _any_match(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def adapted_kernel(node: dict, name: str) -> tuple[Any, int, int]:
    """(the base leaf adapter `name` is laid out after, its number of leading dims, its number
    of input dims), `node` being the params of the module holding `name` (a layer's attn or mlp,
    or a MoE layer's experts): [L, *in, *out] kernels lead with L, the experts [L, E, in, out]
    with L and E (gate_up_proj follows gate_proj; its output is twice as wide)."""
    if isinstance(node.get(name), dict):
        return node[name]["kernel"], 1, KERNELS[name]
    return node[EXPERT_KERNELS[name][0]], 2, 1


def get_path(tree: dict, path: tuple[str, ...]) -> Any:
    """The subtree of a nested dict at `path` (a tuple of keys, as `target_paths` gives)."""
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    """Put `value` at `path` in a nested dict, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _has(tree: dict, path: tuple[str, ...]) -> bool:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return False
        tree = tree[key]
    return True


def saved_module_table(params: dict) -> dict[str, tuple[tuple[str, ...], str]]:
    """The `SAVEABLE` entries this model has: Gemma's sandwich norms rename the layer norms
    (HF post_attention_layernorm is our post_attn_norm there), and on a tied model lm_head is the
    embedding (training it trains the shared matrix, as PEFT's ensure_weight_tying)."""
    table = dict(SAVEABLE)
    layers = params.get("layers", {})
    if "post_attn_norm" in layers:  # Gemma 2/3
        table["post_attention_layernorm"] = (
            ("layers", "post_attn_norm", "scale"),
            SAVEABLE["post_attention_layernorm"][1],
        )
    else:
        del table["pre_feedforward_layernorm"], table["post_feedforward_layernorm"]
    if "lm_head" not in params:
        table["lm_head"] = table["embed_tokens"]
    return {name: entry for name, entry in table.items() if _has(params, entry[0])}


def saved_module_path(module: str) -> tuple[str, ...]:
    """Our parameter path of the leaf that saved module `module` (an HF name) copies."""
    return SAVEABLE[module][0]


def add_saved_modules(params: dict, adapters: dict, modules: tuple[str, ...]) -> dict:
    """`adapters` plus float32 copies of the named modules' weights (PEFT `modules_to_save`,
    HF module names such as "embed_tokens", "norm", "input_layernorm"), initialised to the base
    so the model is unchanged at init. On a tied model "lm_head" is stored as "embed_tokens"."""
    if not modules:
        return adapters
    table = saved_module_table(params)
    unknown = [m for m in modules if m not in table]
    if unknown:
        raise ValueError(
            f"modules_to_save {unknown} are not modules of this model; choose from {sorted(table)}"
        )
    tied = "lm_head" not in params
    names = sorted({"embed_tokens" if tied and m == "lm_head" else m for m in modules})
    saved = {m: get_path(params, table[m][0]).astype(jnp.float32) for m in names}
    return {**adapters, SAVED: saved}


def with_saved_modules(params: dict, saved: dict) -> dict:
    """`params` with each saved module's trained copy in place of its frozen leaf (same dtype
    as the copy: the model casts to its compute dtype)."""
    table = saved_module_table(params)
    out = dict(params)
    for name, value in saved.items():
        path = table[name][0]
        node = out
        for key in path[:-1]:  # copy the dicts along the path, never mutate `params`
            node[key] = dict(node[key])
            node = node[key]
        node[path[-1]] = value
    return out


def apply_variables(variables: dict, oft_spec: oft.OftSpec | None = None) -> dict:
    """Model variables of a LoRA forward: the "lora" collection's saved modules (if any) moved
    into "params", so the model reads them where it reads the frozen weights, and OFT vectors
    turned into their rotation blocks (`oft.rotations`, per `oft_spec`)."""
    adapters = variables.get("lora")
    if not isinstance(adapters, dict):
        return variables
    adapters = oft.rotations(adapters, oft_spec)
    variables = {**variables, "lora": adapters}
    if SAVED not in adapters:
        return variables
    rest = {k: v for k, v in adapters.items() if k != SAVED}
    return {
        **variables,
        "params": with_saved_modules(variables["params"], adapters[SAVED]),
        "lora": rest,
    }


def init_adapters(
    params: dict, targets: tuple[str, ...], rank: int, rng: jax.Array, dtype: Any = jnp.float32
) -> dict:
    """A (Kaiming-uniform like PEFT, bound 1/sqrt(fan_in)) and B = 0 for every targeted kernel."""
    adapters: dict = {}
    paths = target_paths(params, targets)
    for i, path in enumerate(paths):
        kernel, lead, n_in = adapted_kernel(get_path(params, path[:-1]), path[-1])
        head, in_shape = kernel.shape[:lead], kernel.shape[lead : lead + n_in]
        out_shape = kernel.shape[lead + n_in :]
        if is_expert_path(path):  # gate_up_proj: gate's and up's outputs side by side
            out_shape = (out_shape[0] * len(EXPERT_KERNELS[path[-1]]),)
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        a = jax.random.uniform(
            jax.random.fold_in(rng, i), (*head, *in_shape, rank), dtype, -bound, bound
        )
        b = jnp.zeros((*head, rank, *out_shape), dtype)
        set_path(adapters, path, {"a": a, "b": b})
    return adapters


def init_oft(params: dict, targets: tuple[str, ...], size: int, share: bool) -> dict:
    """OFT: a zero vector `oft_r` [L, blocks, b (b - 1) / 2] per targeted kernel (R = I, so
    the model is the base at init; sft_jax/lora/oft.py). PEFT's OFT adapts modules, not
    parameters, so a MoE layer's experts are refused."""
    adapters: dict = {}
    for path in target_paths(params, targets):
        if is_expert_path(path):
            raise ValueError(
                "OFT on experts is not supported (PEFT's OFT adapts modules, not the experts' "
                "fused parameters); target the attention and dense projections only"
            )
        kernel, lead, n_in = adapted_kernel(get_path(params, path[:-1]), path[-1])
        fan_in = math.prod(kernel.shape[lead : lead + n_in])
        set_path(
            adapters, path, {oft.PARAM: oft.init_vector(fan_in, size, kernel.shape[:lead], share)}
        )
    return adapters


def init_boft(
    params: dict, targets: tuple[str, ...], size: int, num: int, factors: int = 1
) -> dict:
    """BOFT (sft_jax/lora/oft.py): zero OFT vectors [L, factors, blocks, n] and a unit output
    scale `boft_s` [L, *out] per targeted kernel, so the model is the base at init."""
    adapters: dict = {}
    for path in target_paths(params, targets):
        if is_expert_path(path):
            raise ValueError(
                "BOFT on experts is not supported (PEFT's BOFT adapts modules, not the experts' "
                "fused parameters); target the attention and dense projections only"
            )
        kernel, lead, n_in = adapted_kernel(get_path(params, path[:-1]), path[-1])
        fan_in = math.prod(kernel.shape[lead : lead + n_in])
        b = oft.boft_block(fan_in, size, num, factors)
        head, out_shape = kernel.shape[:lead], kernel.shape[lead + n_in :]
        vector = jnp.zeros((*head, factors, fan_in // b, b * (b - 1) // 2), jnp.float32)
        set_path(adapters, path, {oft.PARAM: vector, oft.SCALE: jnp.ones((*head, *out_shape))})
    return adapters


def make_adapters(params: dict, cfg: Any, rng: jax.Array, frozen: Any = None) -> dict:
    """The adapter tree a LoRA run starts from, for config `cfg` (`targets`, `rank`, `dora`,
    `modules_to_save`): A random and B zero per targeted kernel, DoRA's m = ||W||, and the
    float32 `modules_to_save` copies. m is the norm of the weight the forward sees: the frozen
    (stored, maybe quantised) base `frozen` when given, so the model equals the base exactly at
    init; `params` otherwise. The one place adapters are made: training, the memory plan and
    loading a run's checkpoint all trace this function."""
    if getattr(cfg, "method", "lora") in prefix.PEFT_TYPES:  # prefix / prompt tuning
        hidden = cfg.prefix_hidden_size if cfg.prefix_projection else None
        return prefix.make_prefix_adapters(params, cfg.method, cfg.num_virtual_tokens, rng, hidden)
    if getattr(cfg, "method", "lora") == "oft":
        adapters = init_oft(params, tuple(cfg.targets), cfg.oft_block_size, cfg.oft_block_share)
        return add_saved_modules(params, adapters, tuple(cfg.modules_to_save))
    if getattr(cfg, "method", "lora") == "boft":
        size, num = cfg.boft_block_size, cfg.boft_block_num
        adapters = init_boft(params, tuple(cfg.targets), size, num, cfg.boft_n_butterfly_factor)
        return add_saved_modules(params, adapters, tuple(cfg.modules_to_save))
    adapters = init_adapters(params, tuple(cfg.targets), cfg.rank, rng)
    if cfg.dora and any(is_expert_path(p) for p in target_paths(params, tuple(cfg.targets))):
        raise ValueError(
            "DoRA on experts is not supported (PEFT refuses DoRA on parameters too); target "
            "the experts without lora.dora, or use DoRA on the other projections only"
        )
    if cfg.dora:
        adapters = init_magnitudes(params if frozen is None else dequantize(frozen), adapters)
    return add_saved_modules(params, adapters, tuple(cfg.modules_to_save))


def delta(adapter: dict, scale: float) -> jax.Array:
    """scale * a @ b in float32, shaped like the kernel [L, *in, *out]."""
    a = adapter["a"].astype(jnp.float32)  # [L, *in, R]
    b = adapter["b"].astype(jnp.float32)  # [L, R, *out]
    layers, rank = a.shape[0], a.shape[-1]
    flat = jnp.einsum("lir,lro->lio", a.reshape(layers, -1, rank), b.reshape(layers, rank, -1))
    return scale * flat.reshape(*a.shape[:-1], *b.shape[2:])


def expert_delta(adapter: dict, scale: float) -> jax.Array:
    """scale * a_e @ b_e per expert in float32: [L, E, in, out] from a [L, E, in, R] and b
    [L, E, R, out]."""
    a, b = adapter["a"].astype(jnp.float32), adapter["b"].astype(jnp.float32)
    return scale * jnp.einsum("leir,lero->leio", a, b)


def merged_experts(experts: dict, adapters: dict, scale: float) -> dict:
    """A MoE layer's expert leaves with their adapters' deltas added (gate_up_proj's split
    between gate_proj and up_proj), in the leaves' dtypes."""
    out = dict(experts)
    for name, adapter in adapters.items():
        leaves = EXPERT_KERNELS[name]
        pieces = jnp.split(expert_delta(adapter, scale), len(leaves), axis=-1)
        for leaf, piece in zip(leaves, pieces, strict=True):
            out[leaf] = (experts[leaf].astype(jnp.float32) + piece).astype(experts[leaf].dtype)
    return out


def column_norm(kernel: jax.Array, n_in: int) -> jax.Array:
    """L2 norm over the input dims of a stacked kernel [L, *in, *out] -> [L, *out] (float32)."""
    w = kernel.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(w * w, axis=tuple(range(1, 1 + n_in))))


def init_magnitudes(params: dict, adapters: dict) -> dict:
    """DoRA: adds m = ||W||_in [L, *out] to every adapter (equal to ||W + s a b|| as b = 0), so
    the DoRA model equals the base model at init, as in PEFT."""

    def visit(p: Any, ad: Any, name: str) -> Any:
        if "a" in ad:
            return {**ad, "m": column_norm(p["kernel"], KERNELS[name])}
        return {k: v if k == SAVED else visit(p[k], v, k) for k, v in ad.items()}

    return visit(params, adapters, "")


def merged_kernel(kernel: jax.Array, adapter: dict, scale: float, n_in: int) -> jax.Array:
    """W + s a b, rescaled per output unit to m / ||W + s a b||_in under DoRA (float32)."""
    merged = kernel.astype(jnp.float32) + delta(adapter, scale)
    if "m" in adapter:
        norm = column_norm(merged, n_in)
        factor = adapter["m"].astype(jnp.float32) / norm  # [L, *out]
        merged = merged * factor.reshape(factor.shape[0], *(1,) * n_in, *factor.shape[1:])
    return merged


def merge(params: dict, adapters: dict, scale: float, oft_spec: oft.OftSpec | None = None) -> dict:
    """A new parameter tree with W + scale * a @ b (DoRA: rescaled) in every adapted kernel,
    or blockdiag(R) W for OFT (rotations per `oft_spec`; BOFT: then its output scale), and the
    trained copies of saved modules (in the base leaves' dtypes)."""
    if prefix.method_of(adapters):  # no weight merge: the K/V join the tree (`with_prefix`)
        return prefix.with_prefix(params, adapters)
    adapters = oft.rotations(adapters, oft_spec)

    def visit(p: Any, ad: Any, name: str) -> Any:
        if name == EXPERTS:
            return merged_experts(p, ad, scale)
        if isinstance(ad, dict) and oft.ROTATION in ad:
            kernel = p["kernel"]
            if oft.SCALE in ad:  # BOFT
                merged = oft.butterfly_kernel(kernel, ad[oft.ROTATION], KERNELS[name])
                merged = oft.scale_kernel(merged, ad[oft.SCALE], KERNELS[name])
            else:
                merged = oft.rotate_kernel(kernel, ad[oft.ROTATION], KERNELS[name])
            return {**p, "kernel": merged.astype(kernel.dtype)}
        if isinstance(ad, dict) and "a" in ad and "b" in ad:
            kernel = p["kernel"]
            merged = merged_kernel(kernel, ad, scale, KERNELS[name])
            return {**p, "kernel": merged.astype(kernel.dtype)}
        return {k: visit(p[k], ad[k], k) if k in ad else p[k] for k in p}

    merged = visit(params, adapters, "")
    if SAVED not in adapters:
        return merged
    table = saved_module_table(params)
    saved = {m: v.astype(get_path(params, table[m][0]).dtype) for m, v in adapters[SAVED].items()}
    return with_saved_modules(merged, saved)


def adapter_specs(kernel_spec: tuple, ndim: int, n_in: int, lead: int = 1) -> dict[str, tuple]:
    """PartitionSpec entries of a, b and m from their kernel's [*lead, *in, *out] spec (ndim
    dims; `lead` leading dims: L, or L and E for the experts, `adapted_kernel`): a follows the
    kernel on its leading and input dims, b and m on its leading and output dims; rank is
    replicated."""
    spec = (tuple(kernel_spec) + (None,) * ndim)[:ndim]
    head, ins, outs = spec[:lead], spec[lead : lead + n_in], spec[lead + n_in :]
    return {
        "a": (*head, *ins, None),
        "b": (*head, None, *outs),
        "m": (*head, *outs),
        oft.PARAM: (*head, None, None),  # OFT's vector (BOFT's has a factor axis): replicated
        oft.SCALE: (*head, *outs),  # BOFT's output scale
    }


def count(adapters: dict) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(adapters))
