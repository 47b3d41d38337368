"""The Python API: `sft_jax.load` on an HF directory and on a PEFT adapter (merged into its base,
scale from adapter_config.json) against transformers/peft; merging an adapter without training
(`export --peft-adapter`); `generate --model ADAPTER`; the quickstart's example, run as shown."""

import json
import pathlib
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

import sft_jax
from sft_jax import export, generate, hf, lora
from sft_jax.model.decoder import Transformer
from tests.conftest import REPO
from tests.helpers import tiny_model_config

TOL = 1e-4
RANK, ALPHA = 4, 16.0


def _tokens():
    return np.random.default_rng(0).integers(3, 512, size=(2, 10))


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens)).logits.float().numpy()


def test_adapters_without_a_lora_scale_are_an_error():
    """Forgetting the scale used to run the adapters at scale 0: silently the base model."""
    config = tiny_model_config()
    tokens = jnp.zeros((1, 4), jnp.int32)
    model = Transformer(config)
    # Jitted: op by op, the init compiles one random program per leaf shape.
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens, tokens, tokens + 1))
    params = params["params"]
    adapters = lora.init_adapters(params, ("q_proj",), 2, jax.random.PRNGKey(1))
    with pytest.raises(ValueError, match="lora_scale is unset"):
        model.apply({"params": params, "lora": adapters}, tokens, tokens, jnp.ones_like(tokens))


def test_load_hf_directory_matches_transformers(stories_dir):
    model = sft_jax.load(str(stories_dir))
    tokens = _tokens()
    theirs = AutoModelForCausalLM.from_pretrained(stories_dir, attn_implementation="eager")
    np.testing.assert_allclose(model(tokens), _torch_logits(theirs.eval(), tokens), atol=TOL)
    np.testing.assert_array_equal(model(tokens[0]), model(tokens)[0])  # one sequence
    prompt = "Once upon a time"
    ids = model.encode(prompt)
    with torch.no_grad():
        out = theirs.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    expected = model.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    assert model.generate(prompt, max_new_tokens=12) == expected
    assert model.generate([prompt, "Lily"], max_new_tokens=12)[0] == expected  # batched


@pytest.fixture(scope="module")
def adapter(stories_dir, tmp_path_factory):
    """A random rsLoRA + DoRA adapter on the bundled stories260K model (base named by its
    absolute path in adapter_config.json), and peft's logits for it."""
    tmp = tmp_path_factory.mktemp("adapter")
    config = hf.load_model_config(
        str(stories_dir), dtype="float32", param_dtype="float32", remat="none"
    )
    params = hf.load_params(str(stories_dir), config)
    adapters = lora.init_adapters(params, lora.ALL_LINEAR, RANK, jax.random.PRNGKey(0))
    adapters = lora.init_magnitudes(params, adapters)
    # Host noise (numpy): jax.random op by op compiles one program per leaf shape.
    noise = np.random.default_rng(1)
    adapters = jax.tree.map(
        lambda x: x + jnp.asarray(0.1 * noise.standard_normal(x.shape), x.dtype), adapters
    )
    peft_config = lora.peft_config(
        adapters, rank=RANK, alpha=ALPHA, rslora=True, dropout=0.0, base=str(stories_dir)
    )
    lora.write_peft_adapter(str(tmp / "ad"), jax.device_get(adapters), peft_config)
    base = AutoModelForCausalLM.from_pretrained(stories_dir, attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(base, tmp / "ad").eval()
    tokens = _tokens()
    return tmp / "ad", params, adapters, _torch_logits(model, tokens)


def test_read_peft_adapter_takes_rank_alpha_rslora_dora_from_its_config(adapter):
    path, params, adapters, *_ = adapter
    config = lora.read_peft_config(str(path))
    assert (config.rank, config.alpha, config.rslora, config.dora) == (RANK, ALPHA, True, True)
    assert config.scale == pytest.approx(ALPHA / RANK**0.5)
    back = lora.read_peft_adapter(str(path), params)
    for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="use_rslora is True there but False here"):
        lora.read_peft_adapter(str(path), params, rslora=False)


def test_load_peft_adapter_matches_peft(adapter, stories_dir):
    path, _, _, peft_logits = adapter
    tokens = _tokens()
    base_logits = sft_jax.load(str(stories_dir))(tokens)
    assert np.abs(base_logits - peft_logits).max() > 1e-2  # the adapter acts
    np.testing.assert_allclose(sft_jax.load(str(path))(tokens), peft_logits, atol=TOL)
    with_base = sft_jax.load(str(stories_dir), adapter=str(path))
    np.testing.assert_allclose(with_base(tokens), peft_logits, atol=TOL)


def test_merge_adapter_without_training_and_chat_with_it(adapter, tmp_path, capsys):
    path, _, _, peft_logits = adapter
    out = tmp_path / "merged"
    assert export.main(["--peft-adapter", str(path), "--out", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    tokens = _tokens()
    np.testing.assert_allclose(_torch_logits(merged, tokens), peft_logits, atol=TOL)
    capsys.readouterr()
    argv = ["--prompt", "Once upon a time", "--max-new-tokens", "8"]
    assert generate.main(["--model", str(path), *argv]) == 0  # the adapter: its base is loaded
    from_adapter = capsys.readouterr().out
    assert generate.main(["--model", str(out), *argv]) == 0
    assert capsys.readouterr().out == from_adapter and from_adapter.strip()


def test_adapter_errors_are_one_line(adapter, tmp_path, capsys, stories_dir):
    path, *_ = adapter
    no_base = tmp_path / "no_base"
    no_base.mkdir()
    config = json.loads((path / "adapter_config.json").read_text())
    (no_base / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": ""})
    )
    (no_base / "adapter_model.safetensors").write_bytes(
        (path / "adapter_model.safetensors").read_bytes()
    )
    assert export.main(["--peft-adapter", str(no_base), "--out", str(tmp_path / "o")]) == 2
    assert "names no base_model_name_or_path" in capsys.readouterr().err
    patterned = {**config, "rank_pattern": {"q_proj": 8}}
    (no_base / "adapter_config.json").write_text(json.dumps(patterned))
    argv = ["--peft-adapter", str(no_base), "--out", str(tmp_path / "o"), "--base", str(path)]
    assert export.main(argv) == 2
    assert "rank_pattern" in capsys.readouterr().err
    argv = ["--peft-adapter", str(path), "--out", str(path), "--overwrite"]
    assert export.main(argv) == 2
    assert "is the adapter directory" in capsys.readouterr().err
    base = tmp_path / "base"
    shutil.copytree(stories_dir, base)
    argv = ["--peft-adapter", str(path), "--base", str(base), "--out", str(base), "--overwrite"]
    assert export.main(argv) == 2
    assert "is the base model" in capsys.readouterr().err
    assert sorted(p.name for p in base.iterdir()) == sorted(p.name for p in stories_dir.iterdir())


def _section(doc: str, title: str) -> str:
    return doc.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def test_quickstart_python_example_runs_as_shown(capsys, monkeypatch):
    """The API section's python block, run from the repository root, prints the output shown
    in the text block after it."""
    section = _section((REPO / "docs" / "quickstart.md").read_text(), "7. From Python")
    code, shown = re.search(r"```python\n(.*?)```\n+```\n(.*?)```", section, re.S).groups()
    monkeypatch.chdir(REPO)
    exec(compile(code, "docs/quickstart.md", "exec"), {})
    assert capsys.readouterr().out == shown
    assert pathlib.Path("sft_jax/assets/stories260K").is_dir()


def _truncate_weights(model_dir):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    return weights


def _config_not_json(model_dir):
    (model_dir / "config.json").write_text('{"hidden_size": 64,\n  oops}')
    return model_dir / "config.json"


def _config_not_utf8(model_dir):
    (model_dir / "config.json").write_bytes(b'{"architectures": ["\xff"]}')
    return model_dir / "config.json"


@pytest.fixture(scope="module")
def small_adapter(stories_dir, tmp_path_factory):
    """A PEFT adapter on stories260K written by sft_jax alone (no peft needed)."""
    config = hf.load_model_config(
        str(stories_dir), dtype="float32", param_dtype="float32", remat="none"
    )
    adapters = lora.init_adapters(
        hf.load_params(str(stories_dir), config), ("q_proj",), 2, jax.random.PRNGKey(0)
    )
    peft_config = lora.peft_config(
        adapters, rank=2, alpha=4.0, rslora=False, dropout=0.0, base=str(stories_dir)
    )
    path = tmp_path_factory.mktemp("small_adapter") / "ad"
    lora.write_peft_adapter(str(path), jax.device_get(adapters), peft_config)
    return path


@pytest.mark.parametrize("breakage", [_truncate_weights, _config_not_json, _config_not_utf8])
def test_broken_model_directory_is_one_line_naming_the_file(
    breakage, small_adapter, stories_dir, tmp_path, capsys
):
    """load, generate and export --base report a broken model directory like train does."""
    broken = tmp_path / "broken"
    shutil.copytree(stories_dir, broken)
    file = str(breakage(broken))
    with pytest.raises(ValueError, match=re.escape(file)) as error:
        sft_jax.load(str(broken))
    assert "\n" not in str(error.value)
    assert generate.main(["--model", str(broken), "--prompt", "Hi", "--max-new-tokens", "2"]) == 2
    argv = ["--peft-adapter", str(small_adapter), "--base", str(broken)]
    assert export.main([*argv, "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": error: ")[0] for line in lines] == ["generate", "export"], lines
    assert all(file in line for line in lines), lines
