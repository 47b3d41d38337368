"""Device mesh and the one table that maps logical axis names to mesh axes.

Weights carry logical names (vocab, embed, heads, kv_heads, head_dim, mlp, layers, expert) from
the model; activations and batches use batch and seq. `config.mesh.rules` maps each name to mesh
axes of the (data, fsdp, context, expert, tensor) mesh. A dimension is sharded only when its size
divides evenly by the mesh axes it maps to; otherwise it stays replicated (tiny test models on 8
devices rely on this).

The context axis splits each row's sequence (context parallelism): activations are sharded along
seq over it and attention becomes ring attention (sft_jax/model/context_attention.py).

The expert axis splits a mixture-of-experts layer's experts (expert parallelism, see
sft_jax/model/moe.py): each device holds E / expert of them, and every MoE layer gathers the
tokens of its expert group and scatters the outputs back, forward and backward. For everything
else it is one more data-parallel axis: batch rows are split over it, and like fsdp and context
it shards the embed dimension of the weights, so dense weights and their optimizer state are not
held whole on each of its devices. A mesh has it only when `mesh.expert` > 1, so a dense model's
mesh and shardings are exactly what they were before the axis existed.

Axis order is device order: the later an axis, the closer its devices (neighbouring links on a
TPU slice). Tensor is innermost (it reduces inside every layer's matmuls, on the critical path),
expert next (every MoE layer gathers its group's tokens and reduce-scatters their outputs,
forward and backward, and the layer's matmuls wait for them), then context (the ring passes
keys and values while it computes), then fsdp (weight gathers, which do not depend on the
previous layer's result) and data (one gradient reduction per step: it may span slices).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sft_jax.config import ConfigError, MeshSection

# Every mesh axis, outermost first; a mesh built by make_mesh leaves out expert when it is 1.
MESH_AXES = ("data", "fsdp", "context", "expert", "tensor")
CONTEXT_AXIS = "context"
EXPERT_AXIS = "expert"
# Every logical name the model and the batches use; each needs a rule.
LOGICAL_AXES = (
    "batch", "seq", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers", "expert",
)  # fmt: skip
# Logical names added after rule tables were first written: a table without one (a user's own
# config, a saved workdir) keeps them replicated instead of failing.
LATER_AXES = ("expert",)


def check_rules(rules: Sequence) -> None:
    """Fails before compute on a rule table with a typo: an unknown logical name or mesh axis, a
    name given twice, or a logical name with no rule (each found otherwise only mid-setup, as a
    bare KeyError)."""
    table: dict[str, Any] = {}
    for entry in rules:
        if not isinstance(entry, (tuple, list)) or len(entry) != 2:
            raise ConfigError(f"config.mesh.rules entry {entry!r} is not a (logical, axes) pair")
        name, axes = entry
        if name not in LOGICAL_AXES:
            raise ConfigError(
                f"config.mesh.rules: unknown logical axis {name!r}{_hint(name, LOGICAL_AXES)}"
            )
        if name in table:
            raise ConfigError(f"config.mesh.rules: logical axis {name!r} is given twice")
        table[name] = axes
        for axis in _mesh_axes_for(name, table):
            if axis not in MESH_AXES:
                raise ConfigError(
                    f"config.mesh.rules: {name!r} maps to unknown mesh axis {axis!r}"
                    f"{_hint(axis, MESH_AXES)}; the mesh axes are {MESH_AXES}"
                )
    missing = [name for name in LOGICAL_AXES if name not in table and name not in LATER_AXES]
    if missing:
        raise ConfigError(f"config.mesh.rules has no entry for {missing} (use None to replicate)")


def _hint(word: Any, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def make_mesh(cfg: MeshSection, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, context, [expert,] tensor) mesh over all devices (expert only when
    `mesh.expert` > 1); one of data, fsdp and tensor may be -1 for "the rest" (context and
    expert are always explicit).

    Devices of several TPU slices (multi-slice: each device has a `slice_index`) form a hybrid
    mesh: `data` spans the slices over the data-centre network (DCN), so only the gradient
    reduction crosses it, while fsdp, context, expert and tensor (and the rest of data) stay
    inside a slice on the fast interconnect (ICI); `mesh.data` must then be a multiple of the
    slice count."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    sizes, axes = list(shape.values()), tuple(shape)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices == 1:
        return Mesh(np.asarray(devices).reshape(sizes), axes)
    if sizes[0] % slices:
        raise ConfigError(
            f"mesh.data={sizes[0]} on {slices} TPU slices: data parallelism spans the slices, "
            f"so mesh.data must be a multiple of {slices} (e.g. --config.mesh.data={slices})"
        )
    ici = [sizes[0] // slices, *sizes[1:]]
    dcn = [slices] + [1] * (len(sizes) - 1)
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    return Mesh(grid, axes)


def mesh_shape(cfg: MeshSection, devices: int) -> dict[str, int]:
    """{axis: size} of the mesh `make_mesh` builds on `devices` devices, in MESH_AXES order,
    the -1 resolved; the expert axis only when `cfg.expert` > 1. ConfigError if the sizes do
    not fit."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    explicit = cfg.context * cfg.expert
    known = int(np.prod([s for s in sizes if s != -1])) * explicit
    shown = f"mesh (data, fsdp, tensor) = {tuple(sizes)} x context {cfg.context}"
    if cfg.expert != 1:
        shown += f" x expert {cfg.expert}"
    if -1 in sizes:
        if devices % known:
            raise ConfigError(
                f"{shown} does not fit {devices} devices: {devices} is not divisible by {known}"
            )
        sizes[sizes.index(-1)] = devices // known
    if int(np.prod(sizes)) * explicit != devices:
        raise ConfigError(
            f"{shown} needs {int(np.prod(sizes)) * explicit} devices, but {devices} are "
            "present; set one size to -1 to use all of them"
        )
    shape = {"data": sizes[0], "fsdp": sizes[1], CONTEXT_AXIS: cfg.context}
    if cfg.expert != 1:
        shape[EXPERT_AXIS] = cfg.expert
    shape["tensor"] = sizes[2]
    return shape


def _mesh_axes_for(name: str | None, rules: dict[str, Any]) -> tuple[str, ...]:
    if name is None:
        return ()
    if name not in rules and name in LATER_AXES:
        return ()
    if name not in rules:
        raise ConfigError(f"logical axis '{name}' has no entry in config.mesh.rules")
    axes = rules[name]
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _on_mesh(mesh: Mesh, axes: tuple[str, ...]) -> tuple[str, ...]:
    """The axes the mesh has (a hand-built mesh may lack some the rules name)."""
    return tuple(a for a in axes if a in mesh.shape)


def logical_to_spec(
    logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Sequence
) -> PartitionSpec:
    """PartitionSpec for one array: each dimension gets its rule's mesh axes if they divide it.
    Axes the mesh lacks are left out, so a mesh built by hand without some axis (say, no context
    axis) takes the default rules as if that axis had size 1."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(logical, shape, strict=True):
        axes = tuple(a for a in _on_mesh(mesh, _mesh_axes_for(name, table)) if a not in used)
        product = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if axes and product > 1 and size % product == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def param_shardings(logical_specs: Any, abstract_params: Any, mesh: Mesh, rules: Sequence) -> Any:
    """NamedSharding tree for parameters from their logical PartitionSpecs and shapes."""

    def one(spec: PartitionSpec, leaf: jax.ShapeDtypeStruct) -> NamedSharding:
        names = tuple(spec) + (None,) * (len(leaf.shape) - len(tuple(spec)))
        return NamedSharding(mesh, logical_to_spec(names, leaf.shape, mesh, rules))

    return jax.tree.map(one, logical_specs, abstract_params)


def batch_sharding(mesh: Mesh, rules: Sequence) -> NamedSharding:
    """Sharding of [B, T] batch arrays: batch over its rule's axes, sequence replicated."""
    table = dict(rules)
    batch = _on_mesh(mesh, _mesh_axes_for("batch", table))
    return NamedSharding(mesh, PartitionSpec(batch or None, None))


def activation_sharding(mesh: Mesh, rules: Sequence) -> NamedSharding | None:
    """Sharding of [B, T, D] activations: batch over the batch rule's axes, the sequence over
    the seq rule's (context parallelism); None when neither is split. The model pins each
    layer's input and output to it, because XLA's sharding propagation otherwise follows the
    FSDP-sharded weights and gathers activations instead."""
    table = dict(rules)
    batch = _on_mesh(mesh, _mesh_axes_for("batch", table))
    seq = _on_mesh(mesh, _mesh_axes_for("seq", table))
    if _product(mesh, batch) == 1 and _product(mesh, seq) == 1:
        return None
    return NamedSharding(mesh, PartitionSpec(batch or None, seq or None, None))


def _product(mesh: Mesh, axes: Sequence[str]) -> int:
    return int(np.prod([mesh.shape[a] for a in _on_mesh(mesh, tuple(axes))])) if axes else 1


def pin_model_activations(model_config: Any, mesh: Mesh, rules: Sequence) -> Any:
    """The model config with its activations pinned to `activation_sharding(mesh, rules)`, and
    the mesh and rules its attention kernel is split by."""
    hashable = tuple((name, tuple(a) if isinstance(a, list) else a) for name, a in rules)
    return dataclasses.replace(
        model_config,
        activation_sharding=activation_sharding(mesh, rules),
        mesh=mesh,
        mesh_rules=hashable,
    )


def batch_shards(mesh: Mesh, rules: Sequence) -> int:
    """How many ways the batch dimension is split (global batch must be a multiple of this)."""
    return _product(mesh, _mesh_axes_for("batch", dict(rules)))


def context_shards(mesh: Mesh) -> int:
    """How many ways each row's sequence is split (1: no context parallelism)."""
    return int(dict(mesh.shape).get(CONTEXT_AXIS, 1))


def expert_shards(mesh: Mesh) -> int:
    """How many ways a mixture-of-experts layer's experts are split (1: no expert parallelism)."""
    return int(dict(mesh.shape).get(EXPERT_AXIS, 1))


def follow_param_shardings(tree: Any, params: Any, shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a tree (such as optimizer state) whose leaves mirror parameters.

    A leaf whose key path ends with a parameter's key path and has its shape gets that parameter's
    sharding (Adam's mu and nu); anything else (step counts) is replicated.
    """
    by_path = {}
    for (path, leaf), sharding in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(shardings), strict=True
    ):
        by_path[_path_key(path)] = (tuple(leaf.shape), sharding)
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path: tuple, leaf: Any) -> NamedSharding:
        key = _path_key(path)
        for start in range(len(key)):
            match = by_path.get(key[start:])
            if match and match[0] == tuple(leaf.shape):
                return match[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, tree)


def _path_key(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)
