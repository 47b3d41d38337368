"""Held-out evaluation: masked loss over the eval split, and answers scored by greedy generation.

The loss is summed and counted over the whole split, then divided once (per loss token), exactly
as in training. Generation scores a held-out prompt by comparing the greedy continuation (cut at
EOS) with the reference completion: "exact" after stripping surrounding whitespace, or "contains".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from sft_jax import lora
from sft_jax.config import Config
from sft_jax.data import DataBundle, EvalPrompt
from sft_jax.generate import greedy_generate
from sft_jax.loss import masked_cross_entropy
from sft_jax.model import Transformer
from sft_jax.state import param_shardings
from sft_jax.step import BATCH_KEYS, TrainState


def make_eval_step(apply_fn: Callable, param_shardings: Any, batch_sharding: NamedSharding):
    """Jitted (params, batch) -> (loss sum, loss tokens)."""

    def eval_step(params: Any, batch: dict) -> tuple[jax.Array, jax.Array]:
        logits = apply_fn(
            {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"]
        )
        return masked_cross_entropy(logits, batch["targets"], batch["loss_mask"])

    return jax.jit(
        eval_step, in_shardings=(param_shardings, {k: batch_sharding for k in BATCH_KEYS})
    )


def evaluate_loss(
    eval_step: Callable, params: Any, batches: Sequence[dict], place: Callable[[dict], dict]
) -> dict[str, float]:
    """eval_loss (per loss token over the whole split), eval_perplexity and eval_tokens."""
    total, count = 0.0, 0.0
    for batch in batches:
        loss_sum, tokens = eval_step(params, place(batch))
        total += float(loss_sum)
        count += float(tokens)
    loss = total / max(count, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": count}


def answer_matches(generated: str, reference: str, match: str) -> bool:
    """Whether a generation counts as correct under the configured match rule."""
    if match == "exact":
        return generated.strip() == reference.strip()
    if match == "contains":
        return reference.strip() in generated
    raise ValueError(f"unknown match rule {match!r}")


def generation_accuracy(
    model: Transformer,
    params: Any,
    tokenizer: Any,
    prompts: Sequence[EvalPrompt],
    *,
    max_new_tokens: int,
    match: str,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Greedy-generates an answer per held-out prompt and scores it against the reference.

    The prompts come ready-tokenised from the data package (`DataBundle.eval_prompts`): for chat
    data the conversation up to the last answer with the template's generation prompt, for
    prompt/completion exactly the training prefix, so evaluation sees what training saw.
    """
    outputs = greedy_generate(
        model,
        params,
        [p.prompt_ids for p in prompts],
        max_new_tokens=max_new_tokens,
        stop_ids=[tokenizer.eos_token_id],
        batch_size=batch_size,
    )
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in outputs]
    correct = [answer_matches(t, p.reference, match) for t, p in zip(texts, prompts, strict=True)]
    samples = [
        {
            "prompt": tokenizer.decode(p.prompt_ids, skip_special_tokens=True),
            "reference": p.reference,
            "output": text,
            "source": p.source,
        }
        for p, text in zip(prompts[:5], texts[:5], strict=False)
    ]
    return {
        "accuracy": float(np.mean(correct)) if correct else 0.0,
        "n": len(prompts),
        "samples": samples,
    }


# ------------------------------------------------------------------ during and after training


def make_inference_params(
    config: Config, model: Transformer, mesh: jax.sharding.Mesh
) -> tuple[Callable[[TrainState], Any], Any]:
    """(state -> parameters for evaluation and generation, their shardings).

    Full fine-tuning: `state.params`. LoRA: the frozen base (dequantised) with the adapters
    merged in, jitted into the base's shardings, so evaluation and generation run the plain
    model; the merged tree is in `lora.base_dtype` and lives only while it is used.
    """
    _, shardings = param_shardings(model, mesh, config.mesh.rules)
    if not config.lora.enabled:
        return (lambda state: state.params), shardings
    c = config.lora
    scale = lora.lora_scale(c.alpha, c.rank, c.rslora)
    merge = jax.jit(
        lambda frozen, adapters: lora.merge(lora.dequantize(frozen), adapters, scale),
        out_shardings=shardings,
    )
    return (lambda state: merge(state.frozen, state.params)), shardings


def run_generation_eval(
    config: Config, model: Transformer, params: Any, bundle: DataBundle
) -> dict[str, Any] | None:
    n = min(config.eval.generate_examples, len(bundle.eval_prompts))
    if n == 0:
        return None
    return generation_accuracy(
        model,
        params,
        bundle.tokenizer,
        bundle.eval_prompts[:n],
        max_new_tokens=config.eval.max_new_tokens,
        match=config.eval.match,
    )
