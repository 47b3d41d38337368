"""The data stage: first start against restart with the tokenisation cache, on real ShareGPT data.

    python benchmarks/bench_data_cache.py --copies 600

Replicates the 500 conversations of ../shared/assets/data-fastchat/dummy_conversation.json
`--copies` times into one JSON list in a temporary directory (600 -> 300,000 conversations) and
times `prepare_data` (Qwen3 tokenizer and its template, train_on=last_assistant, overlong=split,
seq_len 2048, 5% held out, data.num_workers automatic) in a fresh Python process per phase, so
each pays its imports as a real start does:

    first     empty cache: read, parse, encode, write the cache's parts, pack, keep prepared rows
    restart   the same config again: the prepared rows are loaded (a restart or resume)
    reseed    another seed: the encodings are reused from the parts; the held-out records and the
              order change, so selection, mixing and packing run again
    uncached  (with --uncached) data.cache_dir="off": today's path without a cache
    tokenizer (floor) loading the tokenizer alone, which every start pays

Prints seconds (and where they went), the phase's peak resident memory, packed rows and the
cache's size per phase, and checks that the restart's first batch equals the first start's. A
restart builds no tokenizer in `prepare_data`; `vocab_check_s` and `tokenizer_on_first_use_s` are
what the trainer's vocabulary check and the first generation pay afterwards. One phase runs alone
with `--phase NAME --data FILE --cache DIR` (a kept cache: restarts measured again without
paying the first start again).

    python benchmarks/bench_data_cache.py --jsonl 1000000 --phases first [--streaming]

`--jsonl N` measures the first start's memory against the number of records instead: N short
synthetic prompt/completion records (about 75 bytes each, so reading and listing the records
weighs, not encoding long chats) as one JSON Lines file, seq_len 128; `--streaming` sets
data.streaming, whose packed rows stay in the cache's files, so the peak is the record listing
and one encoding part rather than every packed row. `--phases` picks the phases to run; the
phase `list` only lists the records (`raw_records.lazy_records`) and reads each back once,
reporting the resident memory that added over the process's after its imports.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"


def config_for(data_file: str, cache_dir: str, seed: int, streaming: bool = False):
    from sft_jax.config import parse
    from sft_jax.config_file import load_config_file

    config = parse(load_config_file(str(REPO / "configs" / "tiny.py")))
    data = dataclasses.replace(
        config.data,
        train_files=data_file,
        eval_files="",
        eval_fraction=0.05,
        tokenizer=str(ASSETS / "tok-qwen3"),
        chat_template="tokenizer",
        train_on="last_assistant",
        overlong="split",
        seq_len=2048,
        num_workers=0,
        prefetch=0,
        cache_dir=cache_dir,
        streaming=streaming,
    )
    if data_file.endswith(".jsonl"):  # the synthetic records (--jsonl): short rows
        data = dataclasses.replace(data, seq_len=128, overlong="truncate")
    return dataclasses.replace(config, data=data, seed=seed)


def write_jsonl(path: str, records: int) -> None:
    """`records` short prompt/completion rows, one JSON object a line, written in blocks."""
    with open(path, "w", encoding="utf-8") as f:
        for lo in range(0, records, 10_000):
            f.writelines(
                json.dumps(
                    {
                        "prompt": f"Question {i}: what is {i} + {i % 7}?",
                        "completion": f" {i + i % 7}.",
                    }
                )
                + "\n"
                for i in range(lo, min(lo + 10_000, records))
            )


def phase(name: str, data_file: str, cache_dir: str, streaming: bool = False) -> dict:
    """One phase, in this (fresh) process."""
    start = time.perf_counter()
    if name == "list":
        return list_records(data_file)
    if name == "tokenizer":
        from sft_jax.data import load_tokenizer

        load_tokenizer(str(ASSETS / "tok-qwen3"))
        return {"seconds": time.perf_counter() - start}
    from sft_jax.data import cache as cache_module
    from sft_jax.data import pipeline
    from sft_jax.data import tokenize as tokenize_module

    timings: dict[str, float] = {}
    for module, function in [
        (tokenize_module, "load_tokenizer"),  # only when the data stage uses the tokenizer
        (cache_module, "group_roots"),  # hashing the data and tokenizer files
        (cache_module, "load_prepared"),
        (cache_module, "encode_cached"),
        (pipeline, "_pack_local"),
    ]:
        _time_calls(module, function, timings)
    seed = 1 if name == "reseed" else 0
    cache = "off" if name == "uncached" else cache_dir
    anon = AnonPeak()
    start = time.perf_counter()
    bundle = pipeline.prepare_data(config_for(data_file, cache, seed, streaming))
    seconds = time.perf_counter() - start
    batch = next(bundle.train_iter)
    start = time.perf_counter()
    len(bundle.tokenizer)  # the trainer's vocabulary check, next
    vocab_check = time.perf_counter() - start
    start = time.perf_counter()
    bundle.tokenizer.load()  # what the first generation (or encoding) pays, if not yet built
    return {
        "seconds": seconds,
        "vocab_check_s": round(vocab_check, 2),
        "tokenizer_on_first_use_s": round(time.perf_counter() - start, 2),
        "parts_s": {k: round(v, 2) for k, v in timings.items()},
        "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "peak_anon_mib": round(anon.stop() / 1024),
        "rows": bundle.stats["rows"],
        "examples": bundle.stats["examples"],
        "first_batch_sum": int(batch["inputs"].astype("int64").sum()),
    }


def list_records(data_file: str) -> dict:
    """The records listed (and each read back once), as the first start lists them."""
    from sft_jax.data.raw_records import lazy_records

    before = _rss_kib()
    start = time.perf_counter()
    records = lazy_records(data_file)
    listed = time.perf_counter() - start
    read = sum(1 for _ in records)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "seconds": time.perf_counter() - start,
        "listing_s": round(listed, 2),
        "records": read,
        "rss_before_mib": round(before / 1024),
        "max_rss_mib": round(peak / 1024),
        "added_bytes_per_record": round((peak - before) * 1024 / max(read, 1)),
    }


def _rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:"))


class AnonPeak:
    """The process's peak anonymous memory (RssAnon, sampled every 50 ms on a thread): its own
    objects and arrays, without the mapped file pages (the cache's) that ru_maxrss also counts."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_kib("RssAnon"))
            time.sleep(0.05)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _rss_kib("RssAnon"))


def _time_calls(module, function: str, timings: dict[str, float]) -> None:
    """Adds the seconds spent in `module.function` to timings[function]."""
    inner = getattr(module, function)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            timings[function] = timings.get(function, 0.0) + time.perf_counter() - start

    setattr(module, function, timed)


def du(path: str) -> int:
    return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--copies", type=int, default=600)
    parser.add_argument("--uncached", action="store_true")
    parser.add_argument("--jsonl", type=int, default=0, help="synthetic JSON Lines records")
    parser.add_argument("--streaming", action="store_true", help="data.streaming=True")
    parser.add_argument("--phases", default="", help="comma-separated phases (default: all)")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, args.data, args.cache, args.streaming)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.jsonl:
            data_file = os.path.join(tmp, "records.jsonl")
            write_jsonl(data_file, args.jsonl)
            what = f"{args.jsonl:,} records"
        else:
            source = ASSETS / "data-fastchat" / "dummy_conversation.json"
            conversations = json.loads(source.read_text(encoding="utf-8"))
            data_file = os.path.join(tmp, "conversations.json")
            with open(data_file, "w", encoding="utf-8") as f:
                json.dump(conversations * args.copies, f, indent=1)
            what = f"{len(conversations) * args.copies:,} conversations"
        cache_dir = os.path.join(tmp, "cache")
        size = os.path.getsize(data_file)
        print(f"{what}, {size / 2**20:.0f} MiB of {os.path.basename(data_file)}")
        phases = ["first", "restart", "reseed", "tokenizer"] + (
            ["uncached"] if args.uncached else []
        )
        if args.phases:
            phases = args.phases.split(",")
        results = {}
        for name in phases:
            command = [sys.executable, __file__, "--phase", name, "--data", data_file]
            command += ["--streaming"] if args.streaming else []
            out = subprocess.run(
                [*command, "--cache", cache_dir], check=True, capture_output=True, text=True
            )
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
            cache_mib = du(cache_dir) / 2**20 if os.path.isdir(cache_dir) else 0.0
            extra = {k: v for k, v in results[name].items() if k != "seconds"}
            print(
                f"{name:>9}: {results[name]['seconds']:8.1f} s  cache {cache_mib:6.0f} MiB  {extra}"
            )
        if "first" in results and "restart" in results:
            same = results["first"]["first_batch_sum"] == results["restart"]["first_batch_sum"]
            print(f"restart's first batch equals the first start's: {same}")


if __name__ == "__main__":
    main()
