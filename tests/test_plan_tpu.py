"""The real train step compiled by the TPU compiler for a TPU topology, on this CPU host
(libtpu, compile only: nothing runs). A small model at splash attention's shapes: head_dim 128,
seq 512, bfloat16."""

import json

import pytest

from sft_jax import plan as plan_module
from sft_jax.config import ConfigError, parse
from sft_jax.config_file import load_config_file
from sft_jax.planning import tpu
from sft_jax.planning.flops import TPU_GENERATIONS, peak_flops, tpu_generation
from sft_jax.planning.plan_check import abstract_train_state, compile_abstract_step, memory_figures
from sft_jax.training import sharding

pytestmark = pytest.mark.skipif(
    tpu.libtpu_missing() is not None, reason=f"no TPU compiler: {tpu.libtpu_missing()}"
)
SMALL = [
    "--config.model.dtype=bfloat16",
    "--config.model.arch.hidden_size=512",  # = heads x head_dim, as in real models
    "--config.model.arch.head_dim=128",
    "--config.data.seq_len=512",
    "--config.model.remat=full",
    "--config.train.micro_batches=2",  # the accumulation loop's cost is counted per micro-batch
]
# The plan's estimate against the TPU compiler's peak per chip (ratio plan / compiler). The
# plan's activation model is calibrated on XLA:CPU; the TPU compiler keeps fewer temporaries
# (measured 1.7 at data=8 and 2.3 at fsdp=4 for this model, 2.0 there before the plan counted
# FSDP's per-layer buffers: its temporaries are smaller than the float32 gradients the plan
# counts), so on TPU the plan errs high, never low
# (docs/tpu_pod.md has the ratios at real shapes).
TPU_PLAN_BAND = (0.8, 2.5)


def _small(mesh=(1, -1, 1), **lora):
    raw = load_config_file("configs/tiny.py")
    raw.model.dtype, raw.model.arch.head_dim, raw.data.seq_len = "bfloat16", 128, 512
    raw.model.arch.hidden_size = 512
    raw.model.remat = "full"
    raw.mesh.data, raw.mesh.fsdp, raw.mesh.tensor = mesh
    for key, value in lora.items():
        setattr(raw.lora, key, value)
    return parse(raw)


def _compile(config, topology="v5e:2x2", num_slices=1):
    mesh = sharding.make_mesh(config.mesh, tpu.topology_devices(topology, num_slices))
    return mesh, memory_figures(
        compile_abstract_step(config, mesh, abstract_train_state(config, mesh))
    )


# The whole train step's TPU compiles take 20 s to over a minute each, so they run in the slow
# step. The default tier compiles the model's forward and backward for TPU meshes
# (tests/test_attention_tpu.py) and checks the plan's fields without compiling (tests/test_plan.py).
@pytest.mark.slow
def test_cli_compiles_for_v5e_and_prints_every_field(capsys):
    argv = ["plan", "--config", "configs/tiny.py", "--topology", "v5e:2x2", "--compile", *SMALL]
    assert plan_module.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    for key in (
        "topology", "chips", "attention", "peak_bytes_per_chip", "hbm_bytes_per_chip", "fits",
        "compile_s", "flops_per_step", "roofline_compute_s", "roofline_memory_s",
        "roofline_mfu", "plan_bytes_per_chip",
    ):  # fmt: skip
        assert key in result, key
    assert result["topology"] == "v5e:2x2" and result["chips"] == 4 and result["fits"]
    assert result["attention"] == "splash"  # "auto" on a TPU, at a length splash tiles
    assert result["hbm_bytes_per_chip"] == 16 * 2**30
    memory = result["memory_per_device"]
    assert result["peak_bytes_per_chip"] == (
        memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
    )
    # The step's flops exceed the model's (remat full recomputes the forward) but not 2x.
    assert 1.0 < result["flops_per_step"] / result["model_flops_per_step"] < 2.0
    assert result["bytes_accessed_per_chip"] > 0 and result["roofline_memory_s"] > 0
    assert 0 < result["roofline_mfu"] < 1
    low, high = TPU_PLAN_BAND
    assert low < result["plan_over_compiled"] < high, result["plan_over_compiled"]
    assert any(line.startswith("TPU compiler, v5e:2x2 (4 chips)") for line in out)


@pytest.mark.parametrize(
    "mesh, lora",
    [
        pytest.param((2, 1, 2), {}, marks=pytest.mark.slow),
        pytest.param((1, 4, 1), {"enabled": True, "base_quant": "nf4"}, marks=pytest.mark.slow),
    ],
    ids=["data2-tensor2", "qlora-fsdp4"],
)
def test_step_compiles_over_meshes_and_lora(mesh, lora):
    config = _small(mesh, **lora)
    _, memory = _compile(config)
    assert 0 < memory["peak"] < 16 * 2**30


@pytest.mark.slow
def test_two_slices_build_the_hybrid_mesh_and_compile():
    """Data parallelism spans the slices: each data index's devices all lie in one slice."""
    config = _small((2, -1, 1))
    mesh, memory = _compile(config, num_slices=2)
    slices = {d.slice_index for d in mesh.devices.flat}
    assert slices == {0, 1} and memory["peak"] > 0
    for index in range(2):
        assert len({d.slice_index for d in mesh.devices[index].flat}) == 1
    with pytest.raises(ConfigError, match="multiple of 2"):
        sharding.make_mesh(_small((1, -1, 1)).mesh, tpu.topology_devices("v5e:2x2", 2))


def test_topology_names_and_the_generation_table(capsys):
    argv = ["plan", "--config", "configs/tiny.py", "--compile"]
    assert plan_module.main(argv) == 2 and "--topology" in capsys.readouterr().err
    assert tpu.parse_topology("v5p:4x4x8") == (tpu_generation("v5p"), 128)
    with pytest.raises(ConfigError, match="GENERATION"):
        tpu.parse_topology("v9:2x2")
    for generation in TPU_GENERATIONS:
        assert generation.source.startswith("https://") and generation.peak_bf16 > 0
    # Real device kinds: v5p chips call themselves "TPU v5", v5e "TPU v5 lite".
    kind = lambda k: type("D", (), {"platform": "tpu", "device_kind": k})()
    assert peak_flops([kind("TPU v5")] * 4, 1.0) == 4 * 459e12
    assert peak_flops([kind("TPU v5 lite")], 1.0) == 197e12


def test_out_of_memory_message_gives_the_bytes_asked_for():
    """The TPU compiler's refusal (as libtpu words it) becomes `fits: false` with its figure."""
    refusal = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (20.00G) exceeds available HBM (15.75G)."
    )
    assert tpu._out_of_memory(RuntimeError(refusal)) == 20 * 2**30
    assert tpu._out_of_memory(RuntimeError("Used 1.5T of 95.00G hbm")) == int(1.5 * 2**40)
    assert tpu._out_of_memory(RuntimeError("INTERNAL: something else")) is None


def test_roofline_never_allows_more_than_the_models_flops():
    """XLA's extrapolated count can fall below the model's formula (seen at 0.81x for a 70B LoRA
    step); the compute bound then uses the formula, so the MFU bound stays at most 100%."""
    v5p = tpu_generation("v5p")
    model_flops = 9.0e16
    low = tpu.roofline(0.81 * model_flops, model_flops, 1e12, 32, v5p)
    assert low["xla_flops_below_model"]
    assert low["roofline_bound"] == "compute"
    assert low["roofline_mfu"] == pytest.approx(1.0)
    high = tpu.roofline(1.2 * model_flops, model_flops, 1e12, 32, v5p)
    assert not high["xla_flops_below_model"]
    assert high["roofline_mfu"] == pytest.approx(1 / 1.2)
    memory_bound = tpu.roofline(model_flops, model_flops, 1e14, 32, v5p)
    assert memory_bound["roofline_bound"] == "memory" and memory_bound["roofline_mfu"] < 1
