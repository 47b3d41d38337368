"""The command that chats with a trained workdir or an exported HF directory (decoding itself,
with a KV cache, is sft_jax/model/decode.py):

    python -m sft_jax.generate --model DIR [--prompt "..."] [--temperature 0.7 --top-p 0.9]
    python -m sft_jax.generate --model ADAPTER_DIR    (a PEFT adapter: its base is loaded too)
    python -m sft_jax.generate --workdir W [--step N] [--prompt "..."]

With --prompt it prints one reply and exits; without, it reads prompts from stdin until EOF and
keeps the conversation. The conversation becomes a prompt through the tokenizer's chat template
(for a workdir: the template used in training), and a reply ends at EOS or at the template's end
of turn, one token or several, which never shows in the reply (sft_jax/chat.py).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import jax

from sft_jax import api
from sft_jax.chat import chat_stops, encode
from sft_jax.cli import interrupted
from sft_jax.model.decode import cut_at_stop_text, generate
from sft_jax.model.decoder import Transformer


def _load(args: argparse.Namespace) -> tuple[Transformer, Any, Any, str]:
    """(model, params, tokenizer, model dir for generation_config) from --model (an HF or PEFT
    adapter directory, see sft_jax.load) or --workdir."""
    if args.model:
        loaded = api.load(args.model, step=args.step)
    else:
        loaded = api.from_trained(api.load_workdir(args.workdir, args.step))
    return loaded.module, loaded.params, loaded.tokenizer, loaded.model_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sft_jax.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="HF model directory (e.g. an export) or PEFT adapter")
    source.add_argument("--workdir", help="training workdir")
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--prompt", default=None, help="one prompt; omit for an interactive chat")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for flag, ok, want in [  # checked here, not after the (slow) load, which then raised
        ("--max-new-tokens", args.max_new_tokens >= 0, ">= 0"),
        ("--temperature", args.temperature >= 0, ">= 0 (0: greedy)"),
        ("--top-p", 0 <= args.top_p <= 1, "in [0, 1]"),
    ]:
        if not ok:  # a NaN fails every comparison, so it is refused too
            parser.error(f"{flag} must be {want}")
    try:
        return _chat(args)
    except KeyboardInterrupt:  # Ctrl-C ends an interactive chat: one line, as `sft-jax generate`
        return interrupted("generate")


def _chat(args: argparse.Namespace) -> int:
    """Loads the model, then answers --prompt or each prompt read from stdin; the exit code."""
    try:
        model, params, tokenizer, model_dir = _load(args)
    except (OSError, ValueError) as e:
        print(f"generate: error: {e}", file=sys.stderr)
        return 2
    stops = chat_stops(tokenizer, model_dir)
    messages: list[dict[str, str]] = []
    prompts = [args.prompt] if args.prompt is not None else _stdin_prompts()
    for turn, prompt in enumerate(prompts):
        messages.append({"role": "user", "content": prompt})
        (reply,) = generate(
            model,
            params,
            [encode(tokenizer, messages)],
            max_new_tokens=args.max_new_tokens,
            stop_ids=stops.ids,
            stop_sequences=stops.sequences,
            temperature=args.temperature,
            top_p=args.top_p,
            rng=jax.random.fold_in(jax.random.PRNGKey(args.seed), turn),
        )
        text = cut_at_stop_text(tokenizer.decode(reply, skip_special_tokens=True), stops.texts)
        messages.append({"role": "assistant", "content": text})
        print(text, flush=True)
    return 0


def _stdin_prompts():
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            return
        if line.strip():
            yield line


if __name__ == "__main__":
    sys.exit(main())
