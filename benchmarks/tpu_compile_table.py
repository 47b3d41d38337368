"""The TPU compiler's answer for real model shapes on real topologies, without a TPU.

    python benchmarks/tpu_compile_table.py [--rows NAME,...] [--out table.jsonl]

For each row, runs `python -m sft_jax.plan --config ... --topology T --compile` (printed before
its result) in its own process, with `model.path` pointing at a directory holding only the
model's public config.json (written here from the fields below, as published on the Hugging
Face Hub; nothing is downloaded, no weights exist: `plan` reads only config.json and compiles
for abstract arrays). Prints a markdown table: model x topology x mode x seq -> the plan's
estimate, the TPU compiler's peak per chip, fits, and the roofline MFU bound; and one JSON line
per row (the plan's own JSON plus the row's name and command). Needs libtpu
(`pip install -e ".[tpu]"`); compiles run one at a time (minutes each for the 70B rows).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
GIB = 1024**3

_LLAMA31 = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "vocab_size": 128256,
    "num_key_value_heads": 8,
    "attention_bias": False,
    "mlp_bias": False,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
}
# Public config.json fields of each model (Hugging Face Hub, the repository in the comment).
MODELS = {
    "llama-3.2-1b": {  # meta-llama/Llama-3.2-1B-Instruct
        **_LLAMA31,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "head_dim": 64,
        "tie_word_embeddings": True,
        "rope_scaling": {**_LLAMA31["rope_scaling"], "factor": 32.0},
    },
    "llama-3.1-8b": {  # meta-llama/Llama-3.1-8B-Instruct
        **_LLAMA31,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "head_dim": 128,
        "tie_word_embeddings": False,
    },
    "llama-3.1-70b": {  # meta-llama/Llama-3.1-70B-Instruct
        **_LLAMA31,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "head_dim": 128,
        "tie_word_embeddings": False,
    },
    "qwen3-4b": {  # Qwen/Qwen3-4B-Instruct-2507
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_act": "silu",
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-6,
        "rope_theta": 5000000.0,
        "tie_word_embeddings": True,
        "vocab_size": 151936,
        "attention_bias": False,
    },
    "qwen3-8b": {  # Qwen/Qwen3-8B
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "vocab_size": 151936,
        "attention_bias": False,
    },
    "qwen3-30b-a3b": {  # Qwen/Qwen3-30B-A3B-Instruct-2507
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_act": "silu",
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "router_aux_loss_coef": 0.001,
        "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000000.0,
        "tie_word_embeddings": False,
        "vocab_size": 151936,
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": None,
    },
    "gemma-3-1b": {  # google/gemma-3-1b-it
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "intermediate_size": 6912,
        "num_hidden_layers": 26,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "max_position_embeddings": 32768,
        "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": None,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "tie_word_embeddings": True,
        "vocab_size": 262144,
        "attention_bias": False,
    },
}

FULL = "configs/qwen3_full.py"  # the full fine-tuning recipe (bf16 compute, fp32 Adam, remat full)
LORA = "configs/llama31_8b_lora.py"  # the LoRA recipe (r=16 on every projection, bf16 base)
MOE_LORA = "configs/qwen3_moe_lora.py"  # LoRA on a mixture of experts' attention, bf16 base
# name: (model, config file, topology, seq_len, global batch rows, micro-batches, extra flags)
ROWS = {
    "llama-1b-full-v5e-8": ("llama-3.2-1b", FULL, "v5e:2x4", 4096, 8, 1, []),
    "llama-8b-full-v5p-32": ("llama-3.1-8b", FULL, "v5p:2x2x4", 4096, 16, 1, []),
    "llama-8b-lora-v5e-8": ("llama-3.1-8b", LORA, "v5e:2x4", 4096, 8, 1, []),
    "llama-70b-lora-v5p-64": ("llama-3.1-70b", LORA, "v5p:2x4x4", 8192, 32, 1, []),
    "llama-70b-full-v5p-128": ("llama-3.1-70b", FULL, "v5p:4x4x4", 4096, 64, 1, []),
    "llama-70b-full-v5p-256": ("llama-3.1-70b", FULL, "v5p:4x4x8", 4096, 128, 1, []),
    # The recipes as shipped (their own batch, micro-batches and remat), on their topology.
    "recipe-llama31_8b_lora-v5p-8": ("llama-3.1-8b", LORA, "v5p:2x2x1", 4096, 16, 4, []),
    "recipe-qwen3_full-4b-v5p-8": ("qwen3-4b", FULL, "v5p:2x2x1", 4096, 32, 4, []),
    "recipe-qwen3_full-8b-v5p-32": ("qwen3-8b", FULL + ":8b", "v5p:2x2x4", 4096, 64, 2, []),
    "recipe-gemma3_lora-v5e-8": (
        "gemma-3-1b", "configs/gemma3_lora.py", "v5e:2x4", 2048, 32, 4, [],
    ),
    # Long context: one row of 32k-128k tokens split over a context axis (splash with gathered
    # keys and values), weights sharded over it as over fsdp.
    "llama-8b-full-32k-v5p-8": (
        "llama-3.1-8b", FULL, "v5p:2x2x1", 32768, 1, 1, ["--config.mesh.context=4"],
    ),
    "llama-8b-full-64k-v5p-8": (
        "llama-3.1-8b", FULL, "v5p:2x2x1", 65536, 1, 1, ["--config.mesh.context=4"],
    ),
    "llama-8b-full-128k-v5p-8": (
        "llama-3.1-8b", FULL, "v5p:2x2x1", 131072, 1, 1, ["--config.mesh.context=4"],
    ),
    # 32k-token rows split over 4 chips, fsdp over 4 (measured with ring attention before auto
    # picked splash under a context axis on TPU).
    "llama-8b-full-32k-context4-v5p-16": (
        "llama-3.1-8b", FULL, "v5p:2x2x4", 32768, 4, 1,
        ["--config.mesh.fsdp=4", "--config.mesh.context=4"],
    ),
    # Mixture of experts: Qwen3-30B-A3B. LoRA (attention) with FSDP, or with the experts split
    # over an expert axis; full fine-tuning with FSDP on the smallest v5p slice that holds the
    # float32 master weights and Adam moments (30.5B x 14 bytes).
    "qwen3-30b-a3b-lora-v5p-8": (
        "qwen3-30b-a3b", MOE_LORA, "v5p:2x2x1", 4096, 16, 4, [],
    ),
    "qwen3-30b-a3b-lora-expert4-v5p-8": (
        "qwen3-30b-a3b", MOE_LORA, "v5p:2x2x1", 4096, 16, 4,
        ["--config.mesh.fsdp=1", "--config.mesh.expert=4"],
    ),
    "qwen3-30b-a3b-lora-expert4-a2a-v5p-8": (
        "qwen3-30b-a3b", MOE_LORA, "v5p:2x2x1", 4096, 16, 4,
        [
            "--config.mesh.fsdp=1", "--config.mesh.expert=4",
            "--config.model.moe_dispatch=all_to_all",
        ],
    ),
    "qwen3-30b-a3b-full-v5p-16": ("qwen3-30b-a3b", FULL, "v5p:2x2x2", 4096, 16, 2, []),
    "qwen3-30b-a3b-full-v5p-32": ("qwen3-30b-a3b", FULL, "v5p:2x2x4", 4096, 32, 2, []),
    "llama-8b-lora-2x-v5e-8": (
        "llama-3.1-8b", LORA, "v5e:2x4", 4096, 16, 1,
        ["--num_slices", "2", "--config.mesh.data=2"],
    ),
}  # fmt: skip


def command(name: str, models_dir: str) -> list[str]:
    model, config, topology, seq, batch, micro, extra = ROWS[name]
    return [
        "python", "-m", "sft_jax.plan", "--config", config, "--topology", topology, "--compile",
        f"--config.model.path={models_dir}/{model}", f"--config.data.seq_len={seq}",
        f"--config.train.global_batch_size={batch}", f"--config.train.micro_batches={micro}",
        *extra,
    ]  # fmt: skip


def write_models(directory: str) -> None:
    for name, fields in MODELS.items():
        path = pathlib.Path(directory, name)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(fields, indent=1))


def run_row(name: str, models_dir: str) -> dict:
    cmd = command(name, models_dir)
    print("$ " + " ".join(cmd).replace(models_dir, "MODELS"), flush=True)
    done = subprocess.run(
        [sys.executable, *cmd[1:]], cwd=REPO, capture_output=True, text=True, env=os.environ
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines or not lines[-1].startswith("{"):
        errors = [line for line in done.stderr.splitlines() if not _metadata_noise(line)]
        print("\n".join(errors[-40:]), file=sys.stderr, flush=True)
        tail = (errors or ["(no output)"])[-1]
        print(f"  failed (exit {done.returncode}): {tail}", flush=True)
        return {"row": name, "error": tail}
    print("\n".join(lines[:-1]), flush=True)
    return {"row": name, **json.loads(lines[-1])}


def _metadata_noise(line: str) -> bool:
    """libtpu's complaints about missing TPU VM metadata: expected without a TPU."""
    return any(k in line for k in ("TPU_WORKER_HOSTNAMES", "TPU accelerator type", "InitGoogle",
                                    "Source Location", "libtpu_init_utils"))  # fmt: skip


def table(results: list[dict]) -> str:
    head = (
        "| row | model | topology | mode | seq | plan GiB/chip | TPU compiler GiB/chip | "
        "plan/compiler | fits | roofline MFU bound | compile s |\n|---|---|---|---|---|---|---|"
        "---|---|---|---|"
    )
    out = [head]
    for r in results:
        model, config, topology, seq, *_ = ROWS[r["row"]]
        mode = "LoRA" if "lora" in config else "full"
        if "error" in r:
            out.append(f"| {r['row']} | {model} | {topology} | {mode} | {seq} | | | | error | | |")
            continue
        slices = f"{r['num_slices']} x " if r["num_slices"] > 1 else ""
        out.append(
            f"| {r['row']} | {model} | {slices}{topology} ({r['chips']} chips) | {mode} | {seq} "
            f"| {r['plan_bytes_per_chip'] / GIB:.2f} | {r['peak_bytes_per_chip'] / GIB:.2f} | "
            f"{r['plan_over_compiled']:.2f} | {'yes' if r['fits'] else 'NO'} | "
            f"{r['roofline_mfu']:.0%} ({r['roofline_bound']}) | {r['compile_s']:.0f} |"
        )
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names")
    parser.add_argument("--out", default="", help="append each row's JSON line to this file")
    args = parser.parse_args()
    names = args.rows.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        print(f"unknown rows {unknown}; choose from {list(ROWS)}", file=sys.stderr)
        return 2
    results = []
    with tempfile.TemporaryDirectory() as models_dir:
        write_models(models_dir)
        for name in names:
            results.append(run_row(name, models_dir))
            print(json.dumps(results[-1]), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(results[-1]) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
