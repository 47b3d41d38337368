"""The pure pieces of evaluation: masked loss and token accuracy, generation metrics, general
text and the parameters evaluation runs on. They take everything as arguments and write nothing;
`eval_loop.Evaluator` holds what a training run passes them and records the results.

Loss and token accuracy: the jitted eval step returns (loss sum, loss tokens, correct tokens) per
batch; they are summed over the whole split and divided once, exactly as in training, so the
result does not depend on eval.batch_size or packing. A token is correct when the argmax of the
logits equals the target at a loss-mask position (teacher forcing, not generation).

Generation: each held-out prompt gets a greedy continuation (cut at EOS and at the chat template's
end of turn, `data.templates.generation_stops`; the delimiter never shows in the output), scored
against the reference completion by every metric named in `eval.match` (comma-separated):

* exact    -- output.strip() == reference.strip().
* contains -- reference.strip() occurs in the output (an empty reference is always contained).
* regex    -- `eval.answer_regex` extracts the answer from output and reference with `re.search`
              (the first match; its first capture group when the pattern has one, else the whole
              match, whitespace stripped) and the two strings must be equal. GSM8K:
              r"####\\s*(-?[\\d,.]+)" compares the numbers after "####" ("1,000" and "1000" differ).
              An output with no match is wrong. A reference with no match is taken whole
              (stripped) as the answer, so data whose completions are bare answers ("72") still
              work; such references are counted in `regex_unmatched_references` and logged.

General text (the forgetting check): `eval.general_text_files` are read as plain text (.txt:
documents separated by blank lines) or as any data format with a "text" field, every token in the
loss, chunked at data.seq_len, packed, and scored by the same eval step.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from sft_jax import data, paths
from sft_jax.config import Config
from sft_jax.data import EvalPrompt
from sft_jax.data.pack import PACKED_KEYS
from sft_jax.data.templates import Stops, generation_stops
from sft_jax.model.decode import cut_at_stop_text, greedy_generate
from sft_jax.model.decoder import Transformer
from sft_jax.training.loss import masked_cross_entropy
from sft_jax.training.sharding import context_shards
from sft_jax.training.state import TrainState, inference_merge, param_shardings
from sft_jax.training.step import context_order, context_slots

GENERATION_BATCH = 32  # prompts per generation call (rows of one compiled decode program)

# ----------------------------------------------------------------------------- loss and accuracy


def make_eval_step(apply_fn: Callable, param_shardings: Any, batch_sharding: NamedSharding):
    """Jitted (params, batch) -> (loss sum, loss tokens, correctly predicted loss tokens).
    Under context parallelism the rows are permuted as the train step permutes them (the sums
    do not change)."""
    context = context_shards(batch_sharding.mesh)

    def eval_step(params: Any, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
        batch = context_order(batch, context)
        slots = context_slots(batch["inputs"].shape[1], context)
        permuted = {} if slots is None else {"slots": slots}  # rows in slot order: no argument
        inputs = (batch["inputs"], batch["positions"], batch["segment_ids"])
        logits = apply_fn({"params": params}, *inputs, **permuted)
        loss_sum, tokens = masked_cross_entropy(logits, batch["targets"], batch["loss_mask"])
        hits = (jnp.argmax(logits, axis=-1) == batch["targets"]) & batch["loss_mask"].astype(bool)
        return loss_sum, tokens, jnp.sum(hits.astype(jnp.float32))

    return jax.jit(
        eval_step, in_shardings=(param_shardings, {k: batch_sharding for k in PACKED_KEYS})
    )


def evaluate_loss(
    eval_step: Callable,
    params: Any,
    batches: Sequence[dict],
    place: Callable[[dict], dict],
    prefix: str = "eval",
) -> dict[str, float]:
    """{prefix}_loss (per loss token over the whole split), {prefix}_perplexity,
    {prefix}_token_accuracy and {prefix}_tokens (the loss-token count)."""
    total, count, correct = 0.0, 0.0, 0.0
    for batch in batches:
        loss_sum, tokens, hits = jax.device_get(eval_step(params, place(batch)))
        total += float(loss_sum)
        count += float(tokens)
        correct += float(hits)
    loss = total / max(count, 1.0)
    return {
        f"{prefix}_loss": loss,
        f"{prefix}_perplexity": math.exp(min(loss, 50.0)),
        f"{prefix}_token_accuracy": correct / max(count, 1.0),
        f"{prefix}_tokens": count,
    }


# ----------------------------------------------------------------------------- generation metrics


def extract_answer(text: str, pattern: re.Pattern) -> str | None:
    """The first match's first capture group (the whole match if the pattern has no group),
    stripped; None when nothing matches."""
    found = pattern.search(text)
    if found is None:
        return None
    return (found.group(1) if pattern.groups else found.group(0)).strip()


def answer_matches(
    generated: str, reference: str, match: str, pattern: re.Pattern | None = None
) -> bool:
    """Whether a generation counts as correct under one match rule (see the module docstring)."""
    if match == "exact":
        return generated.strip() == reference.strip()
    if match == "contains":
        return reference.strip() in generated
    if match == "regex":
        if pattern is None:
            raise ValueError("the regex match needs a pattern (eval.answer_regex)")
        expected = extract_answer(reference, pattern)
        got = extract_answer(generated, pattern)
        return got is not None and got == (reference.strip() if expected is None else expected)
    raise ValueError(f"unknown match rule {match!r}")


def score_generations(
    outputs: Sequence[str],
    references: Sequence[str],
    matches: Sequence[str],
    pattern: re.Pattern | None = None,
) -> tuple[dict[str, float], list[bool]]:
    """({"generation_<match>": fraction correct, ...}, per-output correctness under matches[0]).

    With the regex rule, `regex_unmatched_references` counts references the pattern misses.
    """
    scores: dict[str, float] = {}
    primary: list[bool] = []
    for i, match in enumerate(matches):
        correct = [
            answer_matches(o, r, match, pattern) for o, r in zip(outputs, references, strict=True)
        ]
        scores[f"generation_{match}"] = float(np.mean(correct)) if correct else 0.0
        primary = correct if i == 0 else primary
    if "regex" in matches and pattern is not None:
        missed = sum(extract_answer(r, pattern) is None for r in references)
        scores["regex_unmatched_references"] = float(missed)
    return scores, primary


def prompt_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """A prompt as the model saw it, chat-template markers included: skip_special_tokens would
    turn ChatML's `<|im_start|>user` lines into bare role names, and the report could not show
    the turns. Only a leading BOS is dropped."""
    if ids and ids[0] == getattr(tokenizer, "bos_token_id", None):
        ids = ids[1:]
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def generation_eval(
    model: Transformer,
    params: Any,
    tokenizer: Any,
    prompts: Sequence[EvalPrompt],
    *,
    max_new_tokens: int,
    matches: Sequence[str],
    pattern: re.Pattern | None = None,
    samples: int = 5,
    batch_size: int = GENERATION_BATCH,
    stops: Stops | None = None,
) -> dict[str, Any]:
    """Greedy-generates an answer per held-out prompt and scores it by every match rule.

    Returns the generation_<match> fractions, "accuracy" (that of matches[0], the primary rule),
    "n", and the first `samples` as {prompt, reference, output, correct} (correct: primary rule).
    The prompts come ready-tokenised from the data package (`DataBundle.eval_prompts`): for chat
    data the conversation up to the last answer with the template's generation prompt, for
    prompt/completion exactly the training prefix, so evaluation sees what training saw.
    `stops` defaults to the tokenizer's EOS (`generation_stops(None, tokenizer)`).
    """
    stops = stops or generation_stops(None, tokenizer)
    ids = greedy_generate(
        model,
        params,
        [p.prompt_ids for p in prompts],
        max_new_tokens=max_new_tokens,
        stop_ids=stops.ids,
        stop_sequences=stops.sequences,
        batch_size=batch_size,
    )
    outputs = [
        cut_at_stop_text(tokenizer.decode(x, skip_special_tokens=True), stops.texts) for x in ids
    ]
    scores, correct = score_generations(outputs, [p.reference for p in prompts], matches, pattern)
    shown = [
        {
            "prompt": prompt_text(tokenizer, p.prompt_ids),
            "reference": p.reference,
            "output": text,
            "correct": ok,
        }
        for p, text, ok in zip(prompts[:samples], outputs[:samples], correct[:samples], strict=True)
    ]
    accuracy = scores[f"generation_{matches[0]}"]
    return {**scores, "accuracy": accuracy, "n": len(prompts), "samples": shown}


# ----------------------------------------------------------------------------- general text


def read_general_texts(files: str) -> list[data.Text]:
    """Documents of `files`: .txt split at blank lines, anything else via its "text" field."""
    texts: list[data.Text] = []
    for path in data.expand_files(files):
        if path.endswith(".txt"):
            texts.extend(_paragraphs(path))
        else:
            examples, _ = data.read_examples(path, data.FormatSpec("text"), on_bad_row="error")
            texts.extend(examples)  # all Text: the format is forced to "text"
    if not texts:
        raise data.DataError(f"eval.general_text_files {files!r} holds no text")
    return texts


def _paragraphs(path: str) -> list[data.Text]:
    """Blank-line-separated documents of a plain text file, each named path:first line."""
    lines = paths.read_text(path).splitlines()  # local, or gs:// like the data files
    texts, block, start = [], [], 0
    for number, line in enumerate([*lines, ""], start=1):
        if line.strip():
            start = start if block else number
            block.append(line)
        elif block:
            texts.append(data.Text("\n".join(block), f"{path}:{start}"))
            block = []
    return texts


def general_text_batches(config: Config, tokenizer: Any) -> list[dict[str, np.ndarray]]:
    """Packed eval batches of the general text (every token in the loss); [] when the key is off.

    Documents longer than data.seq_len are split into chunks rather than truncated, so the
    whole text is scored.
    """
    files = config.eval.general_text_files
    if not files:
        return []
    settings = data.EncodeSettings(None, "all", config.data.seq_len, "split", "error")
    examples, _, _ = data.encode_examples(
        read_general_texts(files), tokenizer, settings, num_workers=1
    )
    packed = data.pack_examples(
        examples, seq_len=config.data.seq_len, window=config.data.pack_window, seed=config.seed
    )
    return data.eval_batches(packed, batch_size=config.eval.batch_size)


# ----------------------------------------------------------------------------- inference params


def make_inference_params(
    config: Config, model: Transformer, mesh: jax.sharding.Mesh
) -> tuple[Callable[[TrainState], Any], Any]:
    """(state -> parameters for evaluation and generation, their shardings).

    Full fine-tuning: `state.params`. LoRA: the frozen base (dequantised) with the adapters
    merged in, jitted into the base's shardings, so evaluation and generation run the plain
    model; the merged tree is in `lora.base_dtype` and lives only while it is used (prefix and
    prompt tuning: the base with the prefix K/V added, `inference_merge`).
    """
    _, shardings = param_shardings(model, mesh, config.mesh.rules)
    if not config.lora.enabled:
        return (lambda state: state.params), shardings
    merge, shardings = inference_merge(model, config.lora, shardings, mesh)
    return (lambda state: merge(state.frozen, state.params)), shardings
