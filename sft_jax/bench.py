"""Training-step benchmark: `python -m sft_jax.bench --config configs/bench/X.py [--steps N]
[--warmup W] [--peak_flops F] [--config.a.b=v ...]`.

Why a separate entry point: throughput must come from a command anyone can rerun, over the real
code path: the state and step training builds (`sft_jax.training.state.StateSpec.from_config` and
`create_train_state`, random init from `model.arch`; `train_setup.make_step_from_config`, so
NEFTune, KL to the base and micro-batches run as configured) and the real `TrainIterator`.
Only the data is synthetic here: seeded random prompts (40-300 tokens) and completions (20-200)
with a completion-only loss mask, packed by `pack_examples`; `padding_floor` is the least padding
any packing of those whole examples could reach. `data.train_files` and `data.tokenizer` are
ignored (configs/bench name the bundled demo file only so that the config parses).

Timing: the step is lowered and compiled once (`compile_s`), run `--warmup` times, then timed
`--steps` times; each step blocks on its results. `step_s` is the median wall time of one timed
step *including* fetching and placing its batch; `data_wait_s` is the median of that fetch alone.
`tokens_per_s` counts real (non-padding) input tokens, prompt and completion together (what TRL
reports as num_tokens): mean real tokens per timed step / `step_s`.

MFU (computed in sft_jax/planning/flops.py): tokens/s x flops per token / peak, flops per
token = 6N + 12·L·D·T for full fine-tuning and 4N + 12·L·D·T + 6·(adapter params) for LoRA, N =
matmul parameters including the LM head. Peak: on CPU `--peak_flops` if given, else measured
(`measure_cpu_peak`: the best fp32 rate of a 2048^3 matmul through XLA on this host, before and
after the timed steps); elsewhere the dense bf16 peak of the device kind times the device
count. `peak_source` says which.

The last line printed is one JSON object (workload, mode, tokens_per_s, step_s, mfu, peak_bytes,
compile_s, and more); everything before it is a human summary. It also carries the compiled
step's own memory analysis (`compiled_*_bytes`: arguments, outputs, temporaries, and the bytes
aliased by donation) and the attention implementation that actually ran.

`--memory_only` compiles the step for abstract inputs (nothing allocated, no step run) and prints
that memory analysis per model parameter: on CPU, an estimate of the step at GPU shapes.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import sys
import time
from typing import Any

import jax
import numpy as np

from sft_jax import hf
from sft_jax.cli import absl_help, wants_help
from sft_jax.config import Config, ConfigError
from sft_jax.config_file import config_from_argv
from sft_jax.data import TokenizedExample, TrainIterator, pack_examples, packing_stats
from sft_jax.data.pack import whole_example_row_floor
from sft_jax.model.attention import resolve_implementation
from sft_jax.model.decoder import ModelConfig, Transformer, count_params
from sft_jax.planning.flops import flops_per_token, measure_cpu_peak, mfu, resolve_peak
from sft_jax.planning.plan_check import abstract_train_state, compile_abstract_step
from sft_jax.training import sharding
from sft_jax.training.host_memory import configure_host_allocator
from sft_jax.training.preflight import check_train_batch
from sft_jax.training.state import StateSpec, create_train_state, param_shardings
from sft_jax.training.train_setup import make_placer, make_step_from_config, step_options

PROMPT_LEN = (40, 300)  # inclusive ranges of the benchmark workload
COMPLETION_LEN = (20, 200)
REQUIRED_KEYS = ("workload", "mode", "tokens_per_s", "step_s", "mfu", "peak_bytes", "compile_s")


def peak_memory(device: Any) -> tuple[int, str, int]:
    """(peak bytes, source, bytes in use now): the device allocator's peak where it reports one,
    else the process's maximum resident set (on CPU that is where the arrays live, plus the Python
    runtime). The peak covers the whole process, state initialisation included (LoRA inits the
    base in `param_dtype` before casting it), so bytes still in use after the steps (-1 where not
    reported) are given too."""
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        in_use = int(stats.get("bytes_in_use", -1))
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use", in_use
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS", -1


# ----------------------------------------------------------------------------- synthetic data


def synthetic_examples(
    seed: int, count: int, vocab_size: int, seq_len: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`count` seeded (prompt ids, completion ids) pairs, lengths uniform in PROMPT_LEN and
    COMPLETION_LEN. A pair longer than one packed row (seq_len + 1 tokens: the row holds n - 1
    slots) loses prompt tokens first, so short test rows still get a completion. Shared with
    benchmarks/trl_compare.py so TRL trains on exactly these token ids."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(count):
        p = int(rng.integers(PROMPT_LEN[0], PROMPT_LEN[1] + 1))
        c = int(rng.integers(COMPLETION_LEN[0], COMPLETION_LEN[1] + 1))
        c = min(c, seq_len)
        p = max(min(p, seq_len + 1 - c), 1)
        ids = rng.integers(3, vocab_size, size=p + c, dtype=np.int32)
        pairs.append((ids[:p], ids[p:]))
    return pairs


def example_count(seq_len: int, rows: int, window: int) -> int:
    """Examples to generate for at least `rows` packed rows: the expected tokens needed with a
    margin, and at least two packing windows so best-fit packing sees realistic choice."""
    mean = min(sum(PROMPT_LEN) / 2 + sum(COMPLETION_LEN) / 2, seq_len + 1)
    return max(math.ceil(1.3 * rows * seq_len / (mean - 1)) + 1, 2 * window)


def to_tokenized(pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[TokenizedExample]:
    """Prompt/completion pairs as TokenizedExamples with a completion-only loss mask."""
    out = []
    for k, (prompt, completion) in enumerate(pairs):
        mask = np.concatenate([np.zeros(len(prompt), bool), np.ones(len(completion), bool)])
        out.append(TokenizedExample(np.concatenate([prompt, completion]), mask, f"synthetic:{k}"))
    return out


def packed_data(config: Config, rows: int, vocab_size: int) -> tuple[dict[str, np.ndarray], float]:
    """Packed rows [R >= rows, seq_len] of the synthetic workload (TrainIterator cycles them), and
    the padding floor of whole examples of its lengths (`whole_example_row_floor`)."""
    seq_len, window = config.data.seq_len, config.data.pack_window
    pairs = synthetic_examples(
        config.seed, example_count(seq_len, rows, window), vocab_size, seq_len
    )
    examples = to_tokenized(pairs)
    packed = pack_examples(
        examples, seq_len=seq_len, window=window, seed=config.seed, split=config.data.pack_split
    )
    sizes = [len(e.tokens) - 1 for e in examples]
    return packed, 1.0 - sum(sizes) / (whole_example_row_floor(sizes, seq_len) * seq_len)


# ----------------------------------------------------------------------------- the run


def _checked_mesh(config: Config) -> Any:
    """The device mesh, after the preflight checks a benchmark needs (rules, batch layout)."""
    sharding.check_rules(config.mesh.rules)
    mesh = sharding.make_mesh(config.mesh)
    check_train_batch(config, mesh)
    return mesh


def build(config: Config, total_steps: int) -> tuple[Any, Any, Any, ModelConfig, Any]:
    """(state, compiled-to-be step function, batch placer, model config, mesh) for the config,
    through the same calls as sft_jax.training.train_setup."""
    mesh = _checked_mesh(config)
    spec = StateSpec.from_config(config, None, mesh, total_steps)
    state, shardings = create_train_state(spec)
    step = make_step_from_config(config, shardings, mesh, total_steps, spec.model_config)
    place = make_placer(sharding.batch_sharding(mesh, config.mesh.rules))
    return state, step, place, spec.model_config, mesh


def compiled_memory(compiled: Any) -> dict[str, int]:
    """The compiled step's memory analysis (-1 where the backend reports none). With the state
    donated, `alias` is the state bytes the outputs reuse; the step's peak is about
    arguments + outputs - alias + temp."""
    analysis = compiled.memory_analysis()
    names = ("argument", "output", "alias", "temp")
    if analysis is None:
        return {f"compiled_{n}_bytes": -1 for n in names}
    return {f"compiled_{n}_bytes": int(getattr(analysis, f"{n}_size_in_bytes")) for n in names}


def attention_used(model_config: ModelConfig, config: Config, mesh: Any) -> str:
    """The attention implementation the model resolves to on the mesh's platform, for the
    config's sequence length and the mesh's context axis."""
    return resolve_implementation(
        model_config.attention,
        platform=mesh.devices.flat[0].platform,
        dtype=model_config.dtype,
        head_dim=model_config.head_dim,
        softcap=model_config.attn_softcap,
        sinks=model_config.attention_sinks,
        seq_len=config.data.seq_len,
        context=sharding.context_shards(mesh),
    )


def memory_only(config: Config, workload: str) -> dict:
    """Compiles the step for abstract state and batch (nothing allocated, nothing run) and
    returns its memory analysis per model parameter (see the module docstring)."""
    if config.lora.enabled:
        raise SystemExit("--memory_only covers full fine-tuning (lora.enabled=False)")
    mesh = _checked_mesh(config)
    model_config = hf.build_model_config(config.model)
    abstract = abstract_train_state(config, mesh)
    start = time.perf_counter()
    compiled = compile_abstract_step(config, mesh, abstract)
    compile_s = time.perf_counter() - start
    memory = compiled_memory(compiled)
    params = count_params(param_shardings(Transformer(model_config), mesh, config.mesh.rules)[0])
    persistent = state_bytes(abstract)
    peak = (
        memory["compiled_argument_bytes"]
        + memory["compiled_output_bytes"]
        - memory["compiled_alias_bytes"]
        + memory["compiled_temp_bytes"]
    )
    return {
        "workload": workload,
        "mode": "lora" if config.lora.enabled else "full",
        "memory_only": True,
        "model_params": params,
        "bytes_per_param": round(persistent / params, 3),
        "peak_bytes_per_param_estimate": round(peak / params, 3),
        "peak_bytes_estimate": peak,
        **memory,
        "compile_s": round(compile_s, 3),
        "attention": attention_used(model_config, config, mesh),
        **settings(config, mesh, model_config, 0, 0),
    }


def state_bytes(state: Any) -> int:
    """Bytes held between steps: trainable params, optimizer state, the frozen LoRA base and
    KL-to-base's reference copy (the memory budget per model parameter: <= 16.5 with fp32
    weights and Adam)."""
    leaves = jax.tree.leaves((state.params, state.opt_state, state.frozen, state.reference))
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves)


def time_steps(
    state: Any, compiled: Any, place: Any, batches: TrainIterator, warmup: int, steps: int
) -> tuple[Any, list[float], list[float], list[float], list[int], float]:
    """Runs warmup + timed steps, blocking on each; returns the state, per-step wall times,
    data-fetch times, process CPU times and real-token counts of the timed steps, and the last
    loss."""
    scale = np.float32(1.0)
    step_times, waits, cpu_times, tokens = [], [], [], []
    loss = float("nan")
    for i in range(warmup + steps):
        cpu_start = time.process_time()
        start = time.perf_counter()
        host = next(batches)
        batch = place(host)
        fetched = time.perf_counter()
        state, metrics = compiled(state, batch, scale)
        jax.block_until_ready((state.params, metrics))
        end = time.perf_counter()
        cpu_end = time.process_time()
        loss = float(metrics["loss"])
        if i >= warmup:
            cpu_times.append(cpu_end - cpu_start)
            step_times.append(end - start)
            waits.append(fetched - start)
            tokens.append(int(np.count_nonzero(host["segment_ids"])))
    return state, step_times, waits, cpu_times, tokens, loss


def run_bench(config: Config, *, steps: int, warmup: int, cpu_peak: float, workload: str) -> dict:
    """Builds, compiles and times the step; returns the result record (see module docstring)."""
    state, step, place, model_config, mesh = build(config, warmup + steps + 1)
    batch_size = config.train.global_batch_size
    rows = (warmup + steps + 1) * batch_size
    packed, padding_floor = packed_data(config, rows, model_config.vocab_size)
    batches = TrainIterator(
        packed, global_batch_size=batch_size, seed=config.seed, prefetch=config.data.prefetch
    )
    start = time.perf_counter()
    compiled = step.lower(state, place(next(batches)), np.float32(1.0)).compile()
    compile_s = time.perf_counter() - start
    memory = compiled_memory(compiled)
    persistent = state_bytes(state)
    # A shared machine's speed drifts: the CPU peak is measured on both sides of the timing.
    on_cpu = mesh.devices.flat[0].platform == "cpu"
    peak_before = measure_cpu_peak() if on_cpu and cpu_peak <= 0 else 0.0
    try:
        state, step_times, waits, cpu_times, tokens, loss = time_steps(
            state, compiled, place, batches, warmup, steps
        )
    finally:
        batches.close()  # stops the prefetch thread
    lora = state.frozen is not None
    trainable = count_params(state.params)
    abstract = param_shardings(Transformer(model_config), mesh, config.mesh.rules)[0]
    model_params = count_params(abstract)
    per_token = flops_per_token(model_config, config.data.seq_len, trainable if lora else 0)
    step_s = statistics.median(step_times)
    tokens_per_s = statistics.mean(tokens) / step_s
    peak, peak_source = resolve_peak(list(mesh.devices.flat), cpu_peak, peak_before)
    peak_bytes, memory_source, in_use = peak_memory(mesh.devices.flat[0])
    measured = {
        "workload": workload,
        "mode": "lora" if lora else "full",
        "tokens_per_s": round(tokens_per_s, 1),
        "step_s": round(step_s, 5),
        "mfu": round(mfu(tokens_per_s, per_token, peak), 5),
        "peak_bytes": peak_bytes,
        "compile_s": round(compile_s, 3),
        "memory_source": memory_source,
        "bytes_in_use_after": in_use,
        "data_wait_s": round(statistics.median(waits), 6),
        # CPU seconds the process used per step (all threads): on a shared, loaded machine this
        # tracks the work a step does better than wall time (which includes waiting for a core).
        "step_cpu_s": round(statistics.median(cpu_times), 5),
        "padding_waste": round(packing_stats(packed)["padding_fraction"], 5),
        "padding_floor": round(padding_floor, 5),  # least padding of any whole-example packing
        "real_tokens_per_step": round(statistics.mean(tokens), 1),
        "flops_per_token": per_token,
        "peak_flops": peak,
        "peak_source": peak_source,
        "model_params": model_params,
        "trainable_params": trainable,
        "bytes_per_param": round(persistent / model_params, 3),
        "final_loss": round(loss, 4),
        "attention": attention_used(model_config, config, mesh),
        **memory,
    }
    return {**measured, **settings(config, mesh, model_config, steps, warmup)}


def settings(config: Config, mesh: Any, model_config: ModelConfig, steps: int, warmup: int) -> dict:
    """The settings a result was measured under, recorded with it (the loss chunk resolved)."""
    return {
        "steps": steps,
        "warmup": warmup,
        "batch": config.train.global_batch_size,
        "micro_batches": config.train.micro_batches,
        "seq_len": config.data.seq_len,
        "dtype": config.model.dtype,
        "param_dtype": config.model.param_dtype,
        "remat": config.model.remat,
        "scan_layers": config.model.scan_layers,
        "loss_chunk": step_options(config, mesh, model_config).loss_chunk,
        "optim_state_dtype": config.optim.state_dtype,
        "devices": f"{mesh.devices.size} x {mesh.devices.flat[0].device_kind}",
        "jax": jax.__version__,
    }


def summary(result: dict) -> str:
    """Human-readable lines printed before the JSON line."""
    r = result
    return "\n".join(
        [
            f"bench {r['workload']} ({r['mode']}) on {r['devices']}: batch {r['batch']} x "
            f"seq {r['seq_len']}, {r['dtype']} compute, {r['param_dtype']} params, "
            f"remat {r['remat']}, attention {r['attention']}, scan {r['scan_layers']}, "
            f"loss chunk {r['loss_chunk']}, Adam moments {r['optim_state_dtype']}",
            f"  params {r['model_params'] / 1e6:.2f}M (trainable {r['trainable_params'] / 1e6:.2f}"
            f"M), persistent state {r['bytes_per_param']} bytes/param",
            f"  compile {r['compile_s']:.1f} s; median step {r['step_s'] * 1e3:.1f} ms over "
            f"{r['steps']} steps after {r['warmup']} warm-up; data wait "
            f"{r['data_wait_s'] * 1e3:.2f} ms/step",
            f"  {r['tokens_per_s']:.0f} real tokens/s ({r['real_tokens_per_step']:.0f}/step, "
            f"padding waste {r['padding_waste']:.2%}, floor {r['padding_floor']:.2%}); "
            f"MFU {r['mfu']:.2%} of "
            f"{r['peak_flops'] / 1e12:.3g} TFLOP/s ({r['peak_source']})",
            f"  peak memory {r['peak_bytes'] / 2**20:.0f} MiB ({r['memory_source']}); "
            f"final loss {r['final_loss']}",
        ]
    )


def workload_name(argv: list[str]) -> str:
    """The config file's base name (`configs/bench/cpu_small.py` -> `cpu_small`)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        else:
            continue
        return os.path.splitext(os.path.basename(path.partition(":")[0]))[0]
    return "unknown"


BENCH_HELP = (
    "Times the config's train step: tokens/s (real tokens), step time, MFU, peak bytes and\n"
    "compile time; the last line is the same as one JSON object. See configs/bench/."
)


def main(argv: list[str] | None = None) -> int:
    """Parses the command line, runs the benchmark, prints the summary and the JSON line last."""
    from absl import flags

    argv = list(sys.argv if argv is None else argv)
    flag_values = flags.FlagValues()
    flags.DEFINE_integer("steps", 10, "Timed steps.", flag_values=flag_values)
    flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.", flag_values=flag_values)
    flags.DEFINE_float(
        "peak_flops", 0.0, "Peak flop/s on CPU; 0: measured.", flag_values=flag_values
    )
    flags.DEFINE_bool(
        "memory_only", False, "Only compile for abstract inputs; print memory analysis.",
        flag_values=flag_values,
    )  # fmt: skip
    if wants_help(argv[1:]):
        usage = "python -m sft_jax.bench --config FILE[:ARG] [--steps N] [--config.KEY=VALUE ...]"
        print(absl_help(usage, BENCH_HELP, flag_values), end="")
        return 0
    try:
        config = config_from_argv(argv, flag_values)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if flag_values.steps < 1 or flag_values.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    # As sft_jax.train does, before JAX's backend starts (train.host_allocator).
    allocator = configure_host_allocator(
        config.train.host_allocator, config.distributed.expected_platform
    )
    try:
        if flag_values.memory_only:
            print(json.dumps(memory_only(config, workload_name(argv))), flush=True)
            return 0
        result = run_bench(
            config,
            steps=flag_values.steps,
            warmup=flag_values.warmup,
            cpu_peak=flag_values.peak_flops,
            workload=workload_name(argv),
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["host_allocator"] = allocator
    print(summary(result), flush=True)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
