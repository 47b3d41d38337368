"""CPU comparison with TRL: the CPU benchmark workload under sft_jax and under TRL's SFTTrainer.

    python benchmarks/trl_compare.py [--steps 10] [--warmup 3]

Run from the repository root with the project's Python. It

1. creates (or reuses) a separate virtual environment, /tmp/sft_jax_trl_venv by default, with
   `torch==2.13.0` (pinned, installed first and kept by a constraints file while `trl` installs,
   or pip would pull gigabytes of CUDA wheels) and `trl`;
2. writes the synthetic dataset of `python -m sft_jax.bench` (same seed, same prompt/completion
   token ids, from `sft_jax.bench.synthetic_examples`) as pre-tokenised JSONL (`input_ids`,
   `completion_mask`);
3. runs TRL's SFTTrainer in that environment (this file again, `--trl-worker`) once per packing
   strategy in --trl_strategies: a random-init LlamaForCausalLM of the same shapes, fp32, AdamW,
   completion-only loss, max_length = seq_len, per-device batch = the global batch, no eval, no
   saving, a fixed number of steps. "bfd" is TRL's default: best-fit-decreasing bins, which makes
   the batch padding-free (one flattened sequence of up to batch x seq_len tokens with position
   ids; without FlashAttention on CPU, torch attends over the whole flattened sequence with a
   block mask, so its attention costs up to batch times more). "wrapped" concatenates and cuts
   into [batch, seq_len] rows (cheaper, but attention crosses example boundaries). Both are
   reported and the headline ratio is against the faster. Step times are taken between
   consecutive `on_step_end` callbacks (data loading included, as in the sft_jax bench), tokens
   per step from TRL's own `num_tokens` counter;
4. runs `python -m sft_jax.bench --config configs/bench/cpu_small.py` in the project environment,
   once per packing in --sft_jax_packings: "best_fit" (whole examples, best-fit-decreasing: 9%
   padding on this length distribution) and "split" (`data.pack_split=True`: best fit, then the
   least-filled rows cut into the others' gaps, under 1% padding, as padding-free as TRL's two);
5. prints one table: tokens/s of each (median step time after warm-up), the ratios, and each as a
   fraction of the CPU's peak flop/s (same MFU formula; the peak the sft_jax bench measured on
   this host, a 2048^3 fp32 matmul, unless --peak_flops is given), then one JSON line.

Token counts differ by design in one detail: TRL counts the n tokens of each packed example, the
sft_jax bench counts its n - 1 input slots (inputs = tokens[:-1]); the difference is under 0.5%.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "bench", "cpu_small.py")
TORCH_PIN = "torch==2.13.0"
# sft_jax packings compared (flags added to the bench command line).
SFT_JAX_PACKINGS = {"best_fit": [], "split": ["--config.data.pack_split=True"]}


# ----------------------------------------------------------------------------- environment


def ensure_trl_venv(venv: str) -> str:
    """Python of a venv holding torch (pinned) and trl; created once, then reused."""
    python = os.path.join(venv, "bin", "python")
    probe = [python, "-c", "import trl, torch; print(trl.__version__, torch.__version__)"]
    if os.path.exists(python) and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"creating {venv} with {TORCH_PIN} and trl (a few minutes) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    constraints = os.path.join(venv, "constraints.txt")
    with open(constraints, "w", encoding="utf-8") as f:
        f.write(TORCH_PIN + "\n")
    pip = [python, "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TORCH_PIN], check=True)
    subprocess.run([*pip, "-c", constraints, "trl"], check=True)
    return python


def versions(python: str) -> str:
    """trl / torch / transformers versions of the TRL environment, for the report."""
    code = (
        "import trl, torch, transformers; "
        "print(f'trl {trl.__version__}, torch {torch.__version__}, "
        "transformers {transformers.__version__}')"
    )
    return subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.strip()


# ----------------------------------------------------------------------------- data and runs


def workload(steps: int, warmup: int) -> tuple[dict, list]:
    """(model shapes and settings of configs/bench/cpu_small.py, the bench's synthetic pairs)."""
    sys.path.insert(0, REPO)
    from sft_jax import bench
    from sft_jax.config import parse
    from sft_jax.config_file import load_config_file

    config = parse(load_config_file(CONFIG))
    a, batch = config.model.arch, config.train.global_batch_size
    seq_len = config.data.seq_len
    rows = (warmup + steps + 1) * batch
    count = bench.example_count(seq_len, rows, config.data.pack_window)
    pairs = bench.synthetic_examples(config.seed, count, a.vocab_size, seq_len)
    shapes = {
        "vocab_size": a.vocab_size,
        "hidden_size": a.hidden_size,
        "intermediate_size": a.intermediate_size,
        "num_hidden_layers": a.num_layers,
        "num_attention_heads": a.num_heads,
        "num_key_value_heads": a.num_kv_heads,
        "head_dim": a.head_dim,
        "rope_theta": a.rope_theta,
        "rms_norm_eps": a.rms_norm_eps,
        "tie_word_embeddings": a.tie_embeddings,
        "max_position_embeddings": a.max_position_embeddings,
    }
    settings = {
        "shapes": shapes,
        "seq_len": seq_len,
        "batch": batch,
        "seed": config.seed,
        "learning_rate": config.optim.learning_rate,
        "steps": steps,
        "warmup": warmup,
    }
    return settings, pairs


def write_dataset(pairs: list, path: str) -> None:
    """Pre-tokenised JSONL: TRL skips tokenisation and builds labels from completion_mask."""
    with open(path, "w", encoding="utf-8") as f:
        for prompt, completion in pairs:
            ids = [int(t) for t in prompt] + [int(t) for t in completion]
            mask = [0] * len(prompt) + [1] * len(completion)
            f.write(json.dumps({"input_ids": ids, "completion_mask": mask}) + "\n")


def last_json(stdout: str) -> dict:
    """The last line of a run's output that parses as a JSON object."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON line in output:\n{stdout[-3000:]}")


def run(command: list[str], env: dict | None = None) -> dict:
    """Runs a benchmark process (output streamed to stderr) and returns its JSON line."""
    load = os.getloadavg()[0]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
    if proc.returncode:
        raise RuntimeError(f"{command[:3]} failed with exit code {proc.returncode}")
    result = last_json(proc.stdout)
    result["load_before"] = round(load, 2)
    result["load_after"] = round(os.getloadavg()[0], 2)
    return result


# ----------------------------------------------------------------------------- TRL worker


def trl_worker(settings_path: str, data_path: str, tokenizer_dir: str, strategy: str) -> None:
    """Runs inside the TRL venv: SFTTrainer with packing (`strategy`: bfd or wrapped) on the
    JSONL, prints one JSON line."""
    import datasets
    import torch
    import transformers
    import trl

    with open(settings_path, encoding="utf-8") as f:
        s = json.load(f)
    transformers.set_seed(s["seed"])
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**s["shapes"]))
    model = model.to(torch.float32)
    args = trl.SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_bench_"),
        max_steps=s["warmup"] + s["steps"],
        per_device_train_batch_size=s["batch"],
        gradient_accumulation_steps=1,
        learning_rate=s["learning_rate"],
        optim="adamw_torch",
        max_length=s["seq_len"],
        packing=True,
        packing_strategy=strategy,
        completion_only_loss=True,
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        logging_steps=10**6,
        dataloader_num_workers=0,
        seed=s["seed"],
    )
    dataset = datasets.load_dataset("json", data_files=data_path, split="train")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    timer = _step_timer(transformers)
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
    )
    timer.trainer = trainer
    trainer.train()
    result = _trl_result(timer, s, f"trl {trl.__version__} packing={strategy}")
    print(json.dumps({**result, "torch_threads": torch.get_num_threads()}), flush=True)


def _step_timer(transformers: object) -> object:
    """A TrainerCallback recording the wall time and TRL's token counter at each step's end."""

    class StepTimer(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.trainer = None
            self.ends: list[float] = []
            self.tokens: list[int] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())
            self.tokens.append(0)

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())
            self.tokens.append(int(getattr(self.trainer, "_total_train_tokens", 0)))

    return StepTimer()


def _trl_result(timer: object, s: dict, framework: str) -> dict:
    """Median step time and mean real tokens per step over the timed (post-warm-up) steps."""
    times = [b - a for a, b in zip(timer.ends, timer.ends[1:], strict=False)]
    tokens = [b - a for a, b in zip(timer.tokens, timer.tokens[1:], strict=False)]
    times, tokens = times[s["warmup"] :], tokens[s["warmup"] :]
    step_s = statistics.median(times)
    return {
        "workload": "cpu_small",
        "framework": framework,
        "tokens_per_s": round(statistics.mean(tokens) / step_s, 1),
        "step_s": round(step_s, 5),
        "real_tokens_per_step": round(statistics.mean(tokens), 1),
        "steps": len(times),
    }


# ----------------------------------------------------------------------------- comparison


def report(trls: list[dict], ours: dict[str, dict], peak: float, trl_versions: str) -> dict:
    """Prints the comparison table (sft_jax rows: one per packing) and returns the summary
    record: every sft_jax / TRL ratio, the headline one against the fastest TRL variant."""
    per_token = next(iter(ours.values()))["flops_per_token"]
    best = max(trls, key=lambda r: r["tokens_per_s"])
    rows = [(f"sft_jax packing={name}", r) for name, r in ours.items()]
    rows += [(r["framework"], r) for r in trls]
    gflops, mflop = peak / 1e9, per_token / 1e6
    print(f"\nCPU workload cpu_small: peak {gflops:.0f} GFLOP/s, {mflop:.1f} MFLOP per token")
    print(f"TRL environment: {trl_versions}")
    header = f"{'framework':<32} {'tokens/s':>9} {'step s':>8} {'padding':>8} {'of peak':>8}"
    print(f"{header} {'load 1m':>8}")
    for name, r in rows:
        frac = r["tokens_per_s"] * per_token / peak
        padding = f"{r['padding_waste']:.1%}" if "padding_waste" in r else "0 (flat)"
        line = f"{name:<32} {r['tokens_per_s']:>9.0f} {r['step_s']:>8.3f} {padding:>8}"
        print(f"{line} {frac:>8.1%} {r['load_before']:>8.2f}")
    ratios = {
        f"sft_jax packing={name} / {t['framework']}": round(
            r["tokens_per_s"] / t["tokens_per_s"], 3
        )
        for name, r in ours.items()
        for t in trls
    }
    for label, ratio in ratios.items():
        print(f"ratio {label}: {ratio:.2f}x (goal >= 3x)")
    return {
        "workload": "cpu_small",
        "sft_jax_tokens_per_s": {name: r["tokens_per_s"] for name, r in ours.items()},
        "trl_tokens_per_s": {r["framework"]: r["tokens_per_s"] for r in trls},
        "ratios": ratios,
        "fastest_trl": best["framework"],
        "sft_jax_fraction_of_peak": {
            name: round(r["tokens_per_s"] * per_token / peak, 4) for name, r in ours.items()
        },
        "trl_fraction_of_peak": {
            r["framework"]: round(r["tokens_per_s"] * per_token / peak, 4) for r in trls
        },
        "peak_flops": peak,
        "peak_source": next(iter(ours.values()))["peak_source"],
        "load_avg_1m_before": {name: r["load_before"] for name, r in rows},
        "trl": trl_versions,
    }


def main() -> None:
    """Both runs, then the table and the JSON line (last)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak_flops", type=float, default=0.0, help="0: the bench measures it")
    parser.add_argument("--venv", default="/tmp/sft_jax_trl_venv")
    parser.add_argument("--trl_strategies", default="bfd,wrapped", help="TRL packing strategies")
    parser.add_argument("--sft_jax_packings", default="best_fit,split", help="best_fit, split")
    parser.add_argument("--trl-worker", nargs=4, metavar=("SETTINGS", "DATA", "TOKENIZER", "PACK"))
    args = parser.parse_args()
    if args.trl_worker:
        trl_worker(*args.trl_worker)
        return
    python = ensure_trl_venv(args.venv)
    settings, pairs = workload(args.steps, args.warmup)
    tmp = tempfile.mkdtemp(prefix="trl_compare_")
    data_path, settings_path = os.path.join(tmp, "train.jsonl"), os.path.join(tmp, "s.json")
    write_dataset(pairs, data_path)
    with open(settings_path, "w", encoding="utf-8") as f:
        json.dump(settings, f)
    tokenizer = os.path.join(REPO, "sft_jax", "assets", "stories260K")  # only for its pad token
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    worker = [python, __file__, "--trl-worker", settings_path, data_path, tokenizer]
    trls = [run([*worker, strategy], env) for strategy in args.trl_strategies.split(",")]
    bench = [sys.executable, "-m", "sft_jax.bench", "--config", CONFIG]
    flags = [f"--steps={args.steps}", f"--warmup={args.warmup}", f"--peak_flops={args.peak_flops}"]
    ours = {
        packing: run([*bench, *flags, *SFT_JAX_PACKINGS[packing]], env)
        for packing in args.sft_jax_packings.split(",")
    }
    peak = next(iter(ours.values()))["peak_flops"]
    print(json.dumps(report(trls, ours, peak, versions(python))), flush=True)


if __name__ == "__main__":
    main()
