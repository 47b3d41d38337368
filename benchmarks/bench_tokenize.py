"""Tokenisation + masking throughput on real ShareGPT conversations (Qwen3 tokenizer and template).

    python benchmarks/bench_tokenize.py --copies 600 --workers 1,2,4

Replicates the 500 conversations of ../shared/assets/data-fastchat/dummy_conversation.json
`--copies` times (600 -> 300,000 conversations), renders each with turn-by-turn prefix rendering,
tokenises and masks them (`encode_examples`), and prints examples/s and tokens/s per worker count.
Also prints the padding waste of packing the real file (seq_len 2048, window 512).
"""

from __future__ import annotations

import argparse
import os
import time

from sft_jax.data import (
    FormatSpec,
    load_chat_template,
    load_tokenizer,
    pack_examples,
    packing_stats,
    read_examples,
)
from sft_jax.data.encode import EncodeSettings, encode_examples

ASSETS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "assets")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--copies", type=int, default=600)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--template", default="tokenizer")
    parser.add_argument("--train-on", default="last_assistant")
    args = parser.parse_args()
    tokenizer = load_tokenizer(os.path.join(ASSETS, "tok-qwen3"))
    path = os.path.join(ASSETS, "data-fastchat", "dummy_conversation.json")
    convs, _ = read_examples(path, FormatSpec(), on_bad_row="error")
    template = load_chat_template(args.template, tokenizer)
    settings = EncodeSettings(template, args.train_on, 2048, "split", "error")
    for seq_len in (512, 1024, 2048):
        fitted, _, _ = encode_examples(
            convs,
            tokenizer,
            EncodeSettings(template, args.train_on, seq_len, "split", "error"),
            num_workers=1,
        )
        stats = packing_stats(pack_examples(fitted, seq_len=seq_len, window=512, seed=0))
        bound = -(-stats["real_tokens"] // seq_len)
        print(
            f"real ShareGPT file, seq_len {seq_len}: {len(fitted)} examples, "
            f"{stats['real_tokens']} slots, {stats['rows']} rows (lower bound {bound}), "
            f"padding waste {stats['padding_fraction']:.2%}"
        )
    data = convs * args.copies
    for workers in (int(w) for w in args.workers.split(",")):
        start = time.perf_counter()
        out, _, _ = encode_examples(data, tokenizer, settings, num_workers=workers)
        seconds = time.perf_counter() - start
        tokens = sum(len(e.tokens) for e in out)
        print(
            f"workers={workers}: {len(data)} conversations in {seconds:.1f} s: "
            f"{len(data) / seconds:,.0f} examples/s, {tokens / seconds:,.0f} tokens/s"
        )


if __name__ == "__main__":
    main()
