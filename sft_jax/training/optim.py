"""Optimizer: global-norm clipping -> AdamW (no decay on norms, biases) with warmup + cosine.

Under LoRA the optimizer sees only the adapter tree: a and b are decayed like kernels, DoRA's
magnitudes m are not (they are per-unit scales, like norms), and LoRA+ multiplies B's updates by
`lora.lr_ratio_b` after AdamW, so B's effective learning rate (weight decay included) is
ratio x lr while A keeps lr.

The learning rate ramps linearly to its peak over the warmup steps (the first update already
uses a non-zero rate: step s < warmup gets peak * (s + 1) / warmup), then follows a cosine from
the peak down to `end_lr_ratio * peak` at the last step, the floor practitioners use for SFT.

`optim.state_dtype` = "bfloat16" stores Adam's two moments in bfloat16 (4 bytes per parameter
instead of 8); the update itself is computed in float32 from the upcast moments, so only the
stored moments are rounded.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sft_jax.config import LoraSection, OptimSection
from sft_jax.lora.tree import SAVED, saved_module_path


def schedule_steps(max_steps: int, epochs: float, steps_per_epoch: int) -> int:
    """The length of a run's schedule: `train.max_steps` when set, else `train.epochs` epochs."""
    if max_steps > 0:
        return max_steps
    return max(1, math.ceil(epochs * steps_per_epoch))


def schedule_change(cfg: OptimSection, planned: int | None, steps: int, step: int) -> str | None:
    """A warning when a run resumed at `step` now lasts `steps` although its checkpoint was
    planned for `planned` steps (train.max_steps or train.epochs changed, e.g. raised after the
    run finished), else None. The warmup and cosine are recomputed over the new length, so the
    rate jumps at the resumed step and the run equals neither the old nor a fresh one. Only
    warned, not refused: continuing a finished run for more steps is a legitimate choice."""
    if planned is None or planned == steps or step >= steps:
        return None
    old, new = (float(make_schedule(cfg, n)(step)) for n in (planned, steps))
    where = "after it finished" if step >= planned else f"at step {step} of {planned}"
    return (
        f"resuming {where} with {steps} steps instead of {planned}: the learning-rate "
        f"schedule is re-stretched over {steps} steps, so the rate at step {step + 1} becomes "
        f"{new:.3g} instead of {old:.3g} (warmup and cosine recomputed). Restore "
        "train.max_steps / train.epochs to keep the old schedule; for a fresh schedule, export "
        "this run and fine-tune the export in a new workdir"
    )


def warmup_steps(cfg: OptimSection, total_steps: int) -> int:
    """Explicit warmup_steps when >= 0, else warmup_ratio of the total (rounded up)."""
    if cfg.warmup_steps >= 0:
        return min(cfg.warmup_steps, total_steps)
    return min(math.ceil(cfg.warmup_ratio * total_steps), total_steps)


def make_schedule(cfg: OptimSection, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the (0-based) optimizer step."""
    peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.end_lr_ratio
    warmup = warmup_steps(cfg, total_steps)
    decay = max(total_steps - warmup - 1, 1)

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        ramp = peak * (step + 1.0) / max(warmup, 1)
        progress = jnp.clip((step - warmup) / decay, 0.0, 1.0)
        cosine = floor + 0.5 * (peak - floor) * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup, ramp, cosine)

    return schedule


_DECAYED = ("kernel", "embedding", "a", "b")


def decay_mask(params: dict) -> dict:
    """True for leaves that get weight decay: matrices (embeddings, kernels, LoRA's a and b), not
    norms, biases or DoRA magnitudes. A LoRA saved module (keyed by its HF name, e.g.
    "embed_tokens") decays like the leaf it copies, so LoRA and full fine-tuning agree."""

    def wants_decay(path: tuple, leaf: jax.Array) -> bool:
        keys = [str(getattr(k, "key", k)) for k in path]
        if SAVED in keys[:-1]:
            return saved_module_path(keys[-1])[-1] in _DECAYED
        return keys[-1] in _DECAYED

    return jax.tree_util.tree_map_with_path(wants_decay, params)


def lora_b_mask(params: dict) -> dict:
    """True for LoRA B leaves (the up-projections LoRA+ trains faster)."""
    is_b = lambda path, leaf: str(getattr(path[-1], "key", path[-1])) == "b"
    return jax.tree_util.tree_map_with_path(is_b, params)


def stored_as(dtype: str, inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` with its floating-point state kept in `dtype` between steps, whatever the
    parameters' dtype, and upcast to float32 for each update (integer counts untouched)."""

    def cast(tree: Any, to: Any) -> Any:
        floating = lambda x: hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)
        return jax.tree.map(lambda x: x.astype(to) if floating(x) else x, tree)

    def init(params: Any) -> Any:
        return cast(inner.init(params), jnp.dtype(dtype))

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        updates, state = inner.update(updates, cast(state, jnp.float32), params)
        return updates, cast(state, jnp.dtype(dtype))

    return optax.GradientTransformation(init, update)


def make_optimizer(
    cfg: OptimSection, total_steps: int, lora: LoraSection | None = None
) -> optax.GradientTransformation:
    """The chain clip -> AdamW (-> LoRA+ scaling of B's updates when `lora.lr_ratio_b` != 1);
    the schedule is evaluated on optax's own step count."""
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    adamw = optax.adamw(
        learning_rate=make_schedule(cfg, total_steps),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    parts.append(stored_as(cfg.state_dtype, adamw))
    if lora is not None and lora.enabled and lora.lr_ratio_b != 1.0:
        parts.append(optax.masked(optax.scale(lora.lr_ratio_b), lora_b_mask))
    return optax.chain(*parts)
