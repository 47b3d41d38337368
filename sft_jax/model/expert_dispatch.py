"""How the mixture-of-experts layer's tokens reach their experts on a mesh (sft_jax/model/moe.py
computes the experts; this module moves rows between devices).

Without expert parallelism each device routes its own token shard and runs it through whole
experts (`on_token_shards`; the weights are gathered per layer, as FSDP gathers the dense MLP's).

With expert parallelism (a mesh `expert` axis > 1 that the rules give the expert dimension; see
`expert_parallel_axes`) each device holds E / G experts of its expert group (the G devices along
those axes) and receives the assignments (token, choice) routed to them, in one of two ways:

- "all_gather" (`gather_dispatch`): the group gathers its token shards, each device runs the
  assignments to its own experts and zeroes the rest, and `psum_scatter` sums the partial outputs
  and hands each device its tokens back. Each device receives (G - 1) token shards and sends as
  much back.
- "all_to_all" (`all_to_all_dispatch`): each device sorts its assignments by expert, so those of
  each destination device are contiguous, and `jax.lax.ragged_all_to_all` sends every row to its
  expert's device only; a second exchange brings the outputs back. Each device sends and receives
  about K (G - 1) / G token shards' worth of rows, each way.

So the gather moves less when G <= K (Qwen3-MoE's K = 8 over up to 8 expert devices) and the
all-to-all when G > K (Mixtral's K = 2 from G = 4 on). "auto" (`choose_dispatch`) picks by that
count on TPU and GPU. Both are dropless with static shapes, so a device's receive buffer holds the
worst case, every assignment of its group (G x N x K rows): the all-to-all saves traffic, not
buffer memory.

XLA:CPU cannot run `ragged_all_to_all`; there the exchange is emulated with all-gathers
(`_emulated_ragged_all_to_all`), row for row the collective's documented result, so the tests on
fake CPU devices check the all-to-all path's offsets, sorting and gradients, and the TPU compiler
checks that the real collective lowers. The exchange's gradient is the exchange back
(`_exchange`, a custom VJP): each row's cotangent returns to the row it came from.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from sft_jax.model.config import MOE_DISPATCH
from sft_jax.training.sharding import EXPERT_AXIS, expert_shards, logical_to_spec

# (rows [R, D], local expert index [R, K]) -> outputs [R, K, D]: this device's experts applied,
# zero where the index falls outside its experts (moe.local_grouped_swiglu, closed over weights).
LocalExperts = Callable[[jax.Array, jax.Array], jax.Array]


def expert_parallel_axes(c: Any) -> tuple[str, ...]:
    """The mesh axes the experts of MoeConfig `c` are split over: those the rules give the expert
    dimension, when the mesh has an expert axis > 1 among them; () otherwise (the experts whole
    on every device, as without an expert axis, also when num_experts does not divide by the
    axes)."""
    if c.mesh is None or expert_shards(c.mesh) == 1:
        return ()
    spec = logical_to_spec(("expert",), (c.num_experts,), c.mesh, c.mesh_rules)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    return axes if EXPERT_AXIS in axes else ()


def token_gather_axes(c: Any, shape: tuple[int, ...], ep: tuple[str, ...]) -> tuple[str, ...]:
    """The expert-parallel axes that split the tokens [B, T, ...] (the batch rule's, normally).
    Tokens not split over an axis of `ep` (a batch that does not divide) are whole on its
    devices already."""
    spec = logical_to_spec(("batch", "seq", None), shape, c.mesh, c.mesh_rules)
    split = {a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)}
    return tuple(a for a in ep if a in split)


def choose_dispatch(
    method: str, ep: tuple[str, ...], gather: tuple[str, ...], c: Any, platform: str
) -> str:
    """The dispatch, "all_gather" or "all_to_all", for the layer of MoeConfig `c` (see the
    module docstring).

    The all-to-all needs the tokens split over every expert-parallel axis (each assignment then
    has one sender). Tokens whole over one of them (a batch the axes do not divide: the one-row
    trace that initialises the parameters, one prompt generating) can only be gathered, so they
    are, whatever `method` says; the results are the same. The config refuses "all_to_all" with
    rules that never split the batch over the expert axis."""
    if method not in MOE_DISPATCH:
        raise ValueError(f"moe_dispatch is {method!r}; choose one of {MOE_DISPATCH}")
    if set(gather) != set(ep):
        return "all_gather"
    if method != "auto":
        return method
    group = math.prod(c.mesh.shape[a] for a in ep) if ep else 1
    cheaper = group > c.num_experts_per_tok
    return "all_to_all" if cheaper and platform != "cpu" else "all_gather"


def gather_dispatch(
    x: jax.Array,
    experts: jax.Array,
    weights: jax.Array,
    apply_local: LocalExperts,
    ep: tuple[str, ...],
    gather: tuple[str, ...],
    experts_per_device: int,
) -> jax.Array:
    """One device's share of the all-gather dispatch (under shard_map): x [b, t, D], experts and
    weights [b, t, K] its token shard. The expert group gathers its token shards over `gather`,
    each device adds its own experts' outputs, and the partial outputs are summed over `ep` and
    split back into the token shards: psum_scatter over `gather`, psum over the rest of `ep`."""
    b, t, d = x.shape
    flat = [a.reshape(b * t, -1) for a in (x, experts, weights)]
    if gather:
        flat = [jax.lax.all_gather(a, gather, axis=0, tiled=True) for a in flat]
    rest = tuple(a for a in ep if a not in gather)
    if rest:
        # Whole on those devices: marked as varying, so each device's gradient (its experts'
        # share) is summed over them; the index gather below would not mark x so itself.
        flat = [jax.lax.pcast(a, rest, to="varying") for a in flat]
    x, experts, weights = flat
    first = jax.lax.axis_index(ep) * experts_per_device  # this device's first expert
    ys = apply_local(x, experts - first)
    y = jnp.sum(ys * weights[..., None], axis=1)  # [gathered tokens, D]
    if rest:
        y = jax.lax.psum(y, rest)
    if gather:
        y = jax.lax.psum_scatter(y, gather, scatter_dimension=0, tiled=True)
    return y.reshape(b, t, d)


def all_to_all_dispatch(
    x: jax.Array,
    experts: jax.Array,
    weights: jax.Array,
    apply_local: LocalExperts,
    ep: tuple[str, ...],
    experts_per_device: int,
    emulate: bool,
) -> jax.Array:
    """One device's share of the all-to-all dispatch (under shard_map; tokens split over every
    axis of `ep`): its assignments sorted by expert go to their experts' devices, come back as
    outputs, and are summed per token with the routing weights."""
    b, t, d = x.shape
    k = experts.shape[-1]
    n, rows = b * t, b * t * k
    group = jax.lax.axis_size(ep)
    flat = experts.reshape(rows)
    order = jnp.argsort(flat, stable=True)  # by expert, so by destination device
    sorted_experts = jnp.take(flat, order)
    destination = sorted_experts // experts_per_device
    send = jnp.bincount(destination, length=group).astype(jnp.int32)
    there, back = _exchange_plans(send, ep)
    capacity = group * rows  # dropless: every assignment of the group may pick this device
    local = (sorted_experts - destination * experts_per_device)[:, None]
    # Rows past what arrives keep the index experts_per_device: no local expert, zero output.
    unused = jnp.full((capacity, 1), experts_per_device, local.dtype)
    received_local = _ragged_all_to_all(local, unused, *there, ep, emulate)
    sent = jnp.take(x.reshape(n, d), order // k, axis=0)  # [rows, D], grouped by expert
    received = _exchange(sent, there, back, capacity, ep, emulate)
    outputs = apply_local(received, received_local)[:, 0]  # [capacity, D]
    returned = _exchange(outputs, back, there, rows, ep, emulate)
    per_choice = jnp.take(returned, jnp.argsort(order), axis=0).reshape(n, k, d)
    y = jnp.sum(per_choice * weights.reshape(n, k, 1), axis=1)
    return y.reshape(b, t, d)


def _exchange_plans(send: jax.Array, ep: tuple[str, ...]) -> tuple[tuple, tuple]:
    """(there, back): ragged_all_to_all's (input_offsets, send_sizes, output_offsets,
    recv_sizes) for sending this device's rows, `send[j]` of them to device j, and for returning
    the same rows to where they came from.

    sizes[i, j] is what device i sends to device j. Rows from device i land in device j's buffer
    after those of every device before i: at column j of the exclusive cumsum down the senders;
    device i's rows for j start at row i, column j of the exclusive cumsum along its row."""
    sizes = jax.lax.all_gather(send, ep)  # [sender, receiver]
    me = jax.lax.axis_index(ep)
    lands_at = jnp.cumsum(sizes, axis=0) - sizes  # [i, j]: where i's rows start in j's buffer
    starts_at = jnp.cumsum(sizes, axis=1) - sizes  # [i, j]: where i's rows for j start in i's
    there = (starts_at[me], send, lands_at[me], sizes[:, me])
    back = (lands_at[:, me], sizes[:, me], starts_at[:, me], send)
    return there, back


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _exchange(
    rows: jax.Array,
    plan: tuple,
    reverse: tuple,
    out_rows: int,
    ep: tuple[str, ...],
    emulate: bool,
) -> jax.Array:
    """`rows` sent by `plan` into a zero buffer of `out_rows` rows; differentiable: the
    cotangent of each received row is sent back by `reverse` to the row it came from (the
    plans cover every sent row, so this is the exact transpose)."""
    out = jnp.zeros((out_rows, *rows.shape[1:]), rows.dtype)
    return _ragged_all_to_all(rows, out, *plan, ep, emulate)


def _exchange_fwd(rows, plan, reverse, out_rows, ep, emulate):
    return _exchange(rows, plan, reverse, out_rows, ep, emulate), (rows.shape[0], plan, reverse)


def _exchange_bwd(out_rows, ep, emulate, residual, cotangent):
    del out_rows
    in_rows, plan, reverse = residual
    del plan  # the plans are integer offsets: no cotangent
    back = jnp.zeros((in_rows, *cotangent.shape[1:]), cotangent.dtype)
    return _ragged_all_to_all(cotangent, back, *reverse, ep, emulate), None, None


_exchange.defvjp(_exchange_fwd, _exchange_bwd)


def _ragged_all_to_all(
    operand: jax.Array,
    output: jax.Array,
    input_offsets: jax.Array,
    send_sizes: jax.Array,
    output_offsets: jax.Array,
    recv_sizes: jax.Array,
    ep: tuple[str, ...],
    emulate: bool,
) -> jax.Array:
    """jax.lax.ragged_all_to_all over `ep`, emulated where `emulate` (devices of the CPU, which
    cannot run it)."""
    if emulate:
        return _emulated_ragged_all_to_all(
            operand, output, input_offsets, send_sizes, output_offsets, ep
        )
    return jax.lax.ragged_all_to_all(
        operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis_name=ep
    )


def _emulated_ragged_all_to_all(
    operand: jax.Array,
    output: jax.Array,
    input_offsets: jax.Array,
    send_sizes: jax.Array,
    output_offsets: jax.Array,
    ep: tuple[str, ...],
) -> jax.Array:
    """What ragged_all_to_all returns, computed from all-gathers: row r of this device's output
    is row input_offsets[i][me] + (r - output_offsets[i][me]) of device i's operand when r falls
    in the span device i sends here, else output[r] unchanged."""
    operands = jax.lax.all_gather(operand, ep)  # [G, rows, ...]
    starts, sizes, lands = (
        jax.lax.all_gather(a, ep) for a in (input_offsets, send_sizes, output_offsets)
    )
    me = jax.lax.axis_index(ep)
    start, size, land = starts[:, me], sizes[:, me], lands[:, me]  # [G]: each sender's span here
    r = jnp.arange(output.shape[0])
    inside = (r >= land[:, None]) & (r < (land + size)[:, None])  # [G, out rows]
    sender = jnp.argmax(inside, axis=0)
    source = jnp.clip(start[sender] + r - land[sender], 0, operand.shape[0] - 1)
    picked = operands[sender, source]
    keep = jnp.any(inside, axis=0).reshape(-1, *(1,) * (output.ndim - 1))
    return jnp.where(keep, picked, output)


def on_token_shards(
    fn: Any,
    c: Any,
    shape: tuple[int, ...],
    tokens_in: int,
    kernels_in: int = 0,
    outs: int = 1,
    kernel_spec: PartitionSpec | None = None,
    replicated_in: int = 0,
) -> Any:
    """`fn` run per device under shard_map when MoeConfig `c`'s mesh has several devices (else
    `fn` itself): its first `tokens_in` arguments and its outputs [B, T, ...] split as the batch
    and seq rules split activations, the next `kernels_in` (the expert weights, their adapters) by
    `kernel_spec`: whole on every device when None, their expert dimension split under expert
    parallelism; the last `replicated_in` (a dropout key) the same on every device.

    Why: routing is per token, so each device can pick and group its own tokens' experts. Left to
    XLA, top_k and the global argsort gather every token onto every device, which then runs every
    token through the experts. Whole weights are gathered per layer like the dense MLP's under
    FSDP; their gradients are summed over the token shards.
    """
    if c.mesh is None or c.mesh.size == 1:
        return fn
    tokens = logical_to_spec(("batch", "seq", None), shape, c.mesh, c.mesh_rules)
    in_specs = (tokens,) * tokens_in + (kernel_spec or PartitionSpec(),) * kernels_in
    in_specs += (PartitionSpec(),) * replicated_in
    out_specs = tokens if outs == 1 else (tokens,) * outs
    # On TPU the grouped matmuls are Pallas kernels, whose outputs carry no varying-axes types.
    check_vma = c.platform != "tpu"
    return jax.shard_map(
        fn, mesh=c.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma
    )
