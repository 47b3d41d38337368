"""The benchmark's arithmetic (flops per token, MFU, peaks) and its command line contract."""

import json
import os
import pathlib
import subprocess
import sys
import types

import pytest

from sft_jax import bench, hf
from sft_jax.config import parse
from sft_jax.config_file import load_config_file
from sft_jax.data.pack import PACKED_KEYS
from sft_jax.planning import flops

REPO = pathlib.Path(__file__).resolve().parents[1]
CPU_SMALL = REPO / "configs" / "bench" / "cpu_small.py"


def cpu_small_model():
    return hf.build_model_config(parse(load_config_file(str(CPU_SMALL))).model)


def test_flops_per_token_by_hand():
    # cpu_small: D=256, L=4, 8 heads + 4 kv heads of 32, F=688, V=8192, T=512.
    per_layer = 256 * 32 * (2 * 8 + 2 * 4) + 3 * 256 * 688  # q,o + k,v; gate, up, down
    n = 4 * per_layer + 256 * 8192  # + LM head
    assert n == 4_997_120
    cfg = cpu_small_model()
    assert flops.matmul_params(cfg) == n
    assert flops.flops_per_token(cfg, 512) == 6 * n + 12 * 4 * 256 * 512 == 36_274_176
    assert flops.flops_per_token(cfg, 512, adapter_params=1000) == 4 * n + 12 * 4 * 256 * 512 + 6000
    assert flops.mfu(1000.0, 36_274_176, 166e9) == pytest.approx(0.21852, abs=1e-5)


def test_peak_flops_by_device_kind():
    dev = lambda platform, kind: types.SimpleNamespace(platform=platform, device_kind=kind)
    assert flops.peak_flops([dev("cpu", "cpu")] * 8, 166e9) == 166e9  # host devices share cores
    assert flops.peak_flops([dev("gpu", "NVIDIA H100 80GB HBM3")], 1.0) == 989e12
    assert flops.peak_flops([dev("gpu", "NVIDIA H200")] * 2, 1.0) == 2 * 989e12
    assert flops.peak_flops([dev("tpu", "TPU v5 lite")] * 4, 1.0) == 4 * 197e12
    with pytest.raises(ValueError, match="no peak"):
        flops.peak_flops([dev("gpu", "Some GPU")], 1.0)


def test_synthetic_examples_are_seeded_and_in_range():
    a = bench.synthetic_examples(0, 50, 8192, 512)
    b = bench.synthetic_examples(0, 50, 8192, 512)
    same = lambda x, y: all((u == v).all() for u, v in zip(x, y, strict=True))
    assert all(same(x, y) for x, y in zip(a, b, strict=True))
    assert all(40 <= len(p) <= 300 and 20 <= len(c) <= 200 for p, c in a)
    short = bench.synthetic_examples(0, 50, 8192, 64)  # rows of 64 slots hold 65 tokens
    assert all(len(p) + len(c) <= 65 and len(c) >= 1 for p, c in short)


@pytest.mark.slow  # a faster check of the same path stays in the default tier
def test_bench_cli_prints_json_last():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [
        sys.executable,
        "-m",
        "sft_jax.bench",
        "--config",
        str(CPU_SMALL),
        "--steps=2",
        "--warmup=1",
        "--config.model.arch.num_layers=1",
        "--config.data.seq_len=128",
    ]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(bench.REQUIRED_KEYS) <= set(result)
    assert result["workload"] == "cpu_small" and result["mode"] == "full"
    assert result["tokens_per_s"] > 0 and result["step_s"] > 0 and result["compile_s"] > 0
    assert 0 < result["mfu"] < 1 and result["peak_bytes"] > 0
    assert result["seq_len"] == 128 and 0 <= result["padding_waste"] < 0.5
    # The CPU peak was measured on this host (no --peak_flops), and is a plausible fp32 rate.
    assert result["peak_source"].startswith("measured") and 1e9 < result["peak_flops"] < 1e14
    assert result["host_allocator"].startswith(("retaining", "system allocator"))


def test_memory_only_reports_the_compiled_step_without_running_it():
    """--memory_only compiles for abstract inputs: the state is aliased (donated), and the
    persistent bytes per parameter are 12 for fp32 weights + Adam, 6 with everything in bf16."""
    raw = load_config_file(str(CPU_SMALL))
    raw.model.arch.num_layers = 1
    raw.data.seq_len = 64
    fp32 = bench.memory_only(parse(raw), "cpu_small")
    raw.model.param_dtype = "bfloat16"
    raw.optim.state_dtype = "bfloat16"
    bf16 = bench.memory_only(parse(raw), "cpu_small")
    assert fp32["bytes_per_param"] == 12.0 and bf16["bytes_per_param"] == 6.0
    for r in (fp32, bf16):
        assert r["compiled_alias_bytes"] >= r["bytes_per_param"] * r["model_params"]
        assert r["compiled_temp_bytes"] > 0
        assert r["peak_bytes_per_param_estimate"] > r["bytes_per_param"]


def test_build_makes_the_state_and_step_training_makes():
    """NEFTune and KL to the base run in the benchmark as in training: the model carries
    train.neftune_alpha, the state its reference copy, and the step reports the KL term."""
    import jax
    import numpy as np

    raw = load_config_file("configs/tiny.py")
    raw.train.neftune_alpha, raw.train.kl_to_base = 5.0, 0.1
    state, step, place, model_config, _ = bench.build(parse(raw), 4)
    assert model_config.neftune_alpha == 5.0
    assert state.apply_fn.__self__.config.neftune_alpha == 5.0
    assert state.reference is not None
    rows, seq = raw.train.global_batch_size, raw.data.seq_len
    batch = {k: np.ones((rows, seq), bool if k == "loss_mask" else np.int32) for k in PACKED_KEYS}
    _, metrics = jax.eval_shape(step, state, place(batch), np.float32(1.0))
    assert "kl_to_base" in metrics


def test_batch_that_does_not_split_over_the_devices_is_a_clear_error(capsys):
    """4 rows on the 8 test devices: exit 2 naming the key, before anything is built."""
    argv = ["bench", "--config", str(REPO / "configs" / "bench" / "gpu_llama1b.py"),
            "--config.train.host_allocator=system", "--steps=1"]  # fmt: skip
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert "train.global_batch_size=4" in err and "multiple of the 8 batch shards" in err


# Shapes small enough for the CPU; every run of benchmarks/gpu_all.sh gets them (overrides go to
# every run, after the script's own flags).
TINY_ARCH = [
    "--config.model.arch.vocab_size=512",
    "--config.model.arch.hidden_size=64",
    "--config.model.arch.intermediate_size=128",
    "--config.model.arch.num_layers=2",
    "--config.model.arch.num_heads=4",
    "--config.model.arch.num_kv_heads=2",
    "--config.model.arch.head_dim=16",
    "--config.data.seq_len=512",
]


@pytest.mark.slow
def test_gpu_script_runs_every_workload_and_prints_one_json_line_each(tmp_path):
    """The GPU session gets one device call: benchmarks/gpu_all.sh must not fail on a script or
    config error. On the CPU at tiny shapes it runs every workload and lever A/B run, and ends
    with one JSON line per run (the cuDNN check says it needs a GPU)."""
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "STEPS": "1",
        "WARMUP": "0",
        "OUT": str(tmp_path),
        "TOTAL_S": "500",
        "RUN_TIMEOUT": "120",
        "WHEELS": str(tmp_path / "no_wheels"),  # the project's env has every module
    }
    env.pop("PYTHONPATH", None)
    env.pop("XLA_FLAGS", None)  # one device, as on the GPU (not the tests' 8 fake ones)
    script = str(REPO / "benchmarks" / "gpu_all.sh")
    proc = subprocess.run(["bash", script, *TINY_ARCH], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    tail = proc.stdout.split("=== JSON lines\n", 1)[1].strip().splitlines()
    check, *runs = (json.loads(line) for line in tail)
    assert check["check"] == "cudnn_attention" and "needs a GPU" in check["error"]
    full, lora, lora8b = ("gpu_llama1b", "full"), ("gpu_llama1b", "lora"), ("gpu_llama8b", "lora")
    expected = [full, lora, lora8b, full, lora8b, full, full]
    assert [(r["workload"], r["mode"]) for r in runs] == expected
    for r in runs:
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and r["dtype"] == "bfloat16"
    assert [r["remat"] for r in runs] == ["dots"] * 4 + ["none"] + ["dots"] * 2
    assert [r["batch"] for r in runs] == [4, 4, 2, 16, 4, 4, 4]
    assert [r["attention"] for r in runs] == ["blocked"] * 5 + ["xla", "blocked"]  # auto: blocked
    assert [r["loss_chunk"] for r in runs] == [512] * 3 + [0, 0, 512, 0]
    assert (tmp_path / "bench_llama8b_lora.log").exists()
