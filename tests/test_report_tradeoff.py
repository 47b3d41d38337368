"""The report's stability-plasticity chart, from synthetic workdirs: the rewind's kept checkpoints
(summary.json "rewind"), the end of a run only (general_after), a run without general text, and
(slow) a real tiny run with the retention rewind."""

import json
import pathlib

import pytest

from sft_jax import report
from sft_jax.report import tradeoff as report_tradeoff

REPO = pathlib.Path(__file__).resolve().parents[1]
TITLE = "Stability-plasticity: validation loss vs general-text perplexity"
BASELINE = {"eval_loss": 9.24, "eval_perplexity": 10328.0, "general_loss": 1.643}


def write_run(path, *, baseline, summary, general_after=None):
    records = [{"step": 0, "kind": "start", "run": 0, "resumed_from": 0}]
    records.append({"step": 0, "kind": "baseline", "run": 0, "before": baseline})
    for step in (4, 8, 12):
        records.append({"step": step, "loss": 3.0 / step, "learning_rate": 1e-3, "run": 0})
    records.append({"step": 12, "kind": "eval", "eval_loss": 0.25, "eval_token_accuracy": 0.9,
                    "run": 0})  # fmt: skip
    if general_after is not None:
        records.append({"step": 12, "kind": "general_after", "general_loss": general_after,
                        "general_perplexity": "nan", "run": 0})  # fmt: skip
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def rewind_summary():
    trajectory = [
        {"step": 4, "eval_loss": 2.0, "general_loss": 1.66, "eligible": True},
        {"step": 8, "eval_loss": 0.9, "general_loss": 2.5, "eligible": False},
        {"step": 12, "eval_loss": 0.25, "general_loss": "nan", "eligible": False},  # skipped
    ]
    rewind = {"rule": "retention", "chosen_step": 4, "reason": "...", "tolerance": 0.05,
              "base_general_loss": 1.643, "trajectory": trajectory}  # fmt: skip
    return {"steps": 12, "stopped": "finished", "eval_loss": 0.25, "best_step": 4,
            "rewind": rewind}  # fmt: skip


def test_rewind_trajectory_is_charted_with_base_and_choice(tmp_path):
    write_run(tmp_path, baseline=BASELINE, summary=rewind_summary(), general_after=8.0)
    got = report_tradeoff.tradeoff_of(report.load_run(str(tmp_path)))
    assert got.source == "rewind" and got.chosen_step == 4
    assert abs(got.limit_general_loss - 1.693) < 1e-9
    assert got.base == {"eval_loss": 9.24, "general_loss": 1.643}
    assert [(p["step"], p["eval_loss"], p["general_loss"]) for p in got.points] == [
        (4, 2.0, 1.66),
        (8, 0.9, 2.5),
    ]
    page = pathlib.Path(report.build_report(str(tmp_path))).read_text()
    assert f'alt="{TITLE}"' in page and "No stability-plasticity chart" not in page
    png = (tmp_path / "report" / "tradeoff.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10000


def test_a_rewind_by_generation_score_charts_that_score(tmp_path):
    summary = rewind_summary()
    summary["rewind"].update(metric="generation", generation_match="exact")
    for point, score in zip(summary["rewind"]["trajectory"], (0.4, 0.9, 1.0), strict=True):
        point["generation"] = score
    baseline = {**BASELINE, "generation_exact": 0.0}
    write_run(tmp_path, baseline=baseline, summary=summary)
    got = report_tradeoff.tradeoff_of(report.load_run(str(tmp_path)))
    assert got.metric == "generation" and got.base["generation"] == 0.0
    assert [p["generation"] for p in got.points] == [0.4, 0.9]
    page = pathlib.Path(report.build_report(str(tmp_path))).read_text()
    assert 'alt="Stability-plasticity: generation score vs general-text perplexity"' in page
    assert (tmp_path / "report" / "tradeoff.png").read_bytes().startswith(b"\x89PNG")


def test_without_a_rewind_the_end_of_the_run_is_the_point(tmp_path):
    summary = {"steps": 12, "stopped": "finished", "eval_loss": 0.25}
    write_run(tmp_path, baseline=BASELINE, summary=summary, general_after=8.0)
    got = report_tradeoff.tradeoff_of(report.load_run(str(tmp_path)))
    assert got.source == "final" and got.chosen_step is None and got.limit_general_loss is None
    assert got.points == [{"step": 12, "eval_loss": 0.25, "general_loss": 8.0}]
    assert [c.filename for c in report.make_charts(report.load_run(str(tmp_path)))][-1] == (
        "tradeoff.png"
    )


def test_a_run_without_general_text_says_so_instead_of_an_empty_chart(tmp_path):
    baseline = {"eval_loss": 9.24, "eval_perplexity": 10328.0}
    summary = {"steps": 12, "stopped": "finished", "eval_loss": 0.25, "best_step": 12,
               "rewind": {"rule": "eval_loss", "chosen_step": 12, "reason": "lowest",
                          "trajectory": [{"step": 12, "eval_loss": 0.25}]}}  # fmt: skip
    write_run(tmp_path, baseline=baseline, summary=summary)
    data = report.load_run(str(tmp_path))
    assert report_tradeoff.tradeoff_of(data) is None
    assert "tradeoff.png" not in [c.filename for c in report.make_charts(data)]
    page = pathlib.Path(report.build_report(str(tmp_path))).read_text()
    assert "No stability-plasticity chart: the run has no general-text evaluation" in page
    assert f'alt="{TITLE}"' not in page and not (tmp_path / "report" / "tradeoff.png").exists()


@pytest.mark.slow
def test_chart_of_a_real_tiny_run_with_the_retention_rewind(tmp_path):
    """About 30 s on 2 cores: what the training run writes (baseline, summary.json's rewind) is
    what the chart reads."""
    from sft_jax.assets import asset_path
    from sft_jax.config import parse
    from sft_jax.config_file import load_config_file
    from sft_jax.train import train_and_evaluate

    raw = load_config_file(str(REPO / "configs" / "tiny.py"))
    raw.train.max_steps, raw.eval.every_steps, raw.eval.generate_examples = 4, 0, 0
    raw.eval.general_text_files = asset_path("general/stories.txt")
    raw.checkpoint.every_steps, raw.checkpoint.keep = 2, 3
    raw.checkpoint.rewind_to_best, raw.checkpoint.rewind_rule = True, "retention"
    config = parse(raw)
    summary = train_and_evaluate(config, str(tmp_path))
    got = report_tradeoff.tradeoff_of(report.load_run(str(tmp_path)))
    assert got.source == "rewind" and [p["step"] for p in got.points] == [2, 4]
    assert got.chosen_step == summary["best_step"] and got.base is not None
    tolerance = config.checkpoint.rewind_tolerance  # the default
    assert got.limit_general_loss == pytest.approx(got.base["general_loss"] + tolerance)
    page = pathlib.Path(report.build_report(str(tmp_path))).read_text()
    assert f'alt="{TITLE}"' in page and (tmp_path / "report" / "tradeoff.png").exists()
