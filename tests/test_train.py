"""End to end: the tiny config trains and its loss falls; the demo runs (shortened) and learns."""

import json
import pathlib

import pytest

from sft_jax.config import load_config_file, parse
from sft_jax.metrics import read_metrics
from sft_jax.train import train_and_evaluate

REPO = pathlib.Path(__file__).resolve().parents[1]


def config(name: str, **overrides):
    raw = load_config_file(str(REPO / "configs" / name))
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        raw[section][key] = value
    return parse(raw)


def test_tiny_trains_and_writes_metrics(tmp_path):
    summary = train_and_evaluate(config("tiny.py"), str(tmp_path))
    records = read_metrics(str(tmp_path))
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [4, 8, 12]
    for r in train:
        assert {"loss", "learning_rate", "grad_norm", "tokens_per_s", "loss_tokens"} <= set(r)
        assert r["tokens_per_s"] > 0
    assert train[-1]["loss"] < train[0]["loss"] - 0.5, train
    evals = [r for r in records if "eval_loss" in r]
    assert evals and evals[-1]["step"] == 12
    assert summary["steps"] == 12
    assert (tmp_path / "checkpoints" / "12").is_dir()
    assert json.loads((tmp_path / "config.json").read_text())["train"]["max_steps"] == 12


def test_restart_after_finish_resumes_and_extends(tmp_path):
    train_and_evaluate(config("tiny.py", train__max_steps=6, train__log_every=2), str(tmp_path))
    summary = train_and_evaluate(
        config("tiny.py", train__max_steps=8, train__log_every=2), str(tmp_path)
    )
    steps = [r["step"] for r in read_metrics(str(tmp_path)) if "loss" in r]
    assert steps == [2, 4, 6, 8]  # the second run started from the step-6 checkpoint
    assert summary["steps"] == 8


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
