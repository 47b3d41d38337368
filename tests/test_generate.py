"""KV-cache generation: stories260K golden continuation, batching invariance, HF and full-recompute
parity (with sliding-window layers), seeded sampling, and the chat command."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

from sft_jax import hf
from sft_jax.generate import main
from sft_jax.model.decode import generate, greedy_generate, sample_token
from sft_jax.model.decoder import Transformer


def _load(path):
    config = hf.load_model_config(str(path), dtype="float32", param_dtype="float32", remat="none")
    return Transformer(config), hf.load_params(str(path), config)


@pytest.fixture(scope="module")
def stories(stories_dir):
    return _load(stories_dir)


def test_stories260k_greedy_200_tokens_from_bos(stories, golden_dir):
    golden = json.loads((golden_dir / "golden.json").read_text())
    expected = golden["greedy_from_bos_200_ids"]
    assert expected[0] == 1 and 2 not in expected  # BOS prompt; EOS never produced
    model, params = stories
    (generated,) = greedy_generate(model, params, [[1]], max_new_tokens=200, stop_ids=[2])
    assert generated == expected[1:]


def test_batched_prompts_of_different_lengths_equal_each_alone(stories):
    model, params = stories
    prompts = [[1, 403, 407, 261, 378, 432, 383], [1], [1, 403, 407], [1, 376, 400, 428, 395]]
    # max_new_tokens 9 keeps every buffer at 16 slots: one compile for rows=1, one for rows=3.
    alone = [greedy_generate(model, params, [p], max_new_tokens=9, stop_ids=[]) for p in prompts]
    # batch_size 3: a full batch of three, then one prompt in a batch padded with filler rows.
    batched = greedy_generate(model, params, prompts, max_new_tokens=9, stop_ids=[], batch_size=3)
    assert batched == [out[0] for out in alone]
    assert all(len(out) == 9 for out in batched)


def test_output_is_cut_before_the_first_stop_id(stories):
    model, params = stories
    (full,) = greedy_generate(model, params, [[1, 403]], max_new_tokens=9, stop_ids=[])
    stop = full[5]
    first = full.index(stop)
    (cut,) = greedy_generate(model, params, [[1, 403]], max_new_tokens=9, stop_ids=[stop, None])
    assert cut == full[:first]


def test_edge_cases(stories):
    model, params = stories
    assert greedy_generate(model, params, [[1], [1, 2]], max_new_tokens=0, stop_ids=[2]) == [[], []]
    assert greedy_generate(model, params, [], max_new_tokens=4, stop_ids=[2]) == []
    with pytest.raises(ValueError, match="at least one token"):
        greedy_generate(model, params, [[1], []], max_new_tokens=4, stop_ids=[2])


def test_matches_transformers_generate(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    hf_model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for param in hf_model.parameters():
            param.add_(0.1 * torch.randn_like(param))  # peakier logits: no near-ties in argmax
    hf_model.save_pretrained(tmp_path)
    model, params = _load(tmp_path)
    prompts = [[5, 17, 99, 3, 42], [7, 8]]
    ours = greedy_generate(model, params, prompts, max_new_tokens=6, stop_ids=[])
    for prompt, generated in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=6, min_new_tokens=6
            )
        assert generated == out[0, len(prompt) :].tolist()


# --- KV cache against full recompute, sampling, the chat command ------------------------------


def _recompute_greedy(model, params, prompt, steps, length=16):
    """Reference decoder: one full forward per new token over a fixed [1, length] buffer (unused
    slots are segment 0, which real tokens never see), no cache; one compile."""
    forward = jax.jit(lambda p, t, s: model.apply({"params": p}, t, jnp.arange(length)[None], s))
    tokens = list(prompt)
    for _ in range(steps):
        ids = np.zeros((1, length), np.int32)
        ids[0, : len(tokens)] = tokens
        segments = (np.arange(length) < len(tokens)).astype(np.int32)[None]
        logits = forward(params, jnp.asarray(ids), jnp.asarray(segments))
        tokens.append(int(jnp.argmax(logits[0, len(tokens) - 1])))
    return tokens[len(prompt) :]


def test_kv_cache_equals_full_recompute_with_local_layers(tmp_path):
    """Gemma 3 layout (local layers with their own RoPE base, window 5 < sequence length)."""
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        max_position_embeddings=256,
    )
    hf_model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for param in hf_model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    hf_model.save_pretrained(tmp_path)
    model, params = _load(tmp_path)
    assert model.config.has_local_layers
    prompts = [[5, 17, 99, 3, 42, 11, 9], [7, 8]]
    ours = greedy_generate(model, params, prompts, max_new_tokens=8, stop_ids=[])
    for prompt, generated in zip(prompts, ours, strict=True):
        assert generated == _recompute_greedy(model, params, prompt, 8)
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=8, min_new_tokens=8
            )
        assert generated == out[0, len(prompt) :].tolist()


def test_sampling_is_seeded_and_top_p_zero_is_greedy(stories):
    model, params = stories
    prompts = [[1, 403, 407], [1]]
    greedy = generate(model, params, prompts, max_new_tokens=12, stop_ids=[])
    kwargs = dict(max_new_tokens=12, stop_ids=[], temperature=1.0)
    first = generate(model, params, prompts, **kwargs, rng=jax.random.PRNGKey(1))
    again = generate(model, params, prompts, **kwargs, rng=jax.random.PRNGKey(1))
    other = generate(model, params, prompts, **kwargs, rng=jax.random.PRNGKey(2))
    assert first == again and first != other and first != greedy
    narrow = generate(model, params, prompts, **kwargs, top_p=1e-6, rng=jax.random.PRNGKey(1))
    assert narrow == greedy


def test_sample_token_keeps_only_the_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    draws = jax.vmap(lambda k: sample_token(logits, jnp.float32(1.0), jnp.float32(0.7), k))(
        jax.random.split(jax.random.PRNGKey(0), 400)
    )
    assert set(np.unique(np.asarray(draws)).tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7


def test_generate_command_continues_a_prompt(stories_dir, golden_dir, capsys):
    golden = json.loads((golden_dir / "golden.json").read_text())["greedy_from_bos_200_text"]
    prompt = "Once upon a time"
    code = main(["--model", str(stories_dir), "--prompt", prompt, "--max-new-tokens", "30"])
    assert code == 0
    reply = capsys.readouterr().out.rstrip("\n")
    assert len(reply) > 40 and golden.startswith(prompt + reply)


def test_ctrl_c_in_the_interactive_chat_is_one_line_exit_130(stories_dir, capsys, monkeypatch):
    """`python -m sft_jax.generate` ends like the `sft-jax generate` wrapper: no traceback."""
    prompts = iter(["Once upon a time"])

    def typed(prompt=""):
        try:
            return next(prompts)
        except StopIteration:
            raise KeyboardInterrupt from None

    monkeypatch.setattr("builtins.input", typed)
    assert main(["--model", str(stories_dir), "--max-new-tokens", "4"]) == 130
    captured = capsys.readouterr()
    assert captured.out.strip()  # the first turn was answered
    assert captured.err.strip() == "generate: interrupted"


def test_chat_helpers_do_not_import_the_decoder():
    """The command in sft_jax/generate.py imports the conversation helpers of sft_jax/chat.py,
    never the reverse: the two modules form no import cycle."""
    import ast
    import pathlib

    source = pathlib.Path(__file__).resolve().parents[1] / "sft_jax" / "chat.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
    assert "sft_jax.generate" not in imported, sorted(imported)


@pytest.mark.parametrize(
    "flag, value, want",
    [
        ("--temperature", "-1", "--temperature must be >= 0"),
        ("--temperature", "nan", "--temperature must be >= 0"),
        ("--top-p", "2", "--top-p must be in [0, 1]"),
        ("--max-new-tokens", "-5", "--max-new-tokens must be >= 0"),
    ],
)
def test_bad_sampling_flags_exit_2_naming_the_flag(tmp_path, capsys, flag, value, want):
    """Checked before the model loads; they used to reach decode and end in a traceback (exit 1)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path / "never_loaded"), "--prompt", "hi", flag, value])
    assert exit_info.value.code == 2
    assert want in capsys.readouterr().err
