"""Host memory and input throughput of streamed training data (data.streaming) against dataset size.

    python benchmarks/bench_streaming_memory.py --rows 1000000,10000000 --steps 2000 \
        --dir /tmp/stream_bench [--in_memory_rows 100000] [--train_steps 4] \
        [--index_rows 1000000] [--restart_rows 1000000]

For each row count N, a synthetic tokenised corpus of the CPU workload's lengths (prompt 40-300,
completion 20-200 tokens, completion-only loss mask; `sft_jax.bench.PROMPT_LEN` /
`COMPLETION_LEN`) is written once under `--dir/N` in the tokenisation cache's layout (back-to-back
`tokens.npy`, `loss_mask.npy`, `piece_starts.npy`), chunk by chunk. A fresh process then opens it
memory-mapped, as a restart opens the cache, and streams it as one process holding two data
shards (`stream.MappedExamples`, each shard a round-robin `range`): the sizes-only counting pass
over the first epoch (`count_epoch`) and loss-token count the pipeline runs at start, then
`--steps` global batches of 8 rows of 512 tokens (`StreamIterator`, window 512, buffer 4096,
no prefetch). A thread samples /proc/self/status every 50 ms: `anon` is the process's own memory
(heap: Python objects, numpy arrays), `file` the memory-mapped corpus pages mapped into it (clean
page-cache pages; the sources release them after counting and every 64 batches,
`stream.release_mapped`), `peak` VmHWM (both, and the shared libraries).

`--index_rows` measures what the pipeline holds per record besides the stream (the cache opened
as a `RecordStore`, the selected positions, each shard's `CachedExamples` arrays; the corpus
linked in as one verified cache part). `--in_memory_rows` measures the default path for
comparison (every example packed up front by `pack_examples`, rows held by `TrainIterator`) at
that many rows. `--restart_rows` times the streamed data stage's per-shard work at a start over
the same cache part (opening the `RecordStore` as streaming does: sizes and headers of the large
arrays, their blocks verified when first read; each shard's `shard_index`, and its first-epoch
counts through `stream_counts.shard_counts`) twice, each in a fresh process: with no counts file
(the counting pass every start ran before the counts were kept; the file is written) and again
(a restart: the counts are read back). `--train_steps` runs
`python -m sft_jax.bench --config configs/bench/cpu_small.py` (the CPU workload's real train step)
for the rate the step consumes tokens at, beside the input pipeline's rate. Prints one JSON line
per measurement; figures go in docs/benchmarks.md with the command, date and machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, REPO)

from sft_jax.bench import COMPLETION_LEN, PROMPT_LEN  # noqa: E402

SEQ_LEN, BATCH, WINDOW, BUFFER, SHARDS, VOCAB = 512, 8, 512, 4096, 2, 8192
_CHUNK = 1 << 18  # examples written per chunk


def write_corpus(directory: str, rows: int, seed: int = 0) -> None:
    """The synthetic corpus, written in chunks (bounded memory); skipped when complete."""
    done = os.path.join(directory, "DONE")
    if os.path.exists(done):
        return
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    prompt = rng.integers(PROMPT_LEN[0], PROMPT_LEN[1] + 1, rows)
    completion = rng.integers(COMPLETION_LEN[0], COMPLETION_LEN[1] + 1, rows)
    lengths = np.minimum(prompt + completion, SEQ_LEN + 1)
    prompt = np.minimum(prompt, lengths - 1)
    starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    np.save(os.path.join(directory, "piece_starts.npy"), starts)
    total = int(starts[-1])
    open_memmap = np.lib.format.open_memmap
    tokens = open_memmap(os.path.join(directory, "tokens.npy"), "w+", np.int32, (total,))
    mask = open_memmap(os.path.join(directory, "loss_mask.npy"), "w+", bool, (total,))
    for lo in range(0, rows, _CHUNK):
        hi = min(lo + _CHUNK, rows)
        a, b = int(starts[lo]), int(starts[hi])
        tokens[a:b] = rng.integers(3, VOCAB, b - a, dtype=np.int32)
        within = np.arange(b - a) - np.repeat(starts[lo:hi] - a, lengths[lo:hi])
        mask[a:b] = within >= np.repeat(prompt[lo:hi], lengths[lo:hi])
        tokens.flush()
        mask.flush()
    del tokens, mask
    with open(done, "w") as f:
        f.write(str(rows))


class Sampler:
    """Samples this process's memory (kB from /proc/self/status) on a thread."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")

    def __init__(self, period: float = 0.05):
        self.peak = dict.fromkeys(self.FIELDS, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    @staticmethod
    def read() -> dict[str, int]:
        values = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in Sampler.FIELDS:
                    values[key] = int(rest.split()[0])
        return values

    def _run(self, period: float) -> None:
        while not self._stop.is_set():
            for key, value in self.read().items():
                self.peak[key] = max(self.peak[key], value)
            time.sleep(period)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        for key, value in self.read().items():
            self.peak[key] = max(self.peak[key], value)
        return self.peak


def mib(kb: int) -> float:
    return round(kb / 1024, 1)


def open_corpus(directory: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(
        np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="r")
        for name in ("piece_starts", "tokens", "loss_mask")
    )


def measure_streaming(directory: str, steps: int) -> dict:
    from sft_jax.data.stream import MappedExamples, StreamIterator, StreamSettings, count_epoch

    baseline = Sampler.read()
    sampler = Sampler()
    starts, tokens, mask = open_corpus(directory)
    rows = len(starts) - 1
    sources = [MappedExamples(starts, tokens, mask, range(s, rows, SHARDS)) for s in range(SHARDS)]
    settings = StreamSettings(SEQ_LEN, WINDOW, BUFFER)
    t0 = time.perf_counter()
    counts = [count_epoch(src, settings, [0, s]) for s, src in enumerate(sources)]
    loss_tokens = sum(src.loss_tokens() for src in sources)
    count_s = time.perf_counter() - t0
    after_count = sampler.stop()
    sampler = Sampler()
    it = StreamIterator(
        sources,
        settings,
        global_batch_size=BATCH,
        seed=0,
        rows_per_shard=min(c.rows for c in counts),
        loss_tokens=loss_tokens,
    )
    real, t0 = 0, time.perf_counter()
    for _ in range(steps):
        real += int(np.count_nonzero(next(it)["segment_ids"]))
    iterate_s = time.perf_counter() - t0
    state_bytes = len(json.dumps(it.get_state()))
    during = sampler.stop()
    packed_rows = sum(c.rows for c in counts)
    return {
        "mode": "streaming",
        "rows": rows,
        "baseline_rss_mib": mib(baseline["VmRSS"]),
        "count_pass_s": round(count_s, 1),
        "count_pass_peak_anon_mib": mib(after_count["RssAnon"]),
        "iterate_peak_anon_mib": mib(during["RssAnon"]),
        "iterate_peak_file_mib": mib(during["RssFile"]),
        "peak_rss_mib": mib(during["VmHWM"]),
        "steps": steps,
        "input_tokens_per_s": round(real / iterate_s),
        "padding": round(1 - sum(c.real_tokens for c in counts) / (packed_rows * SEQ_LEN), 4),
        "state_json_bytes": state_bytes,
    }


def measure_in_memory(directory: str, steps: int) -> dict:
    from sft_jax.data import TrainIterator, pack_examples
    from sft_jax.data.stream import MappedExamples

    baseline = Sampler.read()
    sampler = Sampler()
    starts, tokens, mask = open_corpus(directory)
    rows = len(starts) - 1
    source = MappedExamples(starts, tokens, mask, range(rows))
    examples = [source.example(i) for i in range(rows)]
    packed = pack_examples(examples, seq_len=SEQ_LEN, window=WINDOW, seed=0)
    del examples
    it = TrainIterator(packed, global_batch_size=BATCH, seed=0)
    real, t0 = 0, time.perf_counter()
    for _ in range(steps):
        real += int(np.count_nonzero(next(it)["segment_ids"]))
    iterate_s = time.perf_counter() - t0
    peak = sampler.stop()
    return {
        "mode": "in_memory",
        "rows": rows,
        "baseline_rss_mib": mib(baseline["VmRSS"]),
        "peak_anon_mib": mib(peak["RssAnon"]),
        "peak_rss_mib": mib(peak["VmHWM"]),
        "steps": steps,
        "input_tokens_per_s": round(real / iterate_s),
        "padding": round(1 - np.count_nonzero(packed["segment_ids"]) / packed["inputs"].size, 4),
    }


def write_cache_part(directory: str) -> str:
    """The corpus as one verified tokenisation-cache part (links to its arrays, one record per
    example), so `measure_index` can open it as a restart opens the cache."""
    from sft_jax.data.cache_store import CACHE_VERSION, MARKER, seal

    starts = np.load(os.path.join(directory, "piece_starts.npy"), mmap_mode="r")
    rows = len(starts) - 1
    part = os.path.join(directory, f"cache-v{CACHE_VERSION}", "part-0")
    if os.path.exists(os.path.join(part, MARKER)):
        return os.path.dirname(part)
    os.makedirs(part, exist_ok=True)
    arrays = {
        "records": np.arange(rows, dtype=np.int64),
        "kinds": np.zeros(rows, np.int8),
        "skipped": np.zeros(rows, bool),
        "counts": np.zeros((rows, 4), np.int32),
        "record_pieces": np.arange(rows + 1, dtype=np.int64),
        "eval_done": np.zeros(rows, bool),
        "source_files": np.zeros(rows, np.int32),  # "train.jsonl:<line>"
        "source_lines": np.arange(1, rows + 1, dtype=np.int64),
    }
    for name, array in arrays.items():
        np.save(os.path.join(part, f"{name}.npy"), array)
    for name in ("piece_starts", "tokens", "loss_mask"):
        os.link(os.path.join(directory, f"{name}.npy"), os.path.join(part, f"{name}.npy"))
    with open(os.path.join(part, "meta.json"), "w") as f:
        json.dump({"source_names": ["train.jsonl"], "named": {}, "prompts": {}}, f)
    seal(part, {"records": rows, "pieces": rows, "tokens": int(starts[-1])})
    return os.path.dirname(part)


def measure_index(directory: str, steps: int) -> dict:
    """What the pipeline holds per record besides the stream: the cache opened (RecordStore),
    the records selected for two shards, and each shard's `CachedExamples` arrays, as
    `stream_prepare.prepare_local` builds them; then `steps` streamed batches."""
    from sft_jax.data.cache_store import RecordStore
    from sft_jax.data.shards import shard_positions, split_position_arrays
    from sft_jax.data.stream import StreamIterator, StreamSettings
    from sft_jax.data.stream_prepare import shard_index

    root = write_cache_part(directory)
    baseline = Sampler.read()
    sampler = Sampler()
    rows = len(np.load(os.path.join(directory, "piece_starts.npy"), mmap_mode="r")) - 1
    store = RecordStore(root, rows, lazy=True)  # as data.streaming opens it
    positions, _ = split_position_arrays(rows, 0.0, 0, hold_out=True)
    sources = []
    for shard in range(SHARDS):
        mine = shard_positions(positions, shard, SHARDS)
        sources.append(shard_index([store], [mine], directory).source)
    del positions, mine
    selected = Sampler.read()
    it = StreamIterator(
        sources,
        StreamSettings(SEQ_LEN, WINDOW, BUFFER),
        global_batch_size=BATCH,
        seed=0,
        rows_per_shard=1,
        loss_tokens=0,
    )
    for _ in range(steps):
        next(it)
    peak = sampler.stop()
    return {
        "mode": "index",
        "rows": rows,
        "baseline_anon_mib": mib(baseline["RssAnon"]),
        "selected_anon_mib": mib(selected["RssAnon"]),
        "peak_anon_mib": mib(peak["RssAnon"]),
        "peak_rss_mib": mib(peak["VmHWM"]),
        "anon_bytes_per_record": round((peak["RssAnon"] - baseline["RssAnon"]) * 1024 / rows),
    }


def measure_restart(directory: str, steps: int) -> dict:
    """The streamed data stage's per-shard work at a start (`stream_prepare.prepare_local`'s,
    for two shards of the corpus as one cache part): the store, each shard's index, and the
    first-epoch counts, read from `<directory>/stream_counts` when a file is there."""
    from sft_jax.data import stream_counts
    from sft_jax.data.cache_store import RecordStore
    from sft_jax.data.shards import shard_positions, split_position_arrays
    from sft_jax.data.stream import StreamSettings
    from sft_jax.data.stream_prepare import shard_index

    root = write_cache_part(directory)
    counted, inner = [], stream_counts.count_shard

    def count_shard(*args):
        counted.append(1)
        return inner(*args)

    stream_counts.count_shard = count_shard
    settings = StreamSettings(SEQ_LEN, WINDOW, BUFFER)
    start = time.perf_counter()
    rows = len(np.load(os.path.join(directory, "piece_starts.npy"), mmap_mode="r")) - 1
    store = RecordStore(root, rows, lazy=True)  # as data.streaming opens it
    positions, _ = split_position_arrays(rows, 0.0, 0, hold_out=True)
    open_s, index_s, counts_s, real = time.perf_counter() - start, 0.0, 0.0, 0
    for shard in range(SHARDS):
        mine = shard_positions(positions, shard, SHARDS)
        t0 = time.perf_counter()
        source = shard_index([store], [mine], directory).source
        t1 = time.perf_counter()
        identity = stream_counts.counts_key(
            [os.path.basename(root)], [mine], settings, [0, shard], None
        )
        real += stream_counts.shard_counts(source, settings, [0, shard], directory, identity)[
            "real_tokens"
        ]
        index_s, counts_s = index_s + t1 - t0, counts_s + time.perf_counter() - t1
    return {
        "mode": "restart",
        "rows": rows,
        "shards_counted": len(counted),
        "open_s": round(open_s, 2),
        "index_s": round(index_s, 2),
        "counts_s": round(counts_s, 2),
        "total_s": round(time.perf_counter() - start, 2),
        "real_tokens": real,
    }


def train_step_rate(steps: int) -> dict:
    """The CPU workload's train step, through sft_jax.bench (its last line is JSON)."""
    config = os.path.join(REPO, "configs", "bench", "cpu_small.py")
    command = [sys.executable, "-m", "sft_jax.bench", "--config", config]
    command += ["--steps", str(steps), "--warmup", "1"]
    env = {**os.environ, "PYTHONPATH": REPO}
    out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "mode": "train_step",
        "tokens_per_s": result["tokens_per_s"],
        "step_s": result["step_s"],
    }


def child(mode: str, directory: str, steps: int) -> None:
    measure = {
        "streaming": measure_streaming,
        "in_memory": measure_in_memory,
        "index": measure_index,
        "restart": measure_restart,
    }[mode]
    print(json.dumps(measure(directory, steps)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1000000,10000000")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--in_memory_rows", type=int, default=0)
    parser.add_argument("--index_rows", default="")
    parser.add_argument("--restart_rows", default="")
    parser.add_argument("--train_steps", type=int, default=0)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.steps)
        return
    runs = [("streaming", int(n)) for n in args.rows.split(",") if n]
    if args.in_memory_rows:
        runs.append(("in_memory", args.in_memory_rows))
    runs += [("index", int(n)) for n in args.index_rows.split(",") if n]
    for n in (int(n) for n in args.restart_rows.split(",") if n):
        runs += [("restart-cold", n), ("restart", n)]
    for mode, rows in runs:
        directory = os.path.join(args.dir, str(rows))
        if mode == "restart-cold":  # no counts kept: every start counted before they were
            shutil.rmtree(os.path.join(directory, "stream_counts"), ignore_errors=True)
            mode = "restart"
        t0 = time.perf_counter()
        write_corpus(directory, rows)
        print(f"# corpus of {rows} rows ready in {time.perf_counter() - t0:.0f} s", flush=True)
        command = [sys.executable, __file__, "--child", mode, directory, "--steps", str(args.steps)]
        command += ["--dir", args.dir]
        subprocess.run(command, check=True)  # a fresh process: its own peak memory
    if args.train_steps:
        print(json.dumps(train_step_rate(args.train_steps)), flush=True)


if __name__ == "__main__":
    main()
