"""Path-wise rewinding on two axes: the choice rule over a trajectory (task validation loss,
retention = general-text loss against the base model's), its config checks, and a tiny run that
records the trajectory and choice in summary.json and exports the chosen step."""

import pathlib

import numpy as np
import pytest

from sft_jax.config import ConfigError, parse
from sft_jax.config_file import load_config_file
from sft_jax.evaluation.rewind import choose

REPO = pathlib.Path(__file__).resolve().parents[1]
GENERAL = str(REPO / "sft_jax" / "assets" / "general" / "stories.txt")
TRAJECTORY = [
    {"step": 2, "eval_loss": 3.0, "general_loss": 5.00},
    {"step": 4, "eval_loss": 2.5, "general_loss": 5.04},
    {"step": 6, "eval_loss": 2.2, "general_loss": 5.20},
    {"step": 8, "eval_loss": 2.4, "general_loss": 5.30},
]


def test_eval_loss_rule_takes_the_lowest_validation_loss():
    decision = choose(TRAJECTORY, "eval_loss")
    assert decision["chosen_step"] == 6 and decision["rule"] == "eval_loss"
    tie = [{"step": 4, "eval_loss": 1.0}, {"step": 2, "eval_loss": 1.0}]
    assert choose(tie, "eval_loss")["chosen_step"] == 2  # ties: the earlier step


def test_retention_rule_takes_the_best_task_loss_within_tolerance():
    decision = choose(TRAJECTORY, "retention", base_general_loss=4.98, tolerance=0.1)
    assert decision["chosen_step"] == 4  # step 6 has a lower eval loss but forgot too much
    assert [p["eligible"] for p in decision["trajectory"]] == [True, True, False, False]
    assert decision["base_general_loss"] == 4.98 and decision["tolerance"] == 0.1
    loose = choose(TRAJECTORY, "retention", base_general_loss=4.98, tolerance=1.0)
    assert loose["chosen_step"] == 6
    none = choose(TRAJECTORY, "retention", base_general_loss=4.0, tolerance=0.1)
    assert none["chosen_step"] == 2 and "no checkpoint within" in none["reason"]
    unknown = choose(TRAJECTORY, "retention", base_general_loss=None, tolerance=0.1)
    assert unknown["chosen_step"] == 6 and "no baseline" in unknown["reason"]
    with pytest.raises(ValueError, match="no kept checkpoint"):
        choose([], "retention", base_general_loss=1.0)


def test_task_rule_by_generation_score_takes_the_highest():
    points = [{**p, "generation": g} for p, g in zip(TRAJECTORY, (0.1, 0.6, 0.6, 0.9), strict=True)]
    decision = choose(points, "task", metric="generation")
    assert decision["chosen_step"] == 8 and decision["metric"] == "generation"
    assert "highest generation score" in decision["reason"]
    assert choose(points[:3], "task", metric="generation")["chosen_step"] == 4  # tie: earlier
    within = choose(points, "retention", metric="generation", base_general_loss=4.98, tolerance=0.1)
    assert within["chosen_step"] == 4  # steps 6 and 8 score higher but forgot too much
    with pytest.raises(ValueError, match="generation score at every point"):
        choose(TRAJECTORY, "task", metric="generation")
    with pytest.raises(ValueError, match="rewind metric"):
        choose(TRAJECTORY, "task", metric="bleu")


def test_knee_rule_takes_the_front_point_nearest_the_ideal_corner():
    # Step 8 is dominated by step 6 (worse on both axes); of the front 2, 4, 6 scaled to [0, 1]
    # on both axes, step 4 sits at (0.625, 0.2), nearer (0, 0) than 2 at (1, 0) or 6 at (0, 1).
    decision = choose(TRAJECTORY, "knee")
    assert decision["chosen_step"] == 4 and decision["rule"] == "knee"
    assert [p["pareto"] for p in decision["trajectory"]] == [True, True, True, False]
    one = [{"step": 3, "eval_loss": 1.0, "general_loss": 2.0}]
    assert choose(one, "knee")["chosen_step"] == 3
    # Without a general-text loss at every point the knee is undefined: the task rule, said so.
    partial = choose([*TRAJECTORY, {"step": 10, "eval_loss": 0.1}], "knee")
    assert partial["chosen_step"] == 10 and "no general-text loss" in partial["reason"]


def test_rewind_metric_and_knee_rule_config_checks(small_train):
    raw = _tiny(small_train, rewind_metric="generation", rewind_to_best=True)
    raw.eval.generate_examples = 0
    with pytest.raises(ConfigError, match=r"checkpoint\.rewind_metric.*generate_examples"):
        parse(raw)
    raw.checkpoint.rewind_metric = "bleu"
    with pytest.raises(ConfigError, match=r"checkpoint\.rewind_metric"):
        parse(raw)
    raw.checkpoint.rewind_metric = "eval_loss"
    raw.checkpoint.rewind_rule = "knee"
    with pytest.raises(ConfigError, match=r"checkpoint\.rewind_rule.*general_text_files"):
        parse(raw)
    raw.eval.general_text_files = GENERAL
    assert parse(raw).checkpoint.rewind_rule == "knee"


def _tiny(small_train, **checkpoint):
    raw = load_config_file(str(REPO / "configs" / "tiny.py"))
    raw.data.train_files = small_train
    raw.train.max_steps = 8
    raw.optim.learning_rate = 3e-2
    for key, value in checkpoint.items():
        raw.checkpoint[key] = value
    return raw


def test_retention_rule_needs_general_text_and_rewind(small_train):
    raw = _tiny(small_train, rewind_rule="retention", rewind_to_best=True)
    with pytest.raises(ConfigError, match=r"eval\.general_text_files"):
        parse(raw)
    raw.eval.general_text_files = GENERAL
    raw.checkpoint.rewind_to_best = False
    with pytest.raises(ConfigError, match="rewind_to_best"):
        parse(raw)
    raw.checkpoint.rewind_to_best = True
    raw.checkpoint.rewind_tolerance = -1.0
    with pytest.raises(ConfigError, match="rewind_tolerance"):
        parse(raw)


@pytest.mark.slow  # a tiny training run with four kept checkpoints, each evaluated twice
def test_run_records_trajectory_and_exports_the_choice(small_train, tmp_path):
    from sft_jax.api import load_workdir
    from sft_jax.export import resolve_step
    from sft_jax.train import train_and_evaluate
    from sft_jax.training.metrics import read_metrics

    raw = _tiny(
        small_train,
        every_steps=2,
        keep=4,
        rewind_to_best=True,
        rewind_rule="retention",
        rewind_tolerance=0.02,
    )
    raw.eval.general_text_files = GENERAL
    raw.eval.generate_examples, raw.eval.max_new_tokens = 4, 4
    summary = train_and_evaluate(parse(raw), str(tmp_path))
    decision = summary["rewind"]
    records = read_metrics(str(tmp_path))
    baseline = next(r for r in records if r.get("kind") == "baseline")["before"]
    assert decision["base_general_loss"] == baseline["general_loss"]
    points = {p["step"]: p for p in decision["trajectory"]}
    assert sorted(points) == [2, 4, 6, 8]
    # The last checkpoint's general-text loss is the final forgetting check's, measured apart.
    final = next(r for r in records if r.get("kind") == "general_after")
    np.testing.assert_allclose(points[8]["general_loss"], final["general_loss"], rtol=1e-6)
    expected = choose(
        [{k: p[k] for k in ("step", "eval_loss", "general_loss")} for p in points.values()],
        "retention",
        base_general_loss=baseline["general_loss"],
        tolerance=0.02,
    )
    assert summary["best_step"] == decision["chosen_step"] == expected["chosen_step"]
    assert summary["kept_general_losses"] == {str(s): p["general_loss"] for s, p in points.items()}
    # The generation score is part of every point; the last one's is the final generation's.
    final_generation = next(r for r in records if r.get("kind") == "generation_after")
    assert points[8]["generation"] == final_generation["accuracy"]
    assert summary["kept_generation_scores"] == {str(s): p["generation"] for s, p in points.items()}
    assert decision["generation_match"] == "exact"
    best = resolve_step(str(tmp_path), "best")
    assert best == summary["best_step"]
    assert load_workdir(str(tmp_path), best).step == best
