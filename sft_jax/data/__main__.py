"""`python -m sft_jax.data inspect|audit --config configs/x.py [--config.data.key=value ...]`.

inspect: renders the first --n training examples with trained tokens highlighted ([[...]] or ANSI
  colour on a terminal); with --json one JSON line per example: input_ids, loss_mask, source; with
  --packed, packed rows instead: input_ids, loss_mask, segment_ids, positions, so any tool can check
  masks and packing.
audit: duplicates, empty/placeholder answers (rows a run would refuse are counted, not fatal),
  contradictory answers (both rows named), over-long and dropped examples, special-token text in
  content, other rows a run would refuse, and train/eval overlap: a readable summary on stderr and
  one JSON object on stdout.
Exit code 2 on bad config or data, as the trainer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

import numpy as np

from sft_jax.cli import config_help
from sft_jax.config import Config, ConfigError
from sft_jax.config_file import config_from_argv
from sft_jax.console import route_logging
from sft_jax.data.audit import audit, summary
from sft_jax.data.encode import encode_examples
from sft_jax.data.pack import pack_examples
from sft_jax.data.pipeline import read_splits
from sft_jax.data.prepared import encode_settings, tokenizer_path
from sft_jax.data.source import DataError
from sft_jax.data.tokenize import load_tokenizer
from sft_jax.hf.hub import resolve_model_dir


def data_config(path: str, overrides: list[str]) -> Config:
    """The config as training reads it (`config_from_argv`: the same override syntax, types and
    errors), with a Hub id resolved only for the tokenizer: this command loads no model, so
    model.path is fetched only when it is where the tokenizer comes from (no data.tokenizer)."""
    from absl import flags

    config = config_from_argv(["sft_jax.data", f"--config={path}", *overrides], flags.FlagValues())
    data = dataclasses.replace(config.data, tokenizer=resolve_model_dir(tokenizer_path(config)))
    return dataclasses.replace(config, data=data)


def _highlight(tokenizer: Any, tokens: np.ndarray, mask: np.ndarray, color: bool) -> str:
    out, start = [], 0
    for k in range(1, len(tokens) + 1):
        if k == len(tokens) or mask[k] != mask[start]:
            text = tokenizer.decode(tokens[start:k])
            if mask[start]:
                text = f"\033[1;32m{text}\033[0m" if color else f"[[{text}]]"
            out.append(text)
            start = k
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sft_jax.data",
        usage="%(prog)s {inspect,audit} --config FILE[:ARG] [options] [--config.KEY=VALUE ...]",
        description=__doc__.split("\n\n")[1],
        epilog=config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=("inspect", "audit"))
    parser.add_argument("--config", required=True, help="the config file (training's)")
    parser.add_argument("--n", type=int, default=3, help="inspect: examples shown (default 3)")
    parser.add_argument("--json", action="store_true", help="inspect: one JSON line each")
    parser.add_argument("--packed", action="store_true", help="inspect: packed rows instead")
    args, overrides = parser.parse_known_args(argv)
    route_logging()  # skipped-row warnings as `warning: ...` lines, like training's
    try:
        config = data_config(args.config, overrides)
        tokenizer = load_tokenizer(config.data.tokenizer)
        if args.command == "audit":
            _audit(config, tokenizer)
            return 0
        splits = read_splits(config)
        train = [e for g in splits.train_groups for e in g]
        train = train[: args.n if not args.packed else max(args.n * 8, 64)]
        settings = encode_settings(config, tokenizer, train + splits.eval)
        encoded, _, _ = encode_examples(train, tokenizer, settings, num_workers=1)
        _print_inspect(args, config, tokenizer, encoded)
    except (ConfigError, DataError, FileNotFoundError) as e:  # FileNotFoundError: a Hub id
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _audit(config: Config, tokenizer: Any) -> None:
    """Every row is read and encoded with the run's settings, except that bad rows are counted
    and listed instead of stopping the audit (data.on_bad_row="skip"). The summary goes to
    stderr for the person at the terminal, the JSON to stdout for tools (`> audit.json`)."""
    data = dataclasses.replace(config.data, on_bad_row="skip")
    config = dataclasses.replace(config, data=data)
    errors: list[DataError] = []
    splits = read_splits(config, errors=errors)
    train = [e for g in splits.train_groups for e in g]
    settings = encode_settings(config, tokenizer, train + splits.eval)
    _, counts, skipped = encode_examples(train, tokenizer, settings, num_workers=1)
    full = dataclasses.replace(settings, seq_len=1 << 30)
    lengths = {
        e.source: len(e.tokens) for e in encode_examples(train, tokenizer, full, num_workers=1)[0]
    }
    report = audit(
        train,
        splits.eval,
        lengths,
        data.seq_len,
        errors=errors,
        counts=counts,
        skipped=skipped,
    )
    print(summary(report, len(train), len(splits.eval)), file=sys.stderr)
    print(json.dumps(report, indent=1))


def _print_inspect(args: Any, config: Any, tokenizer: Any, encoded: list) -> None:
    if args.packed:
        dc = config.data
        packed = pack_examples(
            encoded,
            seq_len=dc.seq_len,
            window=dc.pack_window,
            seed=config.seed,
            split=dc.pack_split,
        )
        for r in range(min(args.n, len(packed["inputs"]))):
            row = {
                "input_ids": packed["inputs"][r].tolist(),
                "targets": packed["targets"][r].tolist(),
                "loss_mask": packed["loss_mask"][r].astype(int).tolist(),
                "segment_ids": packed["segment_ids"][r].tolist(),
                "positions": packed["positions"][r].tolist(),
            }
            print(json.dumps(row) if args.json else row)
        return
    for ex in encoded[: args.n]:
        if args.json:
            row = {
                "source": ex.source,
                "input_ids": ex.tokens.tolist(),
                "loss_mask": ex.loss_mask.astype(int).tolist(),
            }
            print(json.dumps(row))
        else:
            print(f"--- {ex.source} ({len(ex.tokens)} tokens, {int(ex.loss_mask.sum())} trained)")
            print(_highlight(tokenizer, ex.tokens, ex.loss_mask, sys.stdout.isatty()))


if __name__ == "__main__":
    sys.exit(main())
