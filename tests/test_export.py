"""Export: transformers loads what we write and its logits equal ours; the CLI on a trained run."""

import dataclasses
import functools
import json
import re
import struct

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from sft_jax import api, export
from sft_jax.config import parse
from sft_jax.config_file import load_config_file
from sft_jax.model.decoder import Transformer
from sft_jax.workdir import OldWorkdirWarning
from tests.conftest import STORIES
from tests.helpers import tiny_model_config

MODEL_TOL = 1e-4
BASE = tiny_model_config(
    vocab_size=512,  # the stories260K tokenizer's size
    hidden_size=64,
    intermediate_size=96,
    head_dim=16,
    tie_embeddings=True,
    max_position_embeddings=256,
)
VARIANTS = {
    "llama_tied": ({}, "LlamaForCausalLM"),
    "qwen2_bias": ({"attention_bias": True, "tie_embeddings": False}, "Qwen2ForCausalLM"),
    "qwen3_qk_norm": ({"qk_norm": True}, "Qwen3ForCausalLM"),
}


def _random_params(config, seed=0):
    tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    abstract = jax.eval_shape(
        Transformer(config).init, jax.random.PRNGKey(0), tokens, tokens, tokens
    )
    flat = flax.traverse_util.flatten_dict(nn.unbox(abstract["params"]))
    rng = np.random.default_rng(seed)
    params = {}
    for path, leaf in flat.items():
        noise = rng.normal(size=leaf.shape).astype(np.float32) * 0.1
        params[path] = jnp.asarray(noise + 1.0 if path[-1] == "scale" else noise, leaf.dtype)
    return flax.traverse_util.unflatten_dict(params)


@functools.partial(jax.jit, static_argnums=0)
def _apply(config, params, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return Transformer(config).apply({"params": params}, tokens, positions, jnp.ones_like(tokens))


def _tokens():
    return np.random.default_rng(0).integers(0, 512, size=(2, 12))


def _hf_logits(path, tokens):
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens)).logits.float().numpy(), model


def _metadata(path):
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size))["__metadata__"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_random_init_export_loads_in_transformers(variant, tmp_path, stories_dir):
    overrides, arch = VARIANTS[variant]
    config = dataclasses.replace(BASE, **overrides)
    params = _random_params(config)
    export.export_hf(
        params, config, str(tmp_path), tokenizer_dir=str(stories_dir), max_shard_bytes=100_000
    )
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["architectures"] == [arch]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert all(_metadata(tmp_path / name) == {"format": "pt"} for name in shards)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / name).is_file()
    tokens = _tokens()
    theirs, _ = _hf_logits(tmp_path, tokens)
    ours = np.asarray(_apply(config, params, jnp.asarray(tokens, jnp.int32)))
    np.testing.assert_allclose(theirs, ours, atol=MODEL_TOL)


def test_bfloat16_export_rounds_each_weight_once(tmp_path, stories_dir):
    params = _random_params(BASE)
    export.export_hf(params, BASE, str(tmp_path), tokenizer_dir=str(stories_dir), dtype="bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    weight = model.model.layers[1].mlp.down_proj.weight
    assert weight.dtype == torch.bfloat16
    expected = np.asarray(params["layers"]["mlp"]["down_proj"]["kernel"][1]).T
    np.testing.assert_array_equal(weight.float().detach().numpy(), expected.astype(jnp.bfloat16))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny 2-step run started with relative paths (a copied tokenizer, a .jinja template):
    ROOT/run, with ROOT/tok and ROOT/chat.jinja (the plain built-in: chatml's <|im_end|> is not
    a token of stories260K, so it is refused there)."""
    import os
    import shutil

    from sft_jax.data.templates import BUILTIN_TEMPLATES
    from sft_jax.train import train_and_evaluate

    root = tmp_path_factory.mktemp("chat_run")
    shutil.copytree(STORIES, root / "tok")
    (root / "chat.jinja").write_text(BUILTIN_TEMPLATES["plain"])
    c = load_config_file("configs/tiny.py")
    c.train.max_steps = 2
    c.data.max_eval_examples = 8
    c.data.tokenizer = "tok"
    c.data.chat_template = "chat.jinja"
    c.data.train_files = os.path.abspath(c.data.train_files)
    c.data.eval_files = os.path.abspath(c.data.eval_files)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        train_and_evaluate(parse(c), "run")
    finally:
        os.chdir(cwd)
    return root / "run"


def test_cli_exports_a_trained_workdir(trained, tmp_path):
    out = tmp_path / "out"
    assert export.main(["--workdir", str(trained), "--out", str(out)]) == 0
    run = api.load_workdir(str(trained))
    tokens = _tokens()
    ours = np.asarray(_apply(run.model_config, run.params, jnp.asarray(tokens, jnp.int32)))
    theirs, _ = _hf_logits(out, tokens)
    np.testing.assert_allclose(theirs, ours, atol=MODEL_TOL)
    assert np.abs(ours).max() > 0.1
    # A second export into the same directory needs --overwrite.
    assert export.main(["--workdir", str(trained), "--out", str(out)]) == 2
    assert export.main(["--workdir", str(trained), "--out", str(out), "--overwrite"]) == 0


def test_cli_errors_exit_2(trained, tmp_path, capsys):
    assert export.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a training workdir" in capsys.readouterr().err
    assert (
        export.main(["--workdir", str(trained), "--out", str(tmp_path / "o"), "--step", "999"]) == 2
    )
    assert "no checkpoint for step 999" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--peft", "--dtype", "bfloat16"], "--dtype goes with the merged export"),
        (["--max-shard-bytes", "0"], "--max-shard-bytes must be positive, not 0"),
        (["--max-shard-bytes", "-5"], "--max-shard-bytes must be positive, not -5"),
    ],
)
def test_flags_the_export_would_ignore_exit_2(tmp_path, capsys, extra, message):
    """--peft wrote a float32 adapter whatever --dtype said, and a shard size below one byte
    silently put every tensor in a shard of its own; both are refused before any load."""
    argv = ["--workdir", str(tmp_path), "--out", str(tmp_path / "o"), *extra]
    assert export.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _old_workdir(trained, tmp_path, edit):
    """A copy of the trained workdir whose config.json was changed by `edit(raw)`."""
    import shutil

    workdir = tmp_path / "old"
    shutil.copytree(trained, workdir)
    path = workdir / "config.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))
    return workdir


def test_workdir_of_an_older_version_exports_with_defaults(trained, tmp_path):
    def drop_new_keys(raw):
        for key in ("attention", "scan_layers", "loss_chunk"):
            del raw["model"][key]
        del raw["lora"]["modules_to_save"]

    from sft_jax import generate

    workdir = _old_workdir(trained, tmp_path, drop_new_keys)
    with pytest.warns(OldWorkdirWarning, match=r"model\.attention='auto'.*base\.py"):
        assert export.main(["--workdir", str(workdir), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    with pytest.warns(OldWorkdirWarning, match=r"model\.scan_layers=True"):  # generate
        assert (
            generate.main(["--workdir", str(workdir), "--prompt", "Hi", "--max-new-tokens", "2"])
            == 0
        )


@pytest.mark.slow
def test_a_wheel_install_exports_an_older_workdir(trained, tmp_path):
    """Slow (a wheel build, then an export in a fresh venv; about a minute): the installed
    package alone, with no source checkout on the path and run from another directory, reads a
    workdir written by an older version (its defaults come from the packaged base config)."""
    import importlib.util
    import os
    import pathlib
    import shutil
    import subprocess
    import sys
    import sysconfig
    import venv

    # The wheel is built offline, without build isolation, by this interpreter's pip and
    # setuptools (looked up, not imported: importing setuptools here would replace distutils).
    if not all(importlib.util.find_spec(name) for name in ("pip", "setuptools")):
        pytest.skip("needs pip and setuptools to build the wheel offline")
    repo, src, dist = pathlib.Path(__file__).resolve().parents[1], tmp_path / "src", tmp_path / "d"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, src / name)
    shutil.copytree(repo / "sft_jax", src / "sft_jax", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, src],
        check=True,
    )
    venv.create(tmp_path / "venv", with_pip=False)
    python = tmp_path / "venv" / "bin" / "python"
    subprocess.run(
        [*pip, "--python", python, "install", "--no-deps", "--no-index", *dist.glob("*.whl")],
        check=True,
    )
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # The dependencies come from this interpreter's site-packages (a path entry: its editable
    # install of sft_jax, a .pth hook there, is not run, so sft_jax is the wheel's).
    pathlib.Path(purelib, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    def drop_new_keys(raw):
        for key in ("attention", "scan_layers", "loss_chunk"):
            del raw["model"][key]

    workdir, out = _old_workdir(trained, tmp_path, drop_new_keys), tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = functools.partial(subprocess.run, cwd=tmp_path, env=env, capture_output=True, text=True)
    where = run([python, "-c", "import sft_jax.workdir as w; print(w.__file__)"], check=True)
    assert where.stdout.startswith(purelib), where.stdout  # the installed copy, not the checkout
    done = run([python, "-m", "sft_jax.export", "--workdir", workdir, "--out", out])
    assert done.returncode == 0, done.stderr
    assert "model.attention='auto'" in done.stderr and "OldWorkdirWarning" in done.stderr
    assert (out / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda raw: raw["model"].update(flash=True), r"unknown config key 'model\.flash'"),
        (lambda raw: raw["model"]["arch"].update(num_layers="2"), r"'model\.arch\.num_layers'"),
        (lambda raw: raw["model"].update(remat="some"), r"'model\.remat' is 'some'"),
        (lambda raw: raw.update(mesh=[1, 8, 1]), r"'mesh' must be a section"),
    ],
)
def test_malformed_workdir_config_names_file_and_key(trained, tmp_path, capsys, edit, message):
    workdir = _old_workdir(trained, tmp_path, edit)
    assert export.main(["--workdir", str(workdir), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(workdir / "config.json") in err and "Traceback" not in err
    assert re.search(message, err), err


# Text that tokenizes differently when a tokenizer is re-saved: after a special token, leading
# spaces, control-token text inside content, non-ASCII.
TOKENIZER_PROBES = [
    "<s>Hello",
    "Hello world",
    " leading space",
    "a\n\nb  c",
    "<|im_start|>user\nHi<|im_end|>",
    "</s>x",
    "Grüße, 你好 🙂",
]


@pytest.mark.parametrize("name", ["stories260K", "tok-llama3.1-hf", "tok-qwen3"])
def test_export_keeps_token_ids_with_a_training_template(name, tmp_path, stories_dir, request):
    """Every bundled tokenizer transformers loads here (the Mistral SentencePiece files need the
    sentencepiece package, which is not a dependency)."""
    from transformers import AutoTokenizer

    from sft_jax.data.templates import BUILTIN_TEMPLATES

    source = (
        stories_dir if name == "stories260K" else request.getfixturevalue("shared_assets") / name
    )
    params = _random_params(BASE)
    chatml = BUILTIN_TEMPLATES["chatml"]
    export.export_hf(params, BASE, str(tmp_path), tokenizer_dir=str(source), chat_template=chatml)
    before = AutoTokenizer.from_pretrained(source)
    after = AutoTokenizer.from_pretrained(tmp_path)
    for text in TOKENIZER_PROBES:
        for special in (True, False):
            assert before.encode(text, add_special_tokens=special) == after.encode(
                text, add_special_tokens=special
            ), (text, special)
    assert after.chat_template == chatml  # the training template, not the tokenizer's own
    assert (tmp_path / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert saved["chat_template"] == chatml  # also for readers that ignore chat_template.jinja


def test_relative_paths_export_and_chat_like_the_workdir(trained, tmp_path, monkeypatch):
    """Exported from another directory; the export tokenizes and answers as the workdir does."""
    workdir, out, root = trained, tmp_path / "out", trained.parent
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["data"]["tokenizer"] == str(root / "tok")
    assert saved["data"]["chat_template"] == str(root / "chat.jinja")
    monkeypatch.chdir(tmp_path)
    assert export.main(["--workdir", str(workdir), "--out", str(out)]) == 0
    trained, exported = api.load(str(workdir)), api.load(str(out))
    messages = [{"role": "user", "content": "Lily had a red ball. What color was it?"}]
    assert trained.encode(messages) == exported.encode(messages)
    assert trained.generate(messages, max_new_tokens=6) == exported.generate(
        messages, max_new_tokens=6
    )


def test_a_finished_run_no_longer_records_this_process_lines(trained, tmp_path, monkeypatch):
    """The run (relative workdir "run") returned: later lines of the process, logged from
    another directory, are not appended to its train.log (nor fail on the relative path)."""
    from sft_jax import console

    monkeypatch.chdir(tmp_path)
    console.warn("a line logged after the run")
    assert "after the run" not in (trained / "train.log").read_text()
    assert not (tmp_path / "run").exists()


def test_overwrite_removes_stale_weights_and_refuses_inputs(trained, tmp_path, capsys):
    import shutil

    workdir, out, tokenizer = trained, tmp_path / "out", trained.parent / "tok"
    out.mkdir()
    shutil.copyfile("sft_jax/assets/stories260K/model.safetensors", out / "model.safetensors")
    (out / "adapter_config.json").write_text("{}")
    (out / "NOTES.md").write_text("mine")
    assert export.main(["--workdir", str(workdir), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    assert (out / "NOTES.md").read_text() == "mine"  # not an export file: kept
    run = api.load_workdir(str(workdir))
    tokens = _tokens()
    ours = np.asarray(_apply(run.model_config, run.params, jnp.asarray(tokens, jnp.int32)))
    np.testing.assert_allclose(_hf_logits(out, tokens)[0], ours, atol=MODEL_TOL)
    before = sorted(p.name for p in tokenizer.iterdir())
    for target, what in [(workdir, "workdir"), (tokenizer, "tokenizer directory")]:
        argv = ["--workdir", str(workdir), "--out", str(target), "--overwrite"]
        assert export.main(argv) == 2
        assert f"is the {what}" in capsys.readouterr().err
    assert sorted(p.name for p in tokenizer.iterdir()) == before
    assert (workdir / "config.json").is_file()


def test_out_that_is_another_runs_workdir_is_refused_even_with_overwrite(tmp_path):
    """--overwrite removes an earlier export's files, config.json among them: in another run's
    workdir that was the run's own config.json, and the run could no longer resume or export."""
    run = tmp_path / "run"
    (run / "checkpoints" / "2").mkdir(parents=True)
    saved = json.dumps({"model": {"path": ""}, "lora": {}})
    (run / "config.json").write_text(saved)
    with pytest.raises(export.ExportError, match=r"--out .*run is a training workdir"):
        export.check_out_dir(str(run), True, {"workdir": str(tmp_path / "other")})
    assert (run / "config.json").read_text() == saved
    export.check_out_dir(str(run / "hf"), False, {})  # an export inside the workdir is fine
    for inside in ("checkpoints/2/hf", "checkpoints/new", "checkpoints.corrupt/x"):
        with pytest.raises(export.ExportError, match=r"inside the checkpoints of the training"):
            export.check_out_dir(str(run / inside), True, {})


def test_local_paths_become_absolute_but_names_stay(tmp_path, monkeypatch):
    from sft_jax import hf

    c = load_config_file("configs/tiny.py")
    (tmp_path / "t.jinja").write_text("{{ messages }}")
    c.model.path, c.data.tokenizer, c.lora.init_from = "m", "tok", "ad"
    monkeypatch.chdir(tmp_path)
    for template, expected in [("t.jinja", str(tmp_path / "t.jinja")), ("chatml", "chatml")]:
        c.data.chat_template = template
        config = hf.absolute_local_paths(parse(c))
        assert config.data.chat_template == expected
        assert config.model.path == str(tmp_path / "m")
        assert config.data.tokenizer == str(tmp_path / "tok")
        assert config.lora.init_from == str(tmp_path / "ad")
    c.model.path = ""  # a random init stays one
    assert hf.absolute_local_paths(parse(c)).model.path == ""
