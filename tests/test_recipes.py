"""The ready recipes in configs/ (real models, real hyperparameters) parse, say how to run them,
and train for real: each recipe, with its model swapped for the tiny local stories260K model, its
data for a slice of a real file in the same format and its steps cut to 2, runs
`train_and_evaluate` on the 8 fake CPU devices, so a broken or misspelt key fails here and not
on a rented pod. Nothing is downloaded: the recipes' Hub ids are never resolved in tests.
"""

import json
import math
import pathlib
import re

import pytest

from sft_jax import hf
from sft_jax.config import parse, to_dict
from sft_jax.config_file import load_config_file
from sft_jax.train import train_and_evaluate
from sft_jax.training.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
STORIES = REPO / "sft_jax" / "assets" / "stories260K"
SHARED = REPO.parent / "shared" / "assets"
FAKE_DEVICES = 8

# recipe (file[:preset]) -> (real data file in the recipe's format, the model family's template),
# both under ../shared/assets; without that folder the bundled demo data stands in.
RECIPES = {
    "llama31_8b_lora.py": ("data-llamafactory/v1_sft_demo.jsonl", "llama3_1.jinja"),
    "qwen3_full.py": ("data-fastchat/dummy_conversation.json", "qwen3_instruct_2507.jinja"),
    "qwen3_full.py:8b": ("data-fastchat/dummy_conversation.json", "qwen3.jinja"),
    "gemma3_lora.py": ("data-llamafactory/alpaca_en_demo.json", "gemma3.jinja"),
    "qwen3_moe_lora.py": ("data-llamafactory/v1_sft_demo.jsonl", "qwen3_instruct_2507.jinja"),
}
LORA_LR = (1e-4, 2e-4)
FULL_LR = (1e-5, 2e-5)


def recipe_config(name: str):
    file, _, preset = name.partition(":")
    path = str(REPO / "configs" / file) + (f":{preset}" if preset else "")
    return load_config_file(path)


def test_every_recipe_file_is_listed():
    """A new recipe must be added to RECIPES (and so trained below)."""
    names = {p.name for p in (REPO / "configs").glob("*.py")}
    recipes = names - {"__init__.py", "base.py", "demo.py", "demo_lora.py", "tiny.py"}
    assert recipes == {n.partition(":")[0] for n in RECIPES}


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_parses_with_practitioner_hyperparameters(name):
    c = parse(recipe_config(name))
    assert hf.looks_like_hub_id(c.model.path), c.model.path
    low, high = LORA_LR if c.lora.enabled else FULL_LR
    assert low <= c.optim.learning_rate <= high
    assert 0.03 <= c.optim.warmup_ratio <= 0.10
    assert c.optim.end_lr_ratio == pytest.approx(0.1)
    assert 1.0 <= c.train.epochs <= 3.0 and c.train.max_steps < 0
    assert c.optim.clip_norm == 1.0
    assert c.data.train_files.endswith((".jsonl", ".json")) and c.data.eval_fraction > 0
    assert c.model.dtype == "bfloat16"


@pytest.mark.parametrize("file", sorted({n.partition(":")[0] for n in RECIPES}))
def test_recipe_docstring_opens_with_its_launch_command(file):
    text = (REPO / "configs" / file).read_text()
    docstring = text.split('"""')[1]
    commands = re.findall(r"--config (configs/[\w/.:]+)", docstring)
    assert commands and all(c.partition(":")[0] == f"configs/{file}" for c in commands)
    assert "launch/tpu_vm.sh" in docstring or "python -m sft_jax.train" in docstring


def _micro_batches_for(global_batch: int, recipe_micro: int) -> int:
    """The largest split <= the recipe's whose micro-batch rows divide over the fake devices."""
    for micro in range(recipe_micro, 0, -1):
        if global_batch % micro == 0 and (global_batch // micro) % FAKE_DEVICES == 0:
            return micro
    raise AssertionError(f"global batch {global_batch} cannot be split over {FAKE_DEVICES}")


def _data_slice(tmp_path: pathlib.Path, relative: str, rows: int = 48) -> str:
    """The first `rows` records of a real file, in the same file format."""
    source = SHARED / relative
    out = tmp_path / source.name
    if source.suffix == ".jsonl":
        lines = source.read_text(encoding="utf-8").splitlines()[:rows]
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        records = json.loads(source.read_text(encoding="utf-8"))[:rows]
        out.write_text(json.dumps(records), encoding="utf-8")
    return str(out)


def tiny_version(name: str, tmp_path: pathlib.Path):
    """The recipe with only what cannot run on CPU in a test swapped out; the rest (optimizer,
    LoRA, remat, dtypes, mesh, train_on, checkpoint policy) is the recipe's own."""
    raw = recipe_config(name)
    data_file, _ = RECIPES[name]
    if SHARED.is_dir():
        raw.data.train_files = _data_slice(tmp_path, data_file)
    else:
        raw.data.train_files = str(REPO / "sft_jax" / "assets" / "demo" / "train.jsonl")
    # stories260K's tokenizer has none of the families' turn tokens (<|eot_id|>, <|im_end|>,
    # <end_of_turn>), so their templates are refused on it; the family template is checked with
    # the family's tokenizer below (test_recipe_template_fits_its_family_tokenizer).
    raw.data.chat_template = "plain"
    raw.model.path = str(STORIES)
    if "moe" in name:  # a random mixture of experts (stories260K's vocabulary) stands in
        raw.model.path, raw.data.tokenizer = "", str(STORIES)
        raw.model.arch.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    raw.data.seq_len = 256  # stories260K has 512 positions
    raw.data.max_eval_examples = 8
    raw.train.max_steps = 2
    raw.train.log_every = 1
    raw.train.progress_bar = False
    raw.train.micro_batches = _micro_batches_for(
        raw.train.global_batch_size, raw.train.micro_batches
    )
    raw.eval.batch_size = FAKE_DEVICES * math.ceil(raw.eval.batch_size / FAKE_DEVICES)
    return parse(raw)


FAMILY_TOKENIZERS = {"llama": "tok-llama3.1-hf", "qwen": "tok-qwen3"}  # gemma: none bundled


@pytest.mark.parametrize("name", [n for n in RECIPES if not n.startswith("gemma")])
def test_recipe_template_fits_its_family_tokenizer(name, shared_assets, tmp_path):
    """The family's template renders the recipe's real data with the family's tokenizer, and its
    turns end with one of that tokenizer's tokens (what the trained model stops at)."""
    from sft_jax.data import (
        FormatSpec,
        load_chat_template,
        load_tokenizer,
        read_examples,
        render_conversation,
    )
    from sft_jax.data.templates import end_of_turn

    data_file, template = RECIPES[name]
    tokenizer = load_tokenizer(str(shared_assets / FAMILY_TOKENIZERS[name[:5].rstrip("3")]))
    loaded = load_chat_template(str(shared_assets / "chat-templates" / "trl" / template), tokenizer)
    text, ids = end_of_turn(loaded, tokenizer)
    assert len(ids) == 1 and text in ("<|eot_id|>", "<|im_end|>")
    rows = _data_slice(tmp_path, data_file, rows=8)
    examples, _ = read_examples(rows, FormatSpec(), on_bad_row="error")
    train_on = parse(recipe_config(name)).data.train_on
    assert all(render_conversation(e, loaded, train_on).spans for e in examples)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_trains_two_steps_on_the_tiny_model(name, tmp_path):
    """Slow (about 20-40 s each on 2 shared cores: data rendering, two compilations of the train
    step's shapes, the LoRA merge for evaluation)."""
    (tmp_path / "data").mkdir()
    config = tiny_version(name, tmp_path / "data")
    workdir = tmp_path / "run"
    summary = train_and_evaluate(config, str(workdir))
    assert summary["steps"] == 2
    losses = [r["loss"] for r in read_metrics(str(workdir)) if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), losses
    assert math.isfinite(summary["eval_loss"])
    saved = json.loads((workdir / "config.json").read_text())
    recipe = to_dict(parse(recipe_config(name)))
    for section in ("optim", "lora", "mesh"):
        assert saved[section] == json.loads(json.dumps(recipe[section])), section
    for key in ("dtype", "param_dtype", "remat"):
        assert saved["model"][key] == recipe["model"][key]
    assert saved["data"]["train_on"] == recipe["data"]["train_on"]
    assert (workdir / "checkpoints" / "2").is_dir()
