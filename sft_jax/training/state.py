"""The TrainState: what it holds, its layout, and building it sharded on a mesh.

One description decides the state: `StateSpec` (model, LoRA and the frozen base's storage,
optimizer, the KL-to-base reference copy, mesh and rules). From it `state_layout` traces the
state abstractly (ShapeDtypeStructs carrying their shardings; nothing allocated, so it works on
an AbstractMesh or over a TPU topology's compile-only devices), and `create_train_state`
materialises exactly that layout. Training, the memory plan (sft_jax/plan.py), its compile
checks (sft_jax/planning/plan_check.py, sft_jax/planning/tpu.py) and the benchmark
(sft_jax/bench.py) all read the state from here, so none of them can describe a different state than
the one training builds.

Parameters are never built whole on one device and then split: the model is traced abstractly
(`jax.eval_shape`), its logical axis names become shardings through the rules table, and then
either `jit(init, out_shardings=...)` creates each shard in place or the HF loader places each
tensor straight into its sharding. Optimizer state follows the parameter shardings.

With LoRA enabled the trainable `params` are the adapter tree (their optimizer state is the only
optimizer state) and `frozen` holds the base in `lora.base_dtype`, possibly quantised (QLoRA);
the base is re-read from `model.path` (or re-initialised from the seed) on every start, never
checkpointed. KL-to-base under full fine-tuning keeps `reference`, a copy of the initial
parameters: one more parameter-sized buffer per device (under LoRA the frozen base is the
reference already).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from sft_jax import hf, lora
from sft_jax.config import Config, ConfigError, LoraSection
from sft_jax.model.decoder import ModelConfig, Transformer
from sft_jax.model.prefix import PREFIX_K, PREFIX_V, prefix_tree, with_prompt_prefix
from sft_jax.training import sharding
from sft_jax.training.optim import make_optimizer


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: train steps taken, skipped non-finite ones included (the LR
    # schedule follows optax's own count of applied updates instead)
    params: Any  # trainable parameters
    opt_state: Any
    rng: jax.Array  # base key; each step uses fold_in(rng, step)
    apply_fn: Callable = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    # LoRA: the frozen base parameters (possibly quantised); `params` is then the adapter tree.
    # None for full fine-tuning. Never differentiated, never given optimizer state or saved.
    frozen: Any = None
    # KL-to-base under full fine-tuning: a copy of the initial parameters (None otherwise).
    # Never differentiated or saved: a restart re-creates it from model.path.
    reference: Any = None


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """Everything that decides the TrainState. `model_config` is the model as configured (its
    dtypes, NEFTune); the state applies it with activations pinned to `mesh` (`model`). `lora`
    None or disabled: full fine-tuning. `tx` carries the optimizer, its schedule and the Adam
    state dtype. `keep_reference`: KL-to-base's copy of the initial parameters."""

    model_config: ModelConfig
    mesh: Mesh | AbstractMesh
    rules: tuple
    tx: optax.GradientTransformation
    seed: int = 0
    model_path: str = ""
    lora: LoraSection | None = None
    keep_reference: bool = False

    @classmethod
    def from_config(
        cls,
        config: Config,
        model_config: ModelConfig | None,
        mesh: Mesh | AbstractMesh,
        total_steps: int,
    ) -> StateSpec:
        """The state training builds for `config` over `total_steps` (the schedule's length);
        `model_config`: the model of `config.model` unless given."""
        model_config = model_config or hf.build_model_config(config.model)
        neftune = config.train.neftune_alpha
        return cls(
            model_config=dataclasses.replace(model_config, neftune_alpha=neftune),
            mesh=mesh,
            rules=config.mesh.rules,
            tx=make_optimizer(config.optim, total_steps, config.lora),
            seed=config.seed,
            model_path=config.model.path,
            lora=config.lora if config.lora.enabled else None,
            keep_reference=config.train.kl_to_base > 0,
        )

    @property
    def uses_lora(self) -> bool:
        return self.lora is not None and self.lora.enabled

    @property
    def model(self) -> Transformer:
        """The model over this mesh: each layer's input and output pinned to the batch axes."""
        return Transformer(sharding.pin_model_activations(self.model_config, self.mesh, self.rules))


def init_key(seed: int) -> jax.Array:
    """Key for parameter init. RBG rather than threefry: on CPU, XLA compiles one threefry
    expansion per parameter, which made init of even a 2-layer model take seconds to compile."""
    return jax.random.key(seed, impl="rbg")


def _init_fn(model: Transformer):
    """Parameter init by tracing the model on a (1, 8) token batch. Attention there is the
    reference implementation: it has no parameters (the tree is the same whichever runs) and,
    unlike a fused kernel such as splash (sequence a multiple of 128), takes any length."""
    model = model.clone(config=dataclasses.replace(model.config, attention="reference"))

    def init(rng: jax.Array) -> Any:
        tokens = jnp.zeros((1, 8), jnp.int32)
        return model.init(rng, tokens, tokens, jnp.ones_like(tokens))["params"]

    return init


def abstract_boxed_params(model: Transformer) -> Any:
    """The parameter tree as ShapeDtypeStructs boxed with their logical axis names (nothing
    allocated; any attention implementation and mesh)."""
    return jax.eval_shape(_init_fn(model), init_key(0))


def param_shardings(model: Transformer, mesh: Mesh, rules: Sequence) -> tuple[Any, Any]:
    """(abstract unboxed params, NamedSharding tree) for a model, without allocating weights."""
    boxed = abstract_boxed_params(model)
    logical = nn.get_partition_spec(boxed)
    abstract = nn.unbox(boxed)
    return abstract, sharding.param_shardings(logical, abstract, mesh, rules)


def _load_or_init(model: Transformer, model_path: str, shardings: Any, seed: int) -> Any:
    if model_path:
        return hf.load_params(model_path, model.config, shardings)
    init = _init_fn(model)
    return jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=shardings)(init_key(seed))


def init_params(model: Transformer, model_path: str, mesh: Mesh, rules: Sequence, seed: int) -> Any:
    """Sharded parameters: loaded from `model_path` if set, else a seeded random init."""
    _, shardings = param_shardings(model, mesh, rules)
    return _load_or_init(model, model_path, shardings, seed)


def lora_model_config(model_config: ModelConfig, cfg: LoraSection) -> ModelConfig:
    """The model config whose Einsums apply adapters with this LoRA scale and dropout."""
    scale = lora.config_scale(cfg)
    return dataclasses.replace(model_config, lora_scale=scale, lora_dropout=cfg.dropout)


def inference_merge(
    model: Transformer, cfg: Any, shardings: Any, mesh: Mesh | AbstractMesh
) -> tuple[Callable[[Any, Any], Any], Any]:
    """(jitted (base or frozen base, adapters) -> the tree the plain model runs, its shardings)
    for a LoRA-family run `cfg`: LoRA, DoRA and OFT merged into the kernels (dequantised
    first); prefix and prompt tuning's K/V added to the tree (`lora.prefix.with_prefix`;
    prompt tuning's computed from its virtual tokens by `model`), replicated. `shardings`:
    the base's."""
    scale, oft = lora.config_scale(cfg), lora.oft_spec(cfg)
    if cfg.method in lora.prefix.PEFT_TYPES:
        rep = NamedSharding(mesh, PartitionSpec())
        prefix = {"layers": {"attn": {PREFIX_K: rep, PREFIX_V: rep}}}
        shardings = lora.prefix.with_prefix(shardings, prefix)

    def merge(base: Any, adapters: Any) -> Any:
        base = lora.dequantize(base)
        return lora.merge(base, prefix_tree(model, base, adapters), scale, oft)

    return jax.jit(merge, out_shardings=shardings), shardings


@dataclasses.dataclass(frozen=True)
class LoraApply:
    """`apply_fn` of a LoRA state: the model's apply after moving the trained copies of saved
    modules (`lora.modules_to_save`) from the "lora" collection into "params" (and, for OFT,
    turning its vectors into rotations per `oft`). A frozen dataclass, so two states built
    alike compare equal (apply_fn is static in jit)."""

    model: Transformer
    oft: lora.OftSpec | None = None

    def __call__(self, variables: dict, *args: Any, **kwargs: Any) -> Any:
        variables = with_prompt_prefix(self.model, lora.apply_variables(variables, self.oft))
        return self.model.apply(variables, *args, **kwargs)


def adapter_shardings(adapters: Any, base: Any, mesh: Mesh | AbstractMesh) -> Any:
    """a follows its kernel's sharding on the input dims, b and m on the output dims; a saved
    module's trained copy follows its frozen leaf. `base`: arrays or ShapeDtypeStructs with
    their shardings."""

    def one(ad: dict, node: dict, name: str) -> dict:  # node: the params holding `name`
        kernel, lead, n_in = lora.adapted_kernel(node, name)
        specs = lora.adapter_specs(kernel.sharding.spec, len(kernel.shape), n_in, lead)
        return {k: NamedSharding(mesh, PartitionSpec(*specs[k])) for k in ad}

    def visit(ad: dict, p: dict) -> dict:
        return {
            k: one(v, p, k) if "a" in v or lora.oft.PARAM in v else visit(v, p[k])
            for k, v in ad.items()
            if k != lora.SAVED
        }

    if lora.prefix.method_of(adapters):  # prefix / prompt tuning: small, replicated
        return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), adapters)
    out = visit(adapters, base)
    if lora.SAVED in adapters:
        table = lora.saved_module_table(base)
        leaf = lambda path: functools.reduce(lambda node, key: node[key], path, base)
        out[lora.SAVED] = {m: leaf(table[m][0]).sharding for m in adapters[lora.SAVED]}
    return out


def _placed(tree: Any, shardings: Any) -> Any:
    """`tree`'s shapes and dtypes as ShapeDtypeStructs carrying `shardings`."""
    with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    return jax.tree.map(with_sharding, tree, shardings)


def _sharding_tree(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.sharding, tree)


def _adapter_rng(seed: int) -> jax.Array:
    return jax.random.PRNGKey(seed + 2)


def _freeze(cfg: LoraSection) -> Callable[[Any], Any]:
    """base -> the frozen base: cast to `lora.base_dtype`, layer kernels quantised per
    `lora.base_quant`."""
    dtype = jnp.dtype(cfg.base_dtype)
    return lambda params: lora.quantize_kernels(params, cfg.base_quant, dtype)


def frozen_layout(base: Any, cfg: LoraSection, mesh: Mesh | AbstractMesh) -> Any:
    """The frozen LoRA base of `base` (placed arrays or ShapeDtypeStructs), abstract. Every leaf
    keeps its kernel's sharding (quantised codes and scales: `quantized_specs`), so a QLoRA base
    is FSDP/tensor-sharded like a bf16 one and built shard by shard in place."""
    is_q = lambda x: isinstance(x, lora.Quantized)

    def place(q: Any, leaf: Any) -> Any:
        if not is_q(q):
            return _placed(q, leaf.sharding)
        blocks = q.scales.shape[-1]
        spec = leaf.sharding.spec
        specs = lora.quantized_specs(spec, len(leaf.shape), blocks, dict(mesh.shape))
        put = lambda a, s: _placed(a, NamedSharding(mesh, PartitionSpec(*s)))
        return q.replace(codes=put(q.codes, specs["codes"]), scales=put(q.scales, specs["scales"]))

    return jax.tree.map(place, jax.eval_shape(_freeze(cfg), base), base, is_leaf=is_q)


def adapter_layout(base: Any, frozen: Any, cfg: Any, mesh: Mesh | AbstractMesh) -> Any:
    """The adapter tree `lora.make_adapters` makes for `base` (placed), abstract and placed
    (`adapter_shardings`). `frozen`: the frozen base (DoRA's m; shapes only here)."""
    make = lambda params, rng, frozen: lora.make_adapters(params, cfg, rng, frozen)
    try:
        abstract = jax.eval_shape(make, base, _adapter_rng(0), frozen)
    except ValueError as e:
        raise ConfigError(f"lora.targets / lora.modules_to_save: {e}") from e
    return _placed(abstract, adapter_shardings(abstract, base, mesh))


def param_layout(spec: StateSpec) -> Any:
    """The model's whole parameter tree (the LoRA base before freezing), abstract and placed."""
    return _placed(*param_shardings(spec.model, spec.mesh, spec.rules))


def _layout(spec: StateSpec, base: Any) -> TrainState:
    params, frozen, apply_fn = base, None, spec.model.apply
    if spec.uses_lora:
        frozen = frozen_layout(base, spec.lora, spec.mesh)
        params = adapter_layout(base, frozen, spec.lora, spec.mesh)
        model = Transformer(lora_model_config(spec.model.config, spec.lora))
        apply_fn = LoraApply(model, lora.oft_spec(spec.lora))
    opt_state = jax.eval_shape(spec.tx.init, params)
    opt_shardings = sharding.follow_param_shardings(
        opt_state, params, _sharding_tree(params), spec.mesh
    )
    replicated = NamedSharding(spec.mesh, PartitionSpec())
    return TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        params=params,
        opt_state=_placed(opt_state, opt_shardings),
        rng=_placed(jax.eval_shape(jax.random.PRNGKey, spec.seed + 1), replicated),
        apply_fn=apply_fn,
        tx=spec.tx,
        frozen=frozen,
        reference=params if spec.keep_reference and not spec.uses_lora else None,
    )


def state_layout(spec: StateSpec) -> TrainState:
    """The TrainState `create_train_state(spec)` builds, as ShapeDtypeStructs with their
    shardings (nothing allocated; any mesh, abstract or of compile-only devices)."""
    return _layout(spec, param_layout(spec))


def _lora_adapters(base: Any, frozen: Any, spec: StateSpec, layout: Any) -> Any:
    """Fresh adapters, or a PEFT adapter (`lora.init_from`) checked against the config, placed
    as `layout` says."""
    cfg, shardings = spec.lora, _sharding_tree(layout)
    if not cfg.init_from:
        make = lambda params, rng, frozen: lora.make_adapters(params, cfg, rng, frozen)
        return jax.jit(make, out_shardings=shardings)(base, _adapter_rng(spec.seed), frozen)
    flags = {"rank": cfg.rank, "alpha": cfg.alpha, "rslora": cfg.rslora, "dora": cfg.dora}
    if cfg.method != "lora":
        flags = {"method": cfg.method, "oft_spec": lora.oft_spec(cfg)}
    try:
        adapters = lora.read_peft_adapter(cfg.init_from, base, **flags)
    except (ValueError, OSError) as e:
        raise ConfigError(f"lora.init_from: {e}") from e
    shapes = lambda t: jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)), t)
    if shapes(adapters) != shapes(layout):
        raise ConfigError(
            f"PEFT adapter {cfg.init_from} adapts other modules or shapes than config.lora "
            f"targets {cfg.targets} with rank {cfg.rank} on this model"
        )
    return jax.device_put(adapters, shardings)


def create_train_state(spec: StateSpec) -> tuple[TrainState, TrainState]:
    """Returns (state, state_shardings): `state_layout(spec)` materialised on `spec.mesh`; the
    second has the same structure, with shardings. Parameters come from `spec.model_path` or a
    seeded init; with LoRA, params = adapters and frozen = the base (see the module docstring)."""
    base_layout = param_layout(spec)
    layout = _layout(spec, base_layout)
    shardings = _sharding_tree(layout)
    params = _load_or_init(spec.model, spec.model_path, _sharding_tree(base_layout), spec.seed)
    frozen = None
    if spec.uses_lora:
        frozen = jax.jit(_freeze(spec.lora), out_shardings=shardings.frozen)(params)
        params = _lora_adapters(params, frozen, spec, layout.params)
    opt_state = jax.jit(spec.tx.init, out_shardings=shardings.opt_state)(params)
    put = lambda x: jax.device_put(x, shardings.step)
    state = TrainState(
        step=put(jnp.int32(0)),
        params=params,
        opt_state=opt_state,
        rng=put(jax.random.PRNGKey(spec.seed + 1)),
        apply_fn=layout.apply_fn,
        tx=spec.tx,
        frozen=frozen,
        reference=None if layout.reference is None else jax.tree.map(jnp.copy, params),
    )
    return state, shardings
