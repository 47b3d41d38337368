"""The command line as a new user meets it: --help everywhere, one-line errors for bad config
files and flags, a config file of one's own, Ctrl-C and SIGTERM at any time, what a run prints
and where, the commands it suggests at the end, and the `sft-jax` entry point."""

import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time
import tomllib

import pytest

from sft_jax import cli, console
from sft_jax import train as train_module
from sft_jax.config import ConfigError
from sft_jax.configs import base
from sft_jax.train import load_config_from_flags, main
from sft_jax.training import faults, run_summary, train_setup

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")


# ----------------------------------------------------------------------------- --help


@pytest.mark.parametrize("module", ["train", "plan", "bench"])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_config_commands_help_lists_flags_and_every_key(module, flag, capsys):
    command = __import__(f"sft_jax.{module}", fromlist=["main"])
    assert command.main([f"sft_jax.{module}", flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m sft_jax.{module} --config FILE")
    assert "--config.SECTION.KEY=VALUE" in out
    assert "optim.learning_rate = 2e-05" in out and "peak" in out  # default and its comment
    assert "[lora] LoRA: adapters are a separate" in out  # grouped by section
    if module == "train":
        assert "--workdir" in out
    for key in cli.documented_keys()[0]:
        assert f"  {key.key} = " in out


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        ("sft_jax.data.__main__", "optim.learning_rate = 2e-05"),
        ("sft_jax.export", "--peft"),
        ("sft_jax.generate", "--temperature"),
        ("sft_jax.report", "--workdir"),
    ],
)
def test_argparse_commands_help_exits_0(module, expected, capsys):
    command = __import__(module, fromlist=["main"])
    with pytest.raises(SystemExit) as exit_info:
        command.main(["--help"])
    assert exit_info.value.code == 0
    assert expected in capsys.readouterr().out


def test_every_base_key_is_documented_once_with_a_comment():
    keys, sections = cli.documented_keys()

    def leaves(node, prefix=""):
        for name, value in node.items():
            if hasattr(value, "keys"):
                yield from leaves(value, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    assert sorted(k.key for k in keys) == sorted(leaves(base.get_config()))
    assert not [k.key for k in keys if not k.comment], "every default needs a comment"
    assert sections["model.arch"] and sections["optim"]


# ----------------------------------------------------------------------------- bad input


def test_flag_errors_keep_their_quotes():
    argv = ["prog", f"--config={TINY}", "--workdir=/tmp/x"]
    with pytest.raises(ConfigError, match=r"could not convert string to float: 'two'$"):
        load_config_from_flags([*argv, "--config.optim.learning_rate=two"])
    with pytest.raises(ConfigError, match=r"Unknown command line flag 'bogus'$"):
        load_config_from_flags([*argv, "--bogus=1"])
    with pytest.raises(ConfigError, match=r"did you mean 'optim\.learning_rate'"):
        load_config_from_flags([*argv, "--config.optim.learnin_rate=1"])


def _write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("missing.py", None, "config file not found: {path}"),
        ("configs", "<dir>", "config file {path} is a directory; name the .py file in it"),
        ("syntax.py", "def get_config(:\n    pass\n", "{path}:1: syntax error in config file"),
        (
            "wrong_type.py",
            "from sft_jax.configs import base\n\n\ndef get_config():\n"
            "    c = base.get_config()\n    c.train.max_steps = 'two'\n    return c\n",
            "{path}:6: TypeError: Could not override field 'max_steps'",
        ),
        (
            "raises.py",
            "def get_config():\n    return {}['nope']\n",
            "{path}:2: KeyError: 'nope'",
        ),
        ("no_function.py", "x = 1\n", "{path}: defines no get_config() function"),
    ],
)
def test_bad_config_file_is_one_line_and_exit_2(tmp_path, capsys, name, text, expected):
    if text == "<dir>":  # an existing directory used to be reported as "not found"
        (tmp_path / name).mkdir()
    path = str(tmp_path / name) if text in (None, "<dir>") else _write(tmp_path, name, text)
    code = main(["train", f"--config={path}", f"--workdir={tmp_path / 'w'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: " + expected.format(path=path)), err
    assert not (tmp_path / "w").exists()


def test_own_config_file_in_another_directory(tmp_path):
    """The quickstart's own config file, run from a directory outside the repository, starts
    from the packaged base config."""
    quickstart = (REPO / "docs" / "quickstart.md").read_text(encoding="utf-8")
    example = quickstart.split("```python\n# my_run.py\n", 1)[1].split("```", 1)[0]
    _write(tmp_path, "my_run.py", example)
    probe = (
        "from sft_jax.config import parse; from sft_jax.config_file import load_config_file;"
        "c = parse(load_config_file('my_run.py'));"
        "print(c.optim.learning_rate, c.data.train_files)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # the package only, as an install gives
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1e-05", "data/chat.jsonl"]


# ----------------------------------------------------------------------------- signals


def test_sigterm_during_setup_exits_42_with_a_message(tmp_path, capsys, monkeypatch):
    def setup_interrupted(config, workdir):
        # Without a handler the signal would kill the test process, not fail the test.
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler raises during the sleep
        raise AssertionError("SIGTERM was ignored during setup")

    monkeypatch.setattr(train_setup, "setup", setup_interrupted)
    code = main(["train", f"--config={TINY}", f"--workdir={tmp_path / 'w'}"])
    err = capsys.readouterr().err
    assert code == faults.EXIT_PREEMPTED, err
    assert "stopped by SIGTERM during setup" in err and "Traceback" not in err


def test_second_ctrl_c_in_the_loop_aborts_at_once():
    watcher = faults.PreemptionWatcher(phase="loop")
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert watcher.requested  # first: save at the end of the step
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    finally:
        watcher.close()


def test_keyboard_interrupt_is_one_line_exit_130(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train_and_evaluate", interrupted)
    code = main(["train", f"--config={TINY}", f"--workdir={tmp_path / 'w'}"])
    err = capsys.readouterr().err
    assert code == 130 and "second Ctrl-C" in err and "Traceback" not in err


@pytest.mark.slow  # three starts, two compiles: about 30 s on 2 idle cores
def test_ctrl_c_saves_then_resume_and_rerun_keep_the_record(
    small_train, tmp_path, capsys, monkeypatch
):
    """Ctrl-C at step 2: checkpoint 2 and exit 42. The restart finishes (record on stdout, the
    next commands for this workdir, train.log with both starts); a third start has nothing to do
    and keeps the finished run's summary (wall time, train loss)."""
    workdir = tmp_path / "w"
    argv = [
        "train",
        f"--config={TINY}",
        f"--workdir={workdir}",
        f"--config.data.train_files={small_train}",
        "--config.train.max_steps=4",
        "--config.train.log_every=2",
        "--config.data.max_eval_examples=8",
    ]
    after_step = faults.FaultInjector.after_step

    def ctrl_c_at_2(self, step):
        after_step(self, step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with monkeypatch.context() as m:
        m.setattr(faults.FaultInjector, "after_step", ctrl_c_at_2)
        assert main(argv) == faults.EXIT_PREEMPTED
    out, err = capsys.readouterr()
    assert "preempted at step 2 (SIGINT); checkpoint saved" in err and "Traceback" not in err
    assert (workdir / "checkpoints" / "2").is_dir()

    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "resumed from checkpoint at step 2" in out and "finished 4 steps" in out, out
    assert out.index("compiling the train step") < out.index("first step done")
    assert all(len(line) <= 100 for line in out.splitlines() if line.startswith(("data:", "  (")))
    assert f"python -m sft_jax.export --workdir {workdir} --out {workdir / 'hf'}" in out
    assert f"python -m sft_jax.report --workdir {workdir}" in out
    assert "resumed from checkpoint" not in err  # the record is on stdout only
    log = (workdir / "train.log").read_text(encoding="utf-8")
    assert log.count("--- start ") == 2 and "preempted at step 2 (SIGINT)" in log
    assert "finished 4 steps" in log
    first = json.loads((workdir / "summary.json").read_text())
    assert first["train_loss"] is not None

    assert main(argv) == 0
    out, _ = capsys.readouterr()
    assert "already finished at step 4" in out
    again = json.loads((workdir / "summary.json").read_text())
    assert again == first  # wall_s and train_loss of the run that trained


# ----------------------------------------------------------------------------- output


def test_loss_spike_needs_an_absolute_rise_too():
    health = faults.StepHealth(loss_ema=0.003)
    assert not health.observe(1, 0.01, False, limit=5, spike_factor=3.0, min_delta=0.5)
    health = faults.StepHealth(loss_ema=2.0)
    assert health.observe(1, 7.0, False, limit=5, spike_factor=3.0, min_delta=0.5)


def test_library_warnings_look_like_every_other_line(capsys):
    console.route_logging()
    logging.getLogger("sft_jax.data.source").warning("skipping bad row: %s", "a.jsonl:3")
    err = capsys.readouterr().err
    assert err == "warning: skipping bad row: a.jsonl:3\n"


def test_transformers_advice_is_silenced():
    probe = (
        "import sft_jax; from transformers.utils import logging as l;"
        "l.get_logger('transformers').warning_advice('PROBE advice')"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert "PROBE" not in done.stderr


def test_sample_prompts_are_cut_at_a_word():
    text = "Lily had a red ball. She played with it all day. Question: What color was the ball?"
    tail = run_summary.tail_words(text, 40)
    assert tail.startswith("...") and text.endswith(tail[3:])
    assert tail[3:].split()[0] in text.split()  # a whole word, not its end
    assert run_summary.tail_words("short", 40) == "short"


# ----------------------------------------------------------------------------- sft-jax


def test_sft_jax_lists_and_dispatches(capsys):
    assert cli.main([]) == 0
    listing = capsys.readouterr().out
    for name in ("train", "data", "export", "generate", "report", "plan", "bench"):
        assert f"  {name} " in listing
    assert cli.main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err
    assert cli.main(["train", "--help"]) == 0
    assert "--workdir" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["report", "--help"])
    assert exit_info.value.code == 0


def test_sft_jax_ctrl_c_in_a_command_is_one_line(capsys, monkeypatch):
    from sft_jax import report

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "main", interrupted)
    assert cli.main(["report", "--workdir", "w"]) == 130
    assert capsys.readouterr().err.strip() == "sft-jax report: interrupted"


def test_console_script_and_python_dash_m():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["scripts"]["sft-jax"] == "sft_jax.cli:main"
    done = subprocess.run(
        [sys.executable, "-m", "sft_jax"], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert "Commands:" in done.stdout and "export" in done.stdout
