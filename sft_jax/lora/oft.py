"""OFT (orthogonal fine-tuning) as PEFT implements it: the math, on arrays only.

OFT freezes W and learns an orthogonal rotation of its input: y = (x R) W with R block diagonal,
one b x b block per b input features (b = `oft_block_size`; PEFT's `r` = in / b blocks). Each
block is the Cayley transform of a skew-symmetric S built from a stored vector of its strictly
upper-triangular entries (b (b - 1) / 2 numbers, PEFT's `oft_R.weight` [r, n] per module):

    exact Cayley:   R = (I - S)(I + S)^-1                       (use_cayley_neumann False)
    Neumann series: R = I + 2S + 2S^2 + ... + 2S^(k-2) + S^(k-1) (PEFT's default, k = 5 terms)

(PEFT's Neumann form approximates (I + S)(I - S)^-1, the transpose of its exact form; both are
reproduced as written.) The vector starts at zero, so R = I and the model equals the base at
init. `block_share` stores one block for all ([1, n]); COFT (`coft`) first projects S onto the
Frobenius ball of radius eps / sqrt(blocks) (PEFT rewrites the stored weight with the projection
at every forward; here the projection is applied in the forward with a straight-through
gradient, so the function is PEFT's and only the stored value differs until export, which
writes the projected vector).

BOFT (`lora.method` "boft", PEFT's butterfly OFT): the input is rotated by M = B_{F-1} ... B_0,
F = boft_n_butterfly_factor factors, each B_i = P_i blockdiag(R_i) P_i^T with PEFT's butterfly
permutation P_i (`butterfly_perms`; the identity for F = 1) and blocks R_i the exact Cayley
transform of 0.5 (A - A^T) of stored full b x b matrices A (`boft_R` [F, blocks, b, b]); the
output is then scaled per output feature by a trained `boft_s` [out, 1] (ones at init). That skew
matrix is exactly an OFT vector's (its upper triangle) under the exact Cayley transform, so BOFT
reuses the code above: its modules hold `oft_r` [L, F, blocks, n] and `boft_s` [L, *out]
(`SCALE`), and the spec is `BOFT_SPEC`. PEFT computes F > 1 only with its CUDA extension (a
batched block diagonal); without it (on CPU always) it warns and builds F = 1 whatever the config
says. PEFT requires the block size to divide each input (no adjustment): `boft_block`.

In the adapter tree an OFT module holds `oft_r` [L, blocks, n] (blocks = 1 when shared).
`rotations` turns each into `oft_rotation` [L, blocks, b, b] once per forward (outside the layer
scan); `sft_jax.model.layers.Einsum` rotates its input with it and `rotate_kernel` folds it into
the kernel for export (W' = blockdiag(R) W in our [in, out] layout, PEFT's merge).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PARAM = "oft_r"  # the stored (trained) vector of each OFT module in the adapter tree
ROTATION = "oft_rotation"  # its rotation blocks, made by `rotations` for the forward and merge
SCALE = "boft_s"  # BOFT's trained scale of each output feature [L, *out]


@dataclasses.dataclass(frozen=True)
class OftSpec:
    """How stored OFT vectors become rotations: `neumann_terms` 0 is the exact Cayley
    transform, else PEFT's Neumann series with that many terms; `coft_eps` None: no COFT."""

    neumann_terms: int = 5
    coft_eps: float | None = None


BOFT_SPEC = OftSpec(neumann_terms=0)  # BOFT's blocks: the exact Cayley transform, no COFT


def spec_of(cfg: Any) -> OftSpec | None:
    """The OftSpec of a LoRA config section (or a saved run's section as a dict); None unless
    its `method` is "oft" or "boft"."""
    get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    if get("method", "lora") == "boft":
        return BOFT_SPEC
    if get("method", "lora") != "oft":
        return None
    terms = get("oft_neumann_terms", 5) if get("oft_cayley_neumann", True) else 0
    return OftSpec(terms, get("oft_eps", 6e-5) if get("oft_coft", False) else None)


def block_size(n_elements: int) -> int:
    """b from a stored vector's length n = b (b - 1) / 2."""
    b = round((1 + math.sqrt(1 + 8 * n_elements)) / 2)
    if b * (b - 1) // 2 != n_elements:
        raise ValueError(f"an OFT vector of {n_elements} entries is no block's upper triangle")
    return b


def adjust_block_size(in_features: int, size: int) -> int:
    """PEFT's `adjust_oft_parameters`: the divisor of `in_features` nearest to `size` (the
    lower one on a tie), `in_features` itself when `size` exceeds it."""
    if size >= in_features:
        return in_features
    higher = size
    while higher <= in_features and in_features % higher:
        higher += 1
    lower = size
    while lower > 1 and in_features % lower:
        lower -= 1
    return lower if size - lower <= higher - size else higher


def boft_block(in_features: int, size: int, num: int, factors: int = 1) -> int:
    """BOFT's block size for a module with `in_features` inputs: `size`, or in / `num` when
    the block count is given instead (exactly one of them is non-zero, as in PEFT); either must
    divide the input, which PEFT refuses to adjust, and with F > 1 butterfly factors the
    blocks must pair up F - 1 times (PEFT's checks, its messages)."""
    if (size == 0) == (num == 0):
        raise ValueError("BOFT needs exactly one of boft_block_size and boft_block_num non-zero")
    given, what = (size, "boft_block_size") if size else (num, "boft_block_num")
    if in_features % given:
        raise ValueError(
            f"{what} {given} does not divide a targeted module's {in_features} input features "
            "(PEFT's BOFT requires it to)"
        )
    b = size or in_features // num
    pairs = 2 ** (factors - 1)
    blocks = in_features // b
    if factors > 1 and (blocks % pairs or blocks % 2 or b % 2 or in_features < b * pairs):
        raise ValueError(
            f"boft_n_butterfly_factor {factors} does not fit a module of {in_features} input "
            f"features in {blocks} blocks of {b}: the block count must be a multiple of "
            f"{pairs} and even, the block size even"
        )
    return b


def butterfly_perm(n: int, blocks: int, half: int, butterfly: bool) -> np.ndarray:
    """PEFT's `block_butterfly_perm(n, blocks, half, ...)`: within each of `blocks` groups of n
    indices, the runs of `half` indices reordered even runs first, then odd ones; the identity
    without butterfly factors."""
    if not butterfly:
        return np.arange(n)
    if blocks * half * 2 > n:
        raise ValueError(f"BOFT: {blocks} blocks of {2 * half} exceed {n} input features")
    size = n // blocks
    runs = np.concatenate([np.arange(0, size / half, 2), np.arange(1, size / half, 2)])
    order = np.concatenate([np.arange(int(p * half), int(p * half + half)) for p in runs])
    return np.concatenate([start + order for start in range(0, n, size)])


def butterfly_perms(blocks: int, b: int, factors: int) -> np.ndarray:
    """[factors, blocks * b] PEFT's permutation of each butterfly factor i (its boft_P[i])."""
    n = blocks * b
    return np.stack(
        [butterfly_perm(n, blocks // 2**i, b // 2, factors > 1) for i in range(factors)]
    )


def init_vector(in_features: int, size: int, layers: tuple[int, ...], share: bool) -> jax.Array:
    """Zeros [*layers, blocks, n] for a module with `in_features` inputs (R = I at init); the
    block size is adjusted as PEFT adjusts it when it does not divide the input."""
    b = adjust_block_size(in_features, size)
    blocks = 1 if share else in_features // b
    return jnp.zeros((*layers, blocks, b * (b - 1) // 2), jnp.float32)


def skew(vec: jax.Array) -> jax.Array:
    """[..., n] upper-triangular entries -> [..., b, b] skew-symmetric S (row-major triu order,
    as torch.triu_indices)."""
    b = block_size(vec.shape[-1])
    rows, cols = jnp.triu_indices(b, 1)
    upper = jnp.zeros((*vec.shape[:-1], b, b), vec.dtype).at[..., rows, cols].set(vec)
    return upper - jnp.swapaxes(upper, -1, -2)


def project(vec: jax.Array, eps: float) -> jax.Array:
    """COFT: each block's S scaled onto the Frobenius ball of radius eps / sqrt(blocks) when
    outside it (PEFT's _project_batch; the blocks axis is the second to last)."""
    s = skew(vec)
    radius = eps / math.sqrt(vec.shape[-2])
    norm = jnp.sqrt(jnp.sum(s * s, axis=(-2, -1), keepdims=True))
    out = jnp.where(norm <= radius, s, radius * s / jnp.maximum(norm, 1e-30))
    b = s.shape[-1]
    rows, cols = jnp.triu_indices(b, 1)
    return out[..., rows, cols]


def cayley(vec: jax.Array, neumann_terms: int) -> jax.Array:
    """[..., n] -> rotation blocks [..., b, b] in float32 (see the module docstring)."""
    s = skew(vec.astype(jnp.float32))
    eye = jnp.broadcast_to(jnp.eye(s.shape[-1], dtype=s.dtype), s.shape)
    if neumann_terms == 0:  # X (I + S) = I - S, solved as PEFT's solve(left=False)
        return jnp.swapaxes(
            jnp.linalg.solve(jnp.swapaxes(eye + s, -1, -2), jnp.swapaxes(eye - s, -1, -2)),
            -1,
            -2,
        )
    r = eye
    if neumann_terms > 1:
        r = r + 2.0 * s
    if neumann_terms > 2:  # the series exactly as PEFT sums it
        power = s @ s
        r = r + 2.0 * power
        for _ in range(3, neumann_terms - 1):
            power = power @ s
            r = r + 2.0 * power
        r = r + power @ s
    return r


def rotation(vec: jax.Array, spec: OftSpec) -> jax.Array:
    """The rotation blocks of one stored vector [..., blocks, n] (COFT-projected first, with a
    straight-through gradient)."""
    if spec.coft_eps is not None:
        vec = vec + jax.lax.stop_gradient(project(vec, spec.coft_eps) - vec)
    return cayley(vec, spec.neumann_terms)


def rotations(adapters: dict, spec: OftSpec | None) -> dict:
    """`adapters` with every `oft_r` replaced by its `oft_rotation` blocks (no-op on a tree
    without OFT modules). Refuses OFT modules without a spec: their rotation depends on it."""

    def visit(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        if PARAM in node:
            if spec is None:
                raise ValueError("OFT adapters need their OftSpec (lora.method 'oft' settings)")
            rest = {k: v for k, v in node.items() if k != PARAM}
            return {**rest, ROTATION: rotation(node[PARAM], spec)}
        return {k: visit(v) for k, v in node.items()}

    return visit(adapters)


def projected(adapters: dict, spec: OftSpec | None) -> dict:
    """`adapters` with every COFT vector projected as the forward sees it (what PEFT would have
    stored): for export. No-op without COFT."""
    if spec is None or spec.coft_eps is None:
        return adapters

    def visit(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        return {k: project(v, spec.coft_eps) if k == PARAM else visit(v) for k, v in node.items()}

    return visit(adapters)


def rotate_input(x: jax.Array, rot: jax.Array, n_in: int) -> jax.Array:
    """x [..., *in] (n_in trailing input dims) times blockdiag(rot) in float32, back in x's
    dtype; rot [blocks or 1, b, b] (one shared block repeats over the input)."""
    shape = x.shape
    b = rot.shape[-1]
    flat = x.reshape(*shape[: len(shape) - n_in], -1, b).astype(jnp.float32)
    rot = jnp.broadcast_to(rot.astype(jnp.float32), (flat.shape[-2], b, b))
    return jnp.einsum("...rk,rkc->...rc", flat, rot).reshape(shape).astype(x.dtype)


def butterfly_input(x: jax.Array, rot: jax.Array, n_in: int) -> jax.Array:
    """x [..., *in] times BOFT's M (see the module docstring), rot [F, blocks, b, b]: per factor
    from the last, x P_i = x[inverse of P_i's perm], the blocks, then P_i^T = x[perm]."""
    factors, blocks, b = rot.shape[0], rot.shape[1], rot.shape[-1]
    shape = x.shape
    flat = x.reshape(*shape[: len(shape) - n_in], blocks * b)
    perms = butterfly_perms(blocks, b, factors)
    for i in reversed(range(factors)):
        if factors > 1:
            flat = flat[..., np.argsort(perms[i])]
        flat = rotate_input(flat, rot[i], 1)
        if factors > 1:
            flat = flat[..., perms[i]]
    return flat.reshape(shape)


def butterfly_kernel(kernel: jax.Array, rot: jax.Array, n_in: int) -> jax.Array:
    """M @ W for a stacked kernel [L, *in, *out] and rot [L, F, blocks, b, b] in float32, the
    merged kernel whose plain forward equals `butterfly_input`'s: per factor from the first,
    P_i^T W = W[inverse perm], the blocks, then P_i = rows[perm]."""
    layers, factors, blocks, b = rot.shape[:3] + rot.shape[-1:]
    w = kernel.astype(jnp.float32).reshape(layers, blocks * b, -1)
    perms = butterfly_perms(blocks, b, factors)
    for i in range(factors):
        if factors > 1:
            w = w[:, np.argsort(perms[i])]
        w = rotate_kernel(w, rot[:, i], 1)
        if factors > 1:
            w = w[:, perms[i]]
    return w.reshape(kernel.shape)


def scale_kernel(kernel: jax.Array, scale: jax.Array, n_in: int) -> jax.Array:
    """BOFT's merge of its output scale: each output feature's column of a stacked kernel
    [L, *in, *out] times scale [L, *out] (float32)."""
    shape = (scale.shape[0], *(1,) * n_in, *scale.shape[1:])
    return kernel.astype(jnp.float32) * scale.astype(jnp.float32).reshape(shape)


def rotate_kernel(kernel: jax.Array, rot: jax.Array, n_in: int) -> jax.Array:
    """blockdiag(R) @ W for a stacked kernel [L, *in, *out] and rot [L, blocks or 1, b, b], in
    float32: the merged kernel whose plain forward equals the rotated-input forward."""
    layers, b = kernel.shape[0], rot.shape[-1]
    w = kernel.astype(jnp.float32).reshape(layers, -1, b, math.prod(kernel.shape[1 + n_in :]))
    rot = jnp.broadcast_to(rot.astype(jnp.float32), (layers, w.shape[1], b, b))
    return jnp.einsum("lrkc,lrco->lrko", rot, w).reshape(kernel.shape)
