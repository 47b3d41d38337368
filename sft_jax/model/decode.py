"""Batched generation with a KV cache: greedy, or sampled with temperature and top-p. Used by
the `generate` command, `sft_jax.load(...).generate` and the evaluator.

How a batch is laid out, and why:
- Prompts are right-aligned in a [rows, P] buffer (P = longest prompt rounded up to a multiple of
  16) so every row writes its next token into the same cache slot: one dynamic_update_slice per
  step for the whole batch. Row b's real tokens start at slot starts[b]; its RoPE positions count
  from there, and a query sees only slots in [starts[b], its own slot], so each row's logits
  equal those of its prompt run alone.
- The cache holds P + N slots (N = max_new_tokens rounded up to 16) and short batches are padded
  to `rows` with filler rows that start out finished, so repeated calls reuse a few programs.
- Prefill runs the prompt buffer through `Transformer.decode` once; then a `lax.while_loop`
  inside the same jitted function feeds one token per step (no host round trip per token) and
  stops once every row has produced a stop id or ended with a stop sequence (a multi-token
  end of turn, matched against a rolling window of the last tokens). Output is cut before the
  first stop id or stop sequence; `cut_at_stop_text` then cuts decoded text at a stop text, which
  also catches a delimiter the model spelled with other tokens than the stop sequence.
- Sampling: temperature 0 is greedy (argmax); otherwise logits / temperature restricted to the
  smallest set of tokens whose probability reaches top_p (the top token always stays), drawn
  with `fold_in(rng, step)`, so a seed gives the same text every time.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.model.decoder import Transformer, init_cache

_LENGTH_BUCKET = 16
_STOP_BUCKET = 4  # stop ids are padded with -1 (never a token) to a multiple of this


def generate(
    model: Transformer,
    params: Any,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int | None],
    stop_sequences: Sequence[Sequence[int]] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
    batch_size: int = 16,
    prefix: dict | None = None,
) -> list[list[int]]:
    """Continuation of each prompt: only the new ids, cut before the first stop id or sequence.

    `params` is the unboxed parameter tree (possibly sharded). `stop_ids` may be empty (always
    generate `max_new_tokens`); None entries (a tokenizer without EOS) are ignored.
    `stop_sequences` are multi-token stops (an end of turn the tokenizer splits). `rng` seeds
    sampling (default key 0); it is unused when temperature is 0. `prefix`: a prefix-tuning
    tree (sft_jax/model/prefix.py; prompt tuning's after `with_prompt_prefix`) passed as the
    "lora" collection, its K/V attended to before every row's cache.
    """
    if max_new_tokens < 0 or batch_size < 1 or temperature < 0 or not 0 <= top_p <= 1:
        raise ValueError(
            "need max_new_tokens >= 0, batch_size >= 1, temperature >= 0 and 0 <= top_p <= 1; "
            f"got {max_new_tokens}, {batch_size}, {temperature}, {top_p}"
        )
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS) to condition on")
    if not prompts or max_new_tokens == 0:
        return [[] for _ in prompts]
    stops = tuple(int(s) for s in stop_ids if s is not None)
    stops += tuple(int(q[0]) for q in stop_sequences if len(q) == 1)
    sequences = tuple(tuple(int(t) for t in q) for q in stop_sequences if len(q) > 1)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    rows = min(batch_size, len(prompts))
    variables = {"params": params} if prefix is None else {"params": params, "lora": prefix}
    outputs: list[list[int]] = []
    for chunk_index, start in enumerate(range(0, len(prompts), rows)):
        chunk = prompts[start : start + rows]
        sampling = (temperature, top_p, jax.random.fold_in(rng, chunk_index))
        outputs.extend(
            _generate_chunk(
                model, variables, chunk, rows, max_new_tokens, (stops, sequences), sampling
            )
        )
    return outputs


def greedy_generate(
    model: Transformer,
    params: Any,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int | None],
    stop_sequences: Sequence[Sequence[int]] = (),
    batch_size: int = 16,
) -> list[list[int]]:
    """Greedy `generate` (the held-out evaluation's decoder)."""
    return generate(
        model,
        params,
        prompts,
        max_new_tokens=max_new_tokens,
        stop_ids=stop_ids,
        stop_sequences=stop_sequences,
        batch_size=batch_size,
    )


def cut_at_stop_text(text: str, stop_texts: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop text (an end-of-turn delimiter the model may
    have written in other tokens than the stop ids), so a delimiter never shows in an answer."""
    cut = min((i for i in (text.find(s) for s in stop_texts if s) if i >= 0), default=len(text))
    return text[:cut]


def _bucket(n: int, size: int) -> int:
    return -(-n // size) * size


def _generate_chunk(
    model: Transformer,
    variables: Any,
    prompts: list[list[int]],
    rows: int,
    max_new_tokens: int,
    stopping: tuple[tuple[int, ...], tuple[tuple[int, ...], ...]],
    sampling: tuple[float, float, jax.Array],
) -> list[list[int]]:
    """Generates for up to `rows` prompts; filler rows (one dummy token) start out finished."""
    stops, sequences = stopping
    length = _bucket(max(len(p) for p in prompts), _LENGTH_BUCKET)
    tokens = np.zeros((rows, length), np.int32)
    starts = np.full((rows,), length - 1, np.int32)
    for r, prompt in enumerate(prompts):
        tokens[r, length - len(prompt) :] = prompt
        starts[r] = length - len(prompt)
    done = np.arange(rows) >= len(prompts)
    stop_ids = np.full((_bucket(max(len(stops), 1), _STOP_BUCKET),), -1, np.int32)
    stop_ids[: len(stops)] = stops
    # Sequences right-aligned in [S, L]; -1 pads the left (matches anything), -2 fills unused
    # rows (never matches a token); shapes are bucketed so a few programs serve every call.
    width = _bucket(max([len(q) for q in sequences] + [1]), _STOP_BUCKET)
    stop_seqs = np.full((_bucket(max(len(sequences), 1), _STOP_BUCKET), width), -2, np.int32)
    for i, q in enumerate(sequences):
        stop_seqs[i] = -1
        stop_seqs[i, width - len(q) :] = q
    temperature, top_p, key = sampling
    out = _decode(
        model,
        variables,
        jnp.asarray(tokens),
        jnp.asarray(starts),
        jnp.asarray(done),
        jnp.zeros((rows, _bucket(max_new_tokens, _LENGTH_BUCKET)), jnp.int32),
        jnp.int32(max_new_tokens),
        (jnp.asarray(stop_ids), jnp.asarray(stop_seqs)),
        (jnp.float32(temperature), jnp.float32(top_p), key),
    )
    out = np.asarray(out)
    return [_cut(out[r, :max_new_tokens].tolist(), stopping) for r in range(len(prompts))]


def _cut(
    ids: list[int], stopping: tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]
) -> list[int]:
    """ids before the first stop id, or before the first complete stop sequence."""
    stops, sequences = stopping
    for i, token in enumerate(ids):
        if token in stops:
            return ids[:i]
        for q in sequences:
            if tuple(ids[max(0, i + 1 - len(q)) : i + 1]) == q:
                return ids[: i + 1 - len(q)]
    return ids


def sample_token(
    logits: jax.Array, temperature: jax.Array, top_p: jax.Array, key: jax.Array
) -> jax.Array:
    """int32 [B] next tokens from float32 logits [B, V]: argmax when temperature is 0, else a
    draw from the top-p nucleus of softmax(logits / temperature)."""
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    ordered = jnp.sort(scaled, axis=-1)[:, ::-1]  # descending
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass ranked above each token
    keep = (before < top_p).at[:, 0].set(True)
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    nucleus = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    sampled = jax.random.categorical(key, nucleus, axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


def _step_logits(module: Transformer, tokens, positions, starts, cache, index):
    """Logits [B, V] at the last of `tokens`' slots, and the updated cache."""
    hidden, cache = module.decode(tokens, positions, starts, cache, index)
    return module.logits(hidden[:, -1:])[:, 0], cache


@functools.partial(jax.jit, static_argnums=0)
def _decode(
    model: Transformer,
    variables: Any,
    tokens: jax.Array,
    starts: jax.Array,
    done: jax.Array,
    out: jax.Array,
    max_new_tokens: jax.Array,
    stopping: tuple[jax.Array, jax.Array],
    sampling: tuple[jax.Array, jax.Array, jax.Array],
) -> jax.Array:
    """tokens int32 [B, P] (prompts right-aligned), starts [B], done bool [B], out [B, N] ->
    out filled with up to max_new_tokens new ids per row (finished rows keep writing; the host
    cuts at the first stop). stopping: stop ids [S], stop sequences [Q, L] (see _generate_chunk).
    """
    rows, length = tokens.shape
    temperature, top_p, key = sampling
    stop_ids, stop_seqs = stopping

    def stopped(tail: jax.Array, new: jax.Array) -> jax.Array:
        """bool [B]: the new token is a stop id, or the last L tokens end a stop sequence."""
        hit = jnp.any(new[:, None] == stop_ids[None, :], axis=-1)
        match = (tail[:, None, :] == stop_seqs[None]) | (stop_seqs[None] == -1)  # [B, Q, L]
        return hit | jnp.any(jnp.all(match, axis=-1), axis=-1)

    apply = functools.partial(model.apply, variables, method=_step_logits)
    cache = init_cache(model.config, rows, length + out.shape[1])
    positions = jnp.maximum(jnp.arange(length)[None, :] - starts[:, None], 0)
    logits, cache = apply(tokens, positions, starts, cache, jnp.int32(0))
    first = sample_token(logits, temperature, top_p, jax.random.fold_in(key, 0))
    out = out.at[:, 0].set(first)
    tail = jnp.full((rows, stop_seqs.shape[1]), -3, jnp.int32).at[:, -1].set(first)
    done = done | stopped(tail, first)

    def cond(state: tuple) -> jax.Array:
        step, _, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state: tuple) -> tuple:
        step, out, cache, done, tail = state  # out[:, step - 1] is the token to feed
        slot = length + step - 1
        previous = jax.lax.dynamic_slice_in_dim(out, step - 1, 1, axis=1)  # [B, 1]
        logits, cache = apply(previous, (slot - starts)[:, None], starts, cache, slot)
        next_ids = sample_token(logits, temperature, top_p, jax.random.fold_in(key, step))
        out = jax.lax.dynamic_update_slice_in_dim(out, next_ids[:, None], step, axis=1)
        tail = jnp.concatenate([tail[:, 1:], next_ids[:, None]], axis=1)
        done = done | stopped(tail, next_ids)
        return step + 1, out, cache, done, tail

    state = (jnp.int32(1), out, cache, done, tail)
    _, out, _, _, _ = jax.lax.while_loop(cond, body, state)
    return out
