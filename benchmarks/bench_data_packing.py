"""Padding waste of each packing option on the CPU benchmark workload and on a real ShareGPT file.

    python benchmarks/bench_data_packing.py [--sharegpt] [--long]

Workload 1 is exactly the data `python -m sft_jax.bench --config configs/bench/cpu_small.py`
packs (the workload: prompts of 40-300 and completions of 20-200 random tokens, seq_len 512, the
bench's default 3 + 10 + 1 steps of 8 rows -> 1024 examples), plus a larger draw of 8192
examples from the same distribution. Workload 2 (`--sharegpt`) is the 500 conversations of
../shared/assets/data-fastchat/dummy_conversation.json rendered with the Qwen3 tokenizer's template
(last assistant turn trained, over-long conversations split at turn ends), as
benchmarks/bench_tokenize.py does. Workload 3 (`--long`) is long-context data packed into rows
of 32768 and 131072 tokens: 20,000 seeded examples, 70% short (100-2,000 tokens) and 30% long
(2,000-32,768, log-uniform), as agent traces and long documents mixed with chat give.

For each (seq_len, pack_window, split) it prints rows, padding waste, two floors in rows and as
padding (`whole_example_row_floor`, which no packing of whole examples can beat, and ceil(slots /
seq_len), which only split packing can approach), continuation pieces (examples cut by
data.pack_split) and packing time.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from sft_jax.bench import example_count, synthetic_examples, to_tokenized
from sft_jax.data import TokenizedExample, pack_examples, packing_stats, whole_example_row_floor

ASSETS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "assets")
OPTIONS = [(512, False), (4096, False), (512, True), (4096, True)]  # (pack_window, split)


def report(name: str, examples: list[TokenizedExample], seq_len: int) -> None:
    """One line per packing option for `examples`."""
    slots = [len(e.tokens) - 1 for e in examples]
    bound = -(-sum(slots) // seq_len)  # split packing's floor: rows of real tokens only
    whole = whole_example_row_floor(slots, seq_len)

    def padding(rows: int) -> float:
        return 1.0 - sum(slots) / (rows * seq_len)

    for window, split in OPTIONS:
        start = time.perf_counter()
        packed = pack_examples(examples, seq_len=seq_len, window=window, seed=0, split=split)
        seconds = time.perf_counter() - start
        stats = packing_stats(packed)
        print(
            f"{name:<34} seq_len {seq_len:>6} window {window:>4} split {split!s:<5}: "
            f"{stats['rows']:>5} rows, padding {stats['padding_fraction']:6.2%} (floors: "
            f"{whole:>5} rows {padding(whole):6.2%} whole, {bound:>5} rows {padding(bound):6.2%} "
            f"split), {stats['continued_segments']:>4} continuation pieces, {seconds:5.2f} s",
            flush=True,
        )


def sharegpt(seq_len: int) -> list[TokenizedExample]:
    """The real ShareGPT file, tokenised and masked for rows of `seq_len`."""
    from sft_jax.data import FormatSpec, load_chat_template, load_tokenizer, read_examples
    from sft_jax.data.encode import EncodeSettings, encode_examples

    tokenizer = load_tokenizer(os.path.join(ASSETS, "tok-qwen3"))
    path = os.path.join(ASSETS, "data-fastchat", "dummy_conversation.json")
    convs, _ = read_examples(path, FormatSpec(), on_bad_row="error")
    template = load_chat_template("tokenizer", tokenizer)
    settings = EncodeSettings(template, "last_assistant", seq_len, "split", "error")
    return encode_examples(convs, tokenizer, settings, num_workers=1)[0]


def long_context(count: int, seed: int = 0) -> list[TokenizedExample]:
    """Workload 3: a mix of short and long examples (lengths in tokens, loss on the second half)."""
    rng = np.random.default_rng(seed)
    short = rng.integers(100, 2001, size=count)
    long = np.exp(rng.uniform(np.log(2000), np.log(32768), size=count)).astype(int)
    lengths = np.where(rng.random(count) < 0.7, short, long)
    examples = []
    for i, n in enumerate(lengths):
        mask = np.zeros(n, dtype=bool)
        mask[n // 2 :] = True
        examples.append(TokenizedExample(np.ones(n, np.int32), mask, f"long:{i + 1}"))
    return examples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sharegpt", action="store_true", help="also the real ShareGPT file")
    parser.add_argument("--long", action="store_true", help="also rows of 32k and 128k tokens")
    args = parser.parse_args()
    seq_len = 512
    bench_count = example_count(seq_len, (3 + 10 + 1) * 8, 512)
    for count in (bench_count, 8192):
        pairs = synthetic_examples(0, count, 8192, seq_len)
        report(f"cpu_small synthetic ({count} ex.)", to_tokenized(pairs), seq_len)
    if args.sharegpt:
        for seq_len in (512, 1024, 2048):
            examples = sharegpt(seq_len)
            report(f"ShareGPT file ({len(examples)} ex.)", examples, seq_len)
    if args.long:
        examples = long_context(20_000)
        for seq_len in (32768, 131072):
            report(f"long context ({len(examples)} ex.)", examples, seq_len)


if __name__ == "__main__":
    main()
