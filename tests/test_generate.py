"""Greedy generation: stories260K golden continuation, batching invariance, HF parity."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from sft_jax import hf
from sft_jax.generate import greedy_generate
from sft_jax.model import Transformer


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
