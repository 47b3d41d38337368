"""Batched greedy generation, used to score held-out prompts before and after training.

There is no KV cache yet: every new token costs one full forward over a fixed-size buffer. Why the
buffer looks the way it does:
- Prompts are left-aligned in a [rows, length] buffer with `length` = longest prompt +
  max_new_tokens rounded up to a multiple of 16, and short batches are padded to `rows`, so
  repeated evaluations reuse a handful of compiled programs (stop ids are padded likewise).
- Positions are the slot index (left-aligned rows start at 0) and segment_ids are 1 on real tokens,
  0 on unused slots: a real token never attends to an unused slot, so each row's logits equal
  those of the prompt run alone. Each step reads each row's logits at its own last token.
- The token loop is a `lax.while_loop` inside one jitted function (one full forward per new
  token, no host round trip per token); it stops early once every row has produced a stop id.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.model import Transformer

_LENGTH_BUCKET = 16
_STOP_BUCKET = 4  # stop ids are padded with -1 (never a token) to a multiple of this


def greedy_generate(
    model: Transformer,
    params: Any,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    batch_size: int = 16,
) -> list[list[int]]:
    """Greedy continuation of each prompt: only the new ids, cut before the first stop id.

    `params` is the unboxed parameter tree (possibly sharded). `stop_ids` may be empty (always
    generate `max_new_tokens`); None entries (a tokenizer without EOS) are ignored.
    """
    if max_new_tokens < 0 or batch_size < 1:
        raise ValueError(
            f"need max_new_tokens >= 0 and batch_size >= 1, got {max_new_tokens}, {batch_size}"
        )
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS) to condition on")
    if not prompts or max_new_tokens == 0:
        return [[] for _ in prompts]
    stops = tuple(int(s) for s in stop_ids if s is not None)
    rows = min(batch_size, len(prompts))
    outputs: list[list[int]] = []
    for start in range(0, len(prompts), rows):
        chunk = prompts[start : start + rows]
        outputs.extend(_generate_chunk(model, params, chunk, rows, max_new_tokens, stops))
    return outputs


def _generate_chunk(
    model: Transformer,
    params: Any,
    prompts: list[list[int]],
    rows: int,
    max_new_tokens: int,
    stops: tuple[int, ...],
) -> list[list[int]]:
    """Generates for up to `rows` prompts; filler rows (one dummy token) start out finished."""
    longest = max(len(p) for p in prompts)
    length = -(-(longest + max_new_tokens) // _LENGTH_BUCKET) * _LENGTH_BUCKET
    tokens = np.zeros((rows, length), np.int32)
    lengths = np.ones((rows,), np.int32)
    for r, prompt in enumerate(prompts):
        tokens[r, : len(prompt)] = prompt
        lengths[r] = len(prompt)
    done = np.arange(rows) >= len(prompts)
    stop_ids = np.full((-(-max(len(stops), 1) // _STOP_BUCKET) * _STOP_BUCKET,), -1, np.int32)
    stop_ids[: len(stops)] = stops
    out = _decode(
        model,
        params,
        jnp.asarray(tokens),
        jnp.asarray(lengths),
        jnp.asarray(done),
        jnp.int32(max_new_tokens),
        jnp.asarray(stop_ids),
    )
    out = np.asarray(out)
    return [
        _cut(out[r, len(p) : len(p) + max_new_tokens].tolist(), stops)
        for r, p in enumerate(prompts)
    ]


def _cut(ids: list[int], stops: tuple[int, ...]) -> list[int]:
    for i, token in enumerate(ids):
        if token in stops:
            return ids[:i]
    return ids


def _last_logits(
    module: Transformer, tokens: jax.Array, segment_ids: jax.Array, last: jax.Array
) -> jax.Array:
    """float32 [B, V] logits at each row's index `last`, without materialising [B, T, V]."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    hidden = module(tokens, positions, segment_ids, return_hidden=True)  # [B, T, D]
    hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)  # [B, 1, D]
    return module.logits(hidden)[:, 0]


@functools.partial(jax.jit, static_argnums=0)
def _decode(
    model: Transformer,
    params: Any,
    tokens: jax.Array,
    lengths: jax.Array,
    done: jax.Array,
    max_new_tokens: jax.Array,
    stop_ids: jax.Array,
) -> jax.Array:
    """tokens int32 [B, T] (prompts left-aligned), lengths [B], done bool [B] -> filled tokens.

    Every row writes one token per step at its own length; rows that are done keep writing
    (harmless, cut on the host), which keeps the loop body free of per-row control flow.
    """
    rows, length = tokens.shape
    slots = jnp.arange(length, dtype=jnp.int32)

    def cond(state: tuple) -> jax.Array:
        step, _, _, done = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state: tuple) -> tuple:
        step, tokens, lengths, done = state
        segment_ids = (slots[None, :] < lengths[:, None]).astype(jnp.int32)
        logits = model.apply(
            {"params": params}, tokens, segment_ids, lengths - 1, method=_last_logits
        )
        next_ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B]
        tokens = tokens.at[jnp.arange(rows), lengths].set(next_ids)
        done = done | jnp.any(next_ids[:, None] == stop_ids[None, :], axis=-1)
        return step + 1, tokens, lengths + 1, done

    _, tokens, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), tokens, lengths, done))
    return tokens
