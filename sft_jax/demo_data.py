"""The bundled demo dataset: short-story reading comprehension with a one-word, checkable answer.

The demo fine-tunes stories260K, a 260K-parameter model pretrained on TinyStories, so the stories
use its vocabulary. Each example is a three-sentence story and a question whose answer is one word
copied from the story; the completion is that word (then EOS). The pretrained model never stops
after one word, so greedy exact-match starts near 0 and rises as the model learns the format and to
find the right word. Held-out prompts use the same vocabulary in new combinations.

Regenerate the bundled files (deterministic; a test checks they are unchanged):

    python -m sft_jax.demo_data --out sft_jax/assets/demo
"""

from __future__ import annotations

import argparse
import json
import os
import random

NAMES = ("Lily", "Tom", "Ben", "Mia", "Tim", "Anna", "Sam", "Sue", "Jack", "Lucy", "Max", "Amy")
ANIMALS = ("dog", "cat", "bird", "frog", "fish", "bunny", "bear", "duck", "mouse", "lion")
COLORS = ("red", "blue", "green", "yellow", "pink", "purple", "brown", "white")
THINGS = ("ball", "kite", "hat", "box", "car", "doll", "cake", "book", "toy", "boat")
PLACES = ("park", "garden", "forest", "beach", "house", "school", "farm", "lake")

QUESTIONS = (
    ("What color was the {thing}?", "color"),
    ("Where did {name} go?", "place"),
    ("What did {name} have?", "thing"),
    ("Who had a {color} {thing}?", "name"),
    ("What animal did {name} see?", "animal"),
)


def make_example(rng: random.Random) -> dict[str, str]:
    """One story + question; the completion is the one-word answer with a leading space."""
    fact = {
        "name": rng.choice(NAMES),
        "animal": rng.choice(ANIMALS),
        "color": rng.choice(COLORS),
        "thing": rng.choice(THINGS),
        "place": rng.choice(PLACES),
    }
    story = (
        f"{fact['name']} had a {fact['color']} {fact['thing']}. "
        f"One day, {fact['name']} went to the {fact['place']}. "
        f"There, {fact['name']} saw a {fact['animal']}."
    )
    template, answer_key = rng.choice(QUESTIONS)
    question = template.format(**fact)
    return {
        "prompt": f"{story}\nQuestion: {question}\nAnswer:",
        "completion": f" {fact[answer_key]}",
    }


def make_splits(n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Disjoint train and held-out sets (no held-out prompt appears in train)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    train: list[dict] = []
    held_out: list[dict] = []
    while len(train) < n_train or len(held_out) < n_eval:
        example = make_example(rng)
        if example["prompt"] in seen:
            continue
        seen.add(example["prompt"])
        (train if len(train) < n_train else held_out).append(example)
    return train, held_out


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    train, held_out = make_splits(args.train, args.eval, args.seed)
    write_jsonl(os.path.join(args.out, "train.jsonl"), train)
    write_jsonl(os.path.join(args.out, "eval.jsonl"), held_out)
    print(f"wrote {len(train)} train and {len(held_out)} eval examples to {args.out}")


if __name__ == "__main__":
    main()
