"""`python -m sft_jax.data audit` reports what it promises, and dropped examples are named."""

import json
import pathlib

import pytest

from sft_jax.data.__main__ import main as data_cli

DEMO = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py")
LONG = " ".join(["word"] * 200)
TEMPLATE = (  # turns end in a newline (stories260K has no single-token chatml end of turn)
    "{{ bos_token }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)


def chat(*turns):
    roles = ["user", "assistant"] * len(turns)
    return {"messages": [{"role": r, "content": t} for r, t in zip(roles, turns, strict=False)]}


ROWS = [
    chat("What is 2 + 2?", "4."),  # 1
    chat("Say hi.", ""),  # 2: an empty answer (a run refuses it)
    chat("What is 2 + 2?", "Five."),  # 3: contradicts row 1
    chat("Quote it.", "It ends with </s> here."),  # 4: special-token text
    chat(LONG, "A fine answer."),  # 5: last turn cut off at seq_len (last_assistant)
    chat("What is 2 + 2?", "4."),  # 6: duplicate of row 1
]


@pytest.fixture
def audited(tmp_path, stories_dir, capsys):
    path, template = tmp_path / "d.jsonl", tmp_path / "t.jinja"
    template.write_text(TEMPLATE)
    lines = [json.dumps(r) for r in ROWS]
    lines.insert(6, "{not json")  # line 7: unreadable
    path.write_text("\n".join(lines) + "\n")
    args = [
        f"--config.data.train_files={path}",
        f"--config.data.tokenizer={stories_dir}",
        f"--config.data.chat_template={template}",
        "--config.data.train_on=last_assistant",
        "--config.data.seq_len=128",
        "--config.data.eval_files=",
    ]
    assert data_cli(["audit", "--config", DEMO, *args]) == 0
    out = capsys.readouterr()
    return path, json.loads(out.out), out.err


def test_audit_counts_empty_answers_instead_of_aborting(audited):
    path, report, _ = audited
    assert report["empty_or_placeholder"]["count"] == 1
    assert report["empty_or_placeholder"]["examples"][0].startswith(f"{path}:2: ")
    assert report["bad_rows"]["count"] == 1 and f"{path}:7" in report["bad_rows"]["examples"][0]


def test_audit_names_both_contradicting_rows_and_duplicates(audited):
    path, report, _ = audited
    assert report["contradictory"] == {"count": 1, "examples": [f"{path}:1 vs {path}:3"]}
    assert report["duplicates"]["examples"] == [f"{path}:6 = {path}:1"]


def test_audit_reports_drops_and_special_token_text(audited):
    path, report, _ = audited
    assert report["dropped"]["count"] == 1
    assert report["dropped"]["examples"][0].startswith(f"{path}:5 (no trained token")
    assert report["overlong"]["examples"] == [f"{path}:5"]
    assert (
        report["control_text"]["count"] == 1 and "'</s>'" in report["control_text"]["examples"][0]
    )


def test_audit_prints_a_readable_summary_beside_the_json(audited):
    path, report, err = audited
    assert "audit of 5 training and 0 held-out examples" in err
    assert "prompts with contradictory answers [contradictory]" in err
    assert f"{path}:1 vs {path}:3" in err and err.count("\n") >= len(report)


def test_training_summary_names_a_dropped_conversation(tmp_path, stories_dir, caplog):
    """last_assistant + truncate: a conversation whose last turn lies past seq_len is dropped;
    it is named in the data summary like every other drop, not only counted."""
    from configs import base
    from sft_jax.config import parse
    from sft_jax.data import prepare_data

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(chat(LONG, "A fine answer.")) + "\n" + json.dumps(ROWS[0]) + "\n")
    c = base.get_config()
    c.data.tokenizer = str(stories_dir)
    c.data.train_files = str(path)
    c.data.chat_template = str(tmp_path / "t.jinja")
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    c.data.train_on = "last_assistant"
    c.data.seq_len = 64
    with caplog.at_level("WARNING"):
        stats = prepare_data(parse(c)).stats
    assert stats["dropped"] == 1 and stats["examples"] == 1
    assert "1 example(s) dropped" in caplog.text
    assert f"{path}:1 (no trained token within seq_len=64)" in caplog.text
