"""End to end: the tiny config trains and its loss falls; the demo runs (shortened) and learns."""

import json
import pathlib
import shutil

import pytest

from sft_jax.config import parse
from sft_jax.config_file import load_config_file
from sft_jax.train import train_and_evaluate
from sft_jax.training.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]


def config(name: str, **overrides):
    raw = load_config_file(str(REPO / "configs" / name))
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        raw[section][key] = value
    return parse(raw)


EVAL_FEATURES = dict(
    eval__every_steps=3,
    eval__generate_examples=2,
    eval__samples=2,
    eval__max_new_tokens=2,
    eval__match="exact,contains",
    eval__general_text_files=str(REPO / "sft_jax" / "assets" / "general" / "stories.txt"),
)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[pathlib.Path, dict]:
    """The tiny config's 12 steps with every evaluation feature, trained once (its workdir and
    summary): the metrics test reads it, the restart test extends a copy."""
    workdir = tmp_path_factory.mktemp("tiny")
    summary = train_and_evaluate(config("tiny.py", **EVAL_FEATURES), str(workdir))
    return workdir, summary


def test_tiny_trains_and_writes_metrics(finished):
    workdir, summary = finished
    records = read_metrics(str(workdir))
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [4, 8, 12]
    for r in train:
        assert {"loss", "learning_rate", "grad_norm", "tokens_per_s", "loss_tokens"} <= set(r)
        assert r["tokens_per_s"] > 0
    assert train[-1]["loss"] < train[0]["loss"] - 0.5, train
    evals = [r for r in records if "eval_loss" in r]
    assert evals and evals[-1]["step"] == 12
    assert summary["steps"] == 12
    assert (workdir / "checkpoints" / "12").is_dir()
    assert json.loads((workdir / "config.json").read_text())["train"]["max_steps"] == 12


def test_restart_after_finish_resumes_extends_and_keeps_the_baseline(finished, tmp_path):
    """A finished run restarted with more steps resumes from its last checkpoint. The evaluation
    records follow their contract (eval / samples / generation_* / general_* kinds), and the
    baseline is measured once at step 0 and stays the "before" of the extended run."""
    shutil.copytree(finished[0], tmp_path, dirs_exist_ok=True)
    first = finished[1]
    records = read_metrics(str(tmp_path))
    kinds = [(r.get("kind"), r["step"]) for r in records if r.get("kind") != "start"]
    # Step 12 twice: the periodic eval of the last step, then the final evaluation.
    assert [s for k, s in kinds if k == "eval"] == [3, 6, 9, 12, 12]
    assert [s for k, s in kinds if k == "samples"] == [0, 3, 6, 9, 12]
    assert ("baseline", 0) in kinds and ("generation_after", 12) in kinds
    assert ("general_after", 12) in kinds
    (baseline,) = [r for r in records if r.get("kind") == "baseline"]
    assert {"eval_token_accuracy", "generation_contains", "general_perplexity"} <= set(
        baseline["before"]
    )
    for r in records:
        if r.get("kind") == "eval":
            assert {"eval_loss", "eval_perplexity", "eval_token_accuracy", "eval_tokens"} <= set(r)
            assert 0.0 <= r["eval_token_accuracy"] <= 1.0 and r["run"] == 0
        if r.get("kind") == "samples":
            assert len(r["samples"]) == 2
            assert all(set(s) == {"prompt", "reference", "output", "correct"} for s in r["samples"])
        if "loss" in r:
            assert "kind" not in r
    names = [row["metric"] for row in first["comparison"]]
    assert names == [
        "eval_loss",
        "eval_perplexity",
        "eval_token_accuracy",
        "generation_exact",
        "generation_contains",
        "general_loss",
        "general_perplexity",
    ]
    rows = {row["metric"]: row for row in first["comparison"]}
    assert rows["eval_loss"]["after"] < rows["eval_loss"]["before"]
    assert rows["general_perplexity"]["after"] == first["general_perplexity"]

    second = train_and_evaluate(
        config("tiny.py", train__max_steps=16, **EVAL_FEATURES), str(tmp_path)
    )
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records if "loss" in r] == [4, 8, 12, 16]  # resumed from step 12
    assert second["steps"] == 16
    assert sum(r.get("kind") == "baseline" for r in records) == 1  # not measured again
    before = {row["metric"]: row["before"] for row in first["comparison"]}
    assert {row["metric"]: row["before"] for row in second["comparison"]} == before
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["comparison"] == second["comparison"]


@pytest.mark.slow
def test_demo_learns_the_task(tmp_path):
    """The demo, shortened: exact-match on held-out prompts rises from ~0 after fine-tuning."""
    cfg = config(
        "demo.py",
        train__epochs=1.0,
        eval__generate_examples=64,
        eval__every_steps=0,
        checkpoint__every_steps=0,
        train__progress_bar=False,
    )
    summary = train_and_evaluate(cfg, str(tmp_path))
    assert summary["accuracy_before"] <= 0.05
    assert summary["accuracy_after"] >= 0.5, summary["samples"]
    rows = {row["metric"]: row for row in summary["comparison"]}
    assert rows["generation_exact"]["after"] == summary["accuracy_after"]
    assert rows["eval_token_accuracy"]["after"] > rows["eval_token_accuracy"]["before"]
    assert rows["general_perplexity"]["before"] is not None  # the forgetting check ran
