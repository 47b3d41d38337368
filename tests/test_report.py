"""The run report: built from synthetic metrics files (restarts, old and new record kinds, missing
pieces), rendered by headless Chromium (DOM and screenshot), and built from a real tiny run."""

import json
import math
import pathlib
import shutil
import subprocess

import pytest

from sft_jax import report
from sft_jax.report import chat as report_chat
from sft_jax.report import page as report_page

REPO = pathlib.Path(__file__).resolve().parents[1]
EVIL = "<script>alert('x')</script> & <b>bold</b>"


def train_record(step, run, loss):
    return {"step": step, "loss": loss, "learning_rate": 1e-3 * step, "grad_norm": 1.0 / step,
            "tokens_per_s": 1000.0 + step, "epoch": step / 10, "run": run}  # fmt: skip


def write_jsonl(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


@pytest.fixture
def restarted_run(tmp_path):
    """Run 0 logs steps 2, 4, 6, 9 and is killed mid-line; run 1 resumes from 4, ends at 10."""
    records = [{"step": 0, "kind": "start", "run": 0, "resumed_from": 0}]
    records.append({"step": 0, "kind": "generation_before", "accuracy": 0.0,
                    "samples": [{"prompt": "Q0", "reference": "red", "output": "blue",
                                 "correct": False}]})  # fmt: skip
    records += [train_record(s, 0, 100.0 + s) for s in (2, 4, 6, 9)]  # superseded after 4
    records.append({"step": 4, "eval_loss": 3.0, "run": 0})  # an older eval record: no kind
    records.append({"step": 4, "kind": "start", "run": 1, "resumed_from": 4})
    records += [train_record(s, 1, 5.0 - s / 4) for s in (6, 8, 10)]
    records.append({"step": 8, "kind": "eval", "eval_loss": 2.0, "eval_perplexity": 7.39,
                    "eval_token_accuracy": 0.5, "run": 1})  # fmt: skip
    records.append({"step": 10, "kind": "samples", "run": 1,
                    "samples": [{"prompt": EVIL, "reference": "red", "output": EVIL,
                                 "correct": True}]})  # fmt: skip
    write_jsonl(tmp_path / "metrics.jsonl", records[:8], tail='{"step": 8, "loss"\n')
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records[8:]))
    summary = {"steps": 10, "stopped": "finished", "wall_s": 12.5, "eval_loss": 2.0,
               "comparison": [{"metric": "exact_match", "before": 0.0, "after": 0.75},
                              {"metric": "eval_loss", "before": None, "after": 2.0}]}  # fmt: skip
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    return tmp_path


def test_restarted_run_keeps_the_last_record_per_step(restarted_run):
    data = report.load_run(str(restarted_run))
    assert [(r["step"], r["run"]) for r in data.train] == [(2, 0), (4, 0), (6, 1), (8, 1), (10, 1)]
    assert [r["step"] for r in data.evals] == [4, 8]
    assert [r["kind"] for r in data.samples] == ["generation_before", "samples"]
    assert any("skipped 1 unreadable line(s) (9)" in note for note in data.notes), data.notes
    charts = report.make_charts(data)
    assert [c.filename for c in charts] == [
        "loss.png", "learning_rate.png", "grad_norm.png", "tokens_per_s.png",
        "eval_token_accuracy.png",
    ]  # fmt: skip
    assert all(c.png.startswith(b"\x89PNG") for c in charts)


def test_page_is_self_contained_and_escaped(restarted_run):
    path = pathlib.Path(report.build_report(str(restarted_run)))
    assert path == restarted_run / "report" / "index.html"
    page = path.read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert page.count('src="data:image/png;base64,') == 5
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &lt;b&gt;bold" in page
    assert "Restarted 1 time(s): run 1 from step 4." in page
    assert "<td>exact_match</td>" in page and '<td class="num">0.75</td>' in page
    assert "step 0: generation_before (accuracy 0)" in page
    for name in ("loss", "learning_rate", "grad_norm", "tokens_per_s"):
        assert (restarted_run / "report" / f"{name}.png").stat().st_size > 5000


def test_run_in_progress_says_what_is_missing(tmp_path, capsys):
    records = [{"step": 0, "kind": "baseline", "run": 0, "before": {"exact_match": 0.125}}]
    records += [train_record(2, 0, 4.0), train_record(3, 0, "nan"), train_record(4, 0, 3.5)]
    write_jsonl(tmp_path / "metrics.jsonl", records)  # "nan": how a skipped step's loss is stored
    page = pathlib.Path(report.build_report(str(tmp_path), str(tmp_path / "r.html"))).read_text()
    assert "In progress or interrupted: last logged step 4." in page
    assert "No validation records" in page and "No sample generations" in page
    assert "No summary.json: the run is in progress" in page
    assert '<table id="baseline">' in page and '<td class="num">0.125</td>' in page
    assert "Validation token accuracy" not in page and 'alt="Loss"' in page
    assert report.main(["--workdir", str(tmp_path)]) == 0  # the command line, default --out
    assert capsys.readouterr().out.strip() == str(tmp_path / "report" / "index.html")


def test_empty_and_missing_workdirs(tmp_path, capsys):
    page = pathlib.Path(report.build_report(str(tmp_path))).read_text()
    assert "metrics.jsonl not found" in page and "<img" not in page
    (tmp_path / "summary.json").write_text('{"steps": ')  # being written
    assert (
        "summary.json is unreadable" in pathlib.Path(report.build_report(str(tmp_path))).read_text()
    )
    assert report.main(["--workdir", str(tmp_path / "nope")]) == 2
    assert "workdir not found" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("x")  # exists: not reported as "not found"
    assert report.main(["--workdir", str(tmp_path / "a_file")]) == 2
    assert "is a file, not a run's directory" in capsys.readouterr().err


def test_out_that_is_not_an_html_file_is_refused_and_nothing_is_overwritten(tmp_path, capsys):
    """`--out WORKDIR/config.json` used to replace the run's config.json with the page (the run
    could no longer resume or export), and `--out DIR` ended in a traceback (exit 1)."""
    saved = '{"model": {}}'
    (tmp_path / "config.json").write_text(saved)
    for out, message in [
        (tmp_path / "config.json", "must name an .html file"),
        (tmp_path, "is a directory"),
    ]:
        assert report.main(["--workdir", str(tmp_path), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert (tmp_path / "config.json").read_text() == saved
    assert not (tmp_path / "report").exists()


def test_old_summary_accuracy_fields_still_show(tmp_path):
    write_jsonl(tmp_path / "metrics.jsonl", [train_record(2, 0, 4.0), train_record(4, 1, 3.0)])
    (tmp_path / "summary.json").write_text(
        json.dumps({"steps": 2, "accuracy_before": 0.0, "accuracy_after": 1.0})
    )
    page = pathlib.Path(report.build_report(str(tmp_path))).read_text()
    assert "<td>held-out generation accuracy</td>" in page
    assert "summary.json is from an earlier start that ended at step 2" in page
    assert "In progress or interrupted: last logged step 4." in page and "Finished" not in page


# ------------------------------------------------------------------ what the page says


def test_numbers_are_never_in_scientific_notation():
    assert report_page.fmt(10328.2821) == "10,328" and report_page.fmt(5030.37) == "5030"
    assert report_page.fmt(0.0037891) == "0.003789" and report_page.fmt(1e-5) == "0.00001"
    assert report_page.fmt(9.24264) == "9.243" and report_page.fmt(0.75) == "0.75"
    assert report_page.fmt(0.0) == "0" and report_page.fmt(1.0) == "1"
    assert report_page.fmt(-10324.0) == "-10,324" and report_page.fmt(123456) == "123,456"


@pytest.fixture
def forgetting_run(tmp_path):
    """A finished run whose general perplexity rose 1000-fold and whose samples include a chat
    prompt answered without stopping."""
    chat = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHow is the night?"
            "<|im_end|>\n<|im_start|>assistant\n")  # fmt: skip
    records = [
        {"step": 0, "kind": "baseline", "run": 0,
         "before": {"eval_loss": 9.2426, "eval_token_accuracy": 0.84}},
        train_record(2, 0, 3.0),
        {"step": 2, "kind": "eval", "eval_loss": 0.5, "eval_token_accuracy": 0.92, "run": 0},
        {"step": 2, "kind": "samples", "run": 0, "samples": [
            {"prompt": chat, "reference": " quiet.", "output": "quiet.<|im", "correct": False},
            {"prompt": "Q: color?\nA:", "reference": " red", "output": "red", "correct": True}]},
    ]  # fmt: skip
    write_jsonl(tmp_path / "metrics.jsonl", records)
    summary = {"steps": 2, "stopped": "finished", "wall_s": 3.0, "comparison": [
        {"metric": "eval_loss", "before": 10328.2821, "after": 0.0000123},
        {"metric": "generation_exact", "before": 0.0, "after": 1.0},
        {"metric": "general_loss", "before": 1.643, "after": 1.70},
        {"metric": "general_perplexity", "before": 5.17, "after": 5030.37}]}  # fmt: skip
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "config.json").write_text(json.dumps({"eval": {"match": "exact,contains"}}))
    return tmp_path


def test_before_after_table_says_direction_and_flags_forgetting(forgetting_run):
    page = pathlib.Path(report.build_report(str(forgetting_run))).read_text()
    compared = page[page.index('<table id="comparison">') :]
    compared = compared[: compared.index("</table>")]
    assert "e-0" not in compared and "e+0" not in compared, compared
    assert '<td class="num">10,328</td>' in compared and "0.0000123" in compared
    rows = {row.split("</td>")[0].split(">")[-1]: row for row in compared.split("<tr")[2:]}
    assert rows["general_perplexity"].startswith(' class="alarm"'), rows
    assert "<td>lower</td>" in rows["general_perplexity"] and "(x973)" in rows["general_perplexity"]
    assert rows["general_loss"].startswith(' class="worse"')  # +3.5%: worse, not flagged
    assert rows["generation_exact"].startswith(' class="better"')
    assert "<td>higher</td>" in rows["generation_exact"]
    assert (
        "Forgetting: on general text" in page
        and "general_perplexity went from 5.17 to 5030" in page
    )
    assert "general_loss went" not in page
    assert (
        report_page.verdict("eval_loss", 2.0, math.nan) == ""
    )  # diverged: neither better nor worse


def test_wrong_sample_says_why_and_chat_prompt_shows_turns(forgetting_run):
    page = pathlib.Path(report.build_report(str(forgetting_run))).read_text()
    assert "wrong (exact)" in page and "correct (exact)" in page
    assert "the model did not stop after the answer" in page
    assert "quiet.<mark>&lt;|im</mark>" in page  # the part after the expected answer
    roles = [part.split("<")[0] for part in page.split('<div class="role">')[1:]]
    assert roles[:5] == ["prompt", "system", "user", "assistant", "expected"], roles
    assert "(generation starts here)" in page and "&lt;|im_start|&gt;" not in page


def test_explanations_of_each_match_rule():
    why, at = report_chat.explain_sample(" school", "forest", "exact", "")
    assert "differ from the first character: expected 'school', got 'forest'" in why and at == 0
    why, at = report_chat.explain_sample("Paris", "Par", "exact", "")
    assert "stops early: 'is' is missing" in why and at == 3
    why, _ = report_chat.explain_sample("Red", "red", "exact", "")
    assert "only in letter case" in why
    why, at = report_chat.explain_sample("red", "  blue", "contains", "")
    assert "'red' does not occur in the output" in why and at is None
    why, at = report_chat.explain_sample("#### 72", "so #### 70", "regex", r"####\s*(\d+)")
    assert "extracted '70', expected '72'" in why and at == 9
    why, _ = report_chat.explain_sample("#### 72", "no idea", "regex", r"####\s*(\d+)")
    assert "finds no answer in the output" in why


def test_chat_turns_of_common_templates():
    llama = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\n")  # fmt: skip
    assert report_chat.chat_turns({"prompt": llama}) == [("user", "Hi"), ("assistant", "")]
    alpaca = "Be kind.\n\n### Instruction:\nAdd 2 and 2\n\n### Response:\n"
    assert report_chat.chat_turns({"prompt": alpaca}) == [
        ("system", "Be kind."), ("user", "Add 2 and 2"), ("assistant", "")]  # fmt: skip
    messages = [{"role": "user", "content": "Hi"}]
    assert report_chat.chat_turns({"prompt": "x", "messages": messages}) == [("user", "Hi")]
    assert report_chat.chat_turns({"prompt": "Lily had a ball.\nQuestion: ...\nAnswer:"}) is None


def test_logged_chat_prompts_keep_their_turns(shared_assets, stories_dir):
    """Samples log the prompt with the template's markers (decoding with skip_special_tokens
    left "user\nHi\nassistant\n" of a Qwen3 prompt), so the report can show the turns; a plain
    prompt reads as before, without its BOS."""
    from transformers import AutoTokenizer

    from sft_jax.evaluation.evaluate import prompt_text

    texts = {"system": "Be brief.", "user": "Hi", "assistant": "Hello."}
    chat = [{"role": r, "content": c} for r, c in texts.items()]
    chat.append({"role": "user", "content": "Bye"})
    for name in ("tok-qwen3", "tok-llama3.1-hf"):
        tokenizer = AutoTokenizer.from_pretrained(shared_assets / name)
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        turns = report_chat.chat_turns({"prompt": prompt_text(tokenizer, ids)})
        assert [role for role, _ in turns] == ["system", "user", "assistant", "user", "assistant"]
        assert [t for _, t in turns][1:] == ["Hi", "Hello.", "Bye", ""], turns
    stories = AutoTokenizer.from_pretrained(stories_dir)
    ids = stories("Tom had a car.\nAnswer:")["input_ids"]
    assert ids[0] == stories.bos_token_id and prompt_text(stories, ids) == "Tom had a car.\nAnswer:"


def test_validation_curves_start_at_the_baseline_on_honest_axes(forgetting_run, monkeypatch):
    drawn = {}

    def fake_plot(title, ylabel, lines, restarts, axis):
        drawn[title] = (lines, axis)
        return b"\x89PNG"

    monkeypatch.setattr(report, "plot", fake_plot)
    report.make_charts(report.load_run(str(forgetting_run)))
    lines, axis = drawn["Validation token accuracy"]
    assert axis == "rate" and lines[0][1:] == ([0, 2], [0.84, 0.92])
    loss_lines, _ = drawn["Loss"]
    assert loss_lines[1][1:] == ([0, 2], [9.2426, 0.5]) and "before training" in loss_lines[1][0]
    assert report.y_axis("rate", [0.84, 0.92]) == ("linear", 0.0, 1.05)
    assert report.y_axis("count", [5000.0, 15000.0])[1] == 0.0
    assert report.y_axis("loss", [9.2, 0.004])[0] == "log"
    assert report.y_axis("loss", [1.6, 0.4]) == ("linear", 0.0, pytest.approx(1.728))


# ------------------------------------------------------------------ headless Chromium


def chromium_binary():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def run_chromium(binary, tmp_path, *args):
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={tmp_path / 'chrome-profile'}",
    ]  # fmt: skip
    done = subprocess.run(
        [binary, *flags, *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow  # starts a browser; the page's HTML is checked by default above
def test_page_renders_in_headless_chromium(restarted_run, tmp_path):
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no chromium binary on PATH (.ci/run installs Debian's chromium)")
    from matplotlib.image import imread

    url = (restarted_run / "report" / "index.html").as_uri()
    report.build_report(str(restarted_run))
    dom = run_chromium(binary, tmp_path, "--dump-dom", url)
    assert dom.count("<img") == 5 and 'alt="Loss"' in dom
    assert '<table id="comparison">' in dom and '<table id="evals">' in dom
    assert "&lt;script&gt;alert" in dom and "<script>alert" not in dom
    assert 'name="viewport"' in dom and "grid-template-columns" in dom
    for width in (1280, 390):
        shot = tmp_path / f"shot{width}.png"
        run_chromium(binary, tmp_path, f"--screenshot={shot}", f"--window-size={width},1800", url)
        pixels = imread(str(shot))[..., :3]
        assert pixels.std() > 0.05, "the screenshot is blank"
        # Matplotlib's first line color (#1f77b4) only appears where a chart image was drawn.
        # Loose at phone width: the charts are scaled down there, their lines antialiased.
        blue = abs(pixels - [0x1F / 255, 0x77 / 255, 0xB4 / 255]).max(axis=-1) < 0.12
        assert blue.sum() > 200, blue.sum()
        columns = blue.any(axis=0).nonzero()[0]
        if width == 1280:  # the grid puts charts side by side: lines in both halves
            assert columns.min() < 500 and columns.max() > 800, (columns.min(), columns.max())


# ------------------------------------------------------------------ a real run


@pytest.mark.slow
def test_report_of_a_real_tiny_run(tmp_path):
    """About 30 s on 2 cores: trains configs/tiny.py for 8 steps with periodic eval and
    generation samples, then builds the report from what the run wrote."""
    from sft_jax.config import parse
    from sft_jax.config_file import load_config_file
    from sft_jax.train import train_and_evaluate

    raw = load_config_file(str(REPO / "configs" / "tiny.py"))
    raw.train.max_steps, raw.train.log_every, raw.eval.every_steps = 8, 2, 4
    raw.eval.generate_examples, raw.eval.max_new_tokens = 4, 4
    train_and_evaluate(parse(raw), str(tmp_path))
    page = pathlib.Path(report.build_report(str(tmp_path))).read_text()
    data = report.load_run(str(tmp_path))
    assert [r["step"] for r in data.train] == [2, 4, 6, 8] and len(data.evals) >= 2
    assert data.samples and data.summary is not None
    assert "Finished: 8 steps" in page and page.count("<img") >= 4
    assert "No summary.json" not in page and '<table id="evals">' in page
    for name in ("loss", "learning_rate", "grad_norm", "tokens_per_s"):
        assert (tmp_path / "report" / f"{name}.png").stat().st_size > 5000
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
