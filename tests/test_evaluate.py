"""Evaluation pieces: match rules (exact, contains, regex), config checks of eval.match and
eval.answer_regex, token accuracy summed over the split, general-text loading, the baseline
read-back and before/after comparison, and the records the run's evaluator writes."""

import dataclasses
import json
import pathlib
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sft_jax import console, data
from sft_jax.config import ConfigError, parse
from sft_jax.config_file import load_config_file
from sft_jax.evaluation.eval_loop import Evaluator, comparison, format_comparison, read_baseline
from sft_jax.evaluation.evaluate import (
    answer_matches,
    evaluate_loss,
    extract_answer,
    general_text_batches,
    make_eval_step,
    read_general_texts,
    score_generations,
)
from sft_jax.training.metrics import MetricsWriter, read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
GSM8K = re.compile(r"####\s*(-?[\d,.]+)")


def tiny(seq_len: int | None = None, **eval_overrides):
    raw = load_config_file(str(REPO / "configs" / "tiny.py"))
    for key, value in eval_overrides.items():
        raw["eval"][key] = value
    if seq_len is not None:
        raw["data"]["seq_len"] = raw["data"]["pack_window"] = seq_len
    return parse(raw)


# ----------------------------------------------------------------------------- match rules


def test_exact_and_contains():
    assert answer_matches("  red\n", " red", "exact")
    assert not answer_matches("red ball", " red", "exact")
    assert answer_matches("the red ball", " red", "contains")
    assert not answer_matches("the blue ball", " red", "contains")


def test_regex_compares_captures_gsm8k():
    reference = "She sells 16 - 3 - 4 = 9 eggs.\n#### 18"
    assert answer_matches("9 * 2 = 18 dollars.\n#### 18", reference, "regex", GSM8K)
    assert not answer_matches("#### 19", reference, "regex", GSM8K)
    assert not answer_matches("the answer is 18", reference, "regex", GSM8K)  # no match: wrong
    assert not answer_matches("#### 1,000", "#### 1000", "regex", GSM8K)  # strings, not numbers
    assert answer_matches("#### 5\n#### 7", "#### 5", "regex", GSM8K)  # the first match counts


def test_regex_reference_without_match_is_taken_whole():
    assert answer_matches("so #### 72", " 72 ", "regex", GSM8K)
    assert not answer_matches("so #### 71", "72", "regex", GSM8K)


def test_regex_without_group_uses_whole_match():
    pattern = re.compile(r"\d+")
    assert extract_answer("about 42 apples", pattern) == "42"
    assert extract_answer("none", pattern) is None
    assert answer_matches("x 42 y", "42", "regex", pattern)


def test_score_generations_several_rules_and_primary():
    outputs = [" red", " a red ball", "#### 3"]
    references = [" red", " red", "#### 3"]
    scores, correct = score_generations(outputs, references, ("exact", "contains"))
    assert scores == {"generation_exact": pytest.approx(2 / 3), "generation_contains": 1.0}
    assert correct == [True, False, True]  # under the first rule, exact
    scores, correct = score_generations(outputs, references, ("contains", "regex"), GSM8K)
    assert correct == [True, True, True]
    # Two references have no "####": taken whole; " red" is not in the output's capture (none).
    assert scores["generation_regex"] == pytest.approx(1 / 3)
    assert scores["regex_unmatched_references"] == 2.0


# ----------------------------------------------------------------------------- config checks


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"match": "exact,fuzzy"}, r"eval\.match.*unknown: fuzzy"),
        ({"match": "exact,exact"}, r"eval\.match.*distinct"),
        ({"match": " , "}, r"eval\.match"),
        ({"match": "regex"}, r"eval\.answer_regex' must be set"),
        ({"match": "regex", "answer_regex": "####(\\d"}, r"answer_regex.*does not compile"),
        ({"samples": -1}, r"eval\.samples"),
    ],
)
def test_bad_eval_config_is_a_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny(**overrides)


def test_match_list_is_parsed_in_order():
    config = tiny(match=" contains, regex ,exact", answer_regex=r"####\s*(\d+)")
    assert config.eval.matches == ("contains", "regex", "exact")


# ----------------------------------------------------------------------------- loss and accuracy


def echo_eval_step():
    """The jitted eval step of a model that predicts each input token itself (vocabulary 4)."""
    replicated = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("data",)), PartitionSpec())

    def apply_fn(variables, inputs, positions, segment_ids):
        return jax.nn.one_hot(inputs, 4) * 10.0

    return make_eval_step(apply_fn, replicated, replicated)


def batch(inputs, targets, mask):
    inputs = np.asarray([inputs], np.int32)
    return {
        "inputs": inputs,
        "targets": np.asarray([targets], np.int32),
        "loss_mask": np.asarray([mask], bool),
        "segment_ids": np.ones_like(inputs),
        "positions": np.arange(inputs.shape[1], dtype=np.int32)[None],
    }


BATCHES = [
    batch([1, 2, 3, 0], [1, 0, 0, 0], [1, 0, 0, 0]),  # 1 of 1 right
    batch([1, 2, 3, 0], [1, 1, 1, 1], [1, 1, 1, 0]),  # 1 of 3 right
]


def test_token_accuracy_is_summed_over_the_split_then_divided_once():
    """Two batches with 1 of 1 and 1 of 3 loss tokens right: 2/4, not the mean of 1.0 and 1/3."""
    step, batches = echo_eval_step(), BATCHES
    result = evaluate_loss(step, {"w": jnp.zeros(())}, batches, lambda b: b)
    assert result["eval_tokens"] == 4.0
    assert result["eval_token_accuracy"] == pytest.approx(0.5)
    assert result["eval_perplexity"] == pytest.approx(np.exp(result["eval_loss"]), rel=1e-6)
    general = evaluate_loss(step, {"w": jnp.zeros(())}, batches, lambda b: b, prefix="general")
    assert set(general) == {
        "general_loss",
        "general_perplexity",
        "general_token_accuracy",
        "general_tokens",
    }


# ----------------------------------------------------------------------------- general text


def test_general_text_plain_and_jsonl(tmp_path):
    text = tmp_path / "stories.txt"
    text.write_text("One.\nStill one.\n\n\nTwo.\n", encoding="utf-8")
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text(json.dumps({"text": "Three."}) + "\n", encoding="utf-8")
    texts = read_general_texts(f"{text},{jsonl}")
    assert [t.text for t in texts] == ["One.\nStill one.", "Two.", "Three."]
    assert texts[0].source.endswith("stories.txt:1") and texts[1].source.endswith("stories.txt:5")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(data.DataError, match="holds no text"):
        read_general_texts(str(empty))
    with pytest.raises(data.DataError, match="does not exist"):
        read_general_texts(str(tmp_path / "missing.txt"))


def test_bundled_general_text_is_fully_scored():
    """Every token of every story (BOS excluded, EOS included) is in the loss: rows of 512 hold a
    whole story (at seq_len 256 the demo splits long ones, losing one target per cut)."""
    config = tiny(512, general_text_files=str(REPO / "sft_jax/assets/general/stories.txt"))
    tokenizer = data.load_tokenizer(config.data.tokenizer)
    batches = general_text_batches(config, tokenizer)
    texts = read_general_texts(config.eval.general_text_files)
    expected = sum(len(tokenizer(t.text, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
    assert len(texts) == 14
    assert sum(int(b["loss_mask"].sum()) for b in batches) == expected
    assert general_text_batches(tiny(), tokenizer) == []


# ----------------------------------------------------------------------------- baseline, comparison


def test_read_baseline_takes_the_first_baseline_record_and_comparison(tmp_path):
    records = [
        {"step": 0, "kind": "start", "run": 0},
        {"step": 0, "kind": "baseline", "run": 0, "before": {"eval_loss": 2.0}},
        {"step": 4, "kind": "eval", "run": 0, "eval_loss": 1.0},
        {"step": 4, "kind": "start", "run": 1},
        {"step": 0, "kind": "baseline", "run": 1, "before": {"eval_loss": 9.0}},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert read_baseline(str(tmp_path)) == {"eval_loss": 2.0}
    assert read_baseline(str(tmp_path / "nowhere")) is None
    rows = comparison(
        {"eval_loss": 2.0, "generation_exact": 0.0},
        {"eval_loss": 1.0, "generation_exact": 1.0, "general_perplexity": 9.0},
        ("exact",),
    )
    assert rows == [
        {"metric": "eval_loss", "before": 2.0, "after": 1.0},
        {"metric": "generation_exact", "before": 0.0, "after": 1.0},
        {"metric": "general_perplexity", "before": None, "after": 9.0},
    ]
    table = format_comparison(rows)
    assert "n/a" in table and "general_perplexity" in table and "1.0000" in table


# ----------------------------------------------------------------------------- the evaluator


def test_evaluator_writes_each_evaluation_as_its_own_record(tmp_path, capsys):
    """The baseline, a periodic eval and the final evaluations each write their record kind at
    their step with the run number (an eval record keeps "run" last); a restart reads the baseline
    back instead of measuring; without a validation split the final validation merges nothing."""
    merged = []

    def inference_params(state):
        merged.append(state.step)
        return {"w": jnp.zeros(())}

    def never(state):
        raise AssertionError("nothing should be measured")

    writer = MetricsWriter(str(tmp_path))
    evaluator = Evaluator(
        config=tiny(generate_examples=0),
        model=None,
        tokenizer=None,
        template=None,
        validation_batches=BATCHES,
        general_batches=BATCHES[:1],
        prompts=[],
        place=lambda b: b,
        eval_step=echo_eval_step(),
        inference_params=inference_params,
        writer=writer,
        run_number=2,
        workdir=str(tmp_path),
    )
    before = evaluator.baseline(types.SimpleNamespace(step=0))
    evaluator.periodic(types.SimpleNamespace(step=3), 3, with_samples=True)
    after = evaluator.final_validation(types.SimpleNamespace(step=4), 4)
    assert evaluator.final_generation({"w": jnp.zeros(())}, 4) is None  # generation is off
    general = evaluator.final_general_text({"w": jnp.zeros(())}, 4)
    records = read_metrics(str(tmp_path))
    assert [(r["kind"], r["step"], r["run"]) for r in records] == [
        ("baseline", 0, 2),
        ("eval", 3, 2),
        ("eval", 4, 2),
        ("general_after", 4, 2),
    ]
    assert list(records[1])[2:] == [
        "kind",
        "eval_loss",
        "eval_perplexity",
        "eval_token_accuracy",
        "eval_tokens",
        "run",
    ]
    assert merged == [0, 3, 4]
    assert after["eval_token_accuracy"] == pytest.approx(0.5) and after["eval_tokens"] == 4.0
    assert general["general_tokens"] == 1.0 and general["general_token_accuracy"] == 1.0
    assert before == records[0]["before"] and before["eval_loss"] == after["eval_loss"]
    out = capsys.readouterr().out
    assert "evaluating the model before training (compiles the evaluation) ..." in out
    assert "step 3: eval_loss " in out and ", token accuracy 0.5000" in out

    restarted = dataclasses.replace(evaluator, inference_params=never)
    assert restarted.baseline(types.SimpleNamespace(step=0)) == before
    unsplit = dataclasses.replace(evaluator, validation_batches=[], inference_params=never)
    assert not unsplit.has_validation and unsplit.final_validation(None, 5) == {}
    assert len(read_metrics(str(tmp_path))) == 4
    console.reset()
