"""Every config file loads and parses; typos and bad values fail with a helpful message."""

import pathlib
import subprocess
import sys

import pytest

from sft_jax.config import ConfigError, parse
from sft_jax.config_file import load_config_file
from sft_jax.configs import base
from sft_jax.train import load_config_from_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(
    p for p in (REPO / "configs").rglob("*.py") if p.name not in ("__init__.py", "base.py")
)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_file_loads(path):
    config = parse(load_config_file(str(path)))
    assert config.data.seq_len >= 8


def test_base_has_every_key_but_no_data():
    with pytest.raises(ConfigError, match=r"data\.train_files"):
        parse(base.get_config())


def test_unknown_key_names_closest():
    raw = load_config_file(str(REPO / "configs/tiny.py")).to_dict()
    raw["optim"]["learning_rat"] = 1.0
    with pytest.raises(ConfigError, match=r"did you mean 'optim\.learning_rate'"):
        parse(raw)


def test_missing_key_and_wrong_type_and_range():
    raw = load_config_file(str(REPO / "configs/tiny.py")).to_dict()
    del raw["train"]["epochs"]
    with pytest.raises(ConfigError, match=r"missing config key 'train\.epochs'"):
        parse(raw)
    raw = load_config_file(str(REPO / "configs/tiny.py")).to_dict()
    raw["train"]["global_batch_size"] = "8"
    with pytest.raises(ConfigError, match="must be an integer"):
        parse(raw)
    raw = load_config_file(str(REPO / "configs/tiny.py")).to_dict()
    raw["model"]["dtype"] = "float16"
    with pytest.raises(ConfigError, match="choose one of"):
        parse(raw)


def test_command_line_override_and_typo():
    config, workdir = load_config_from_flags(
        [
            "prog",
            f"--config={REPO}/configs/tiny.py",
            "--workdir=/tmp/x",
            "--config.optim.learning_rate=0.5",
        ]
    )
    assert config.optim.learning_rate == 0.5 and workdir == "/tmp/x"
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config_from_flags(
            [
                "prog",
                f"--config={REPO}/configs/tiny.py",
                "--workdir=/tmp/x",
                "--config.optim.learning_rat=0.5",
            ]
        )


def test_cli_typo_exits_2_before_compute(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sft_jax.train",
            "--config",
            str(REPO / "configs/tiny.py"),
            "--workdir",
            str(tmp_path / "w"),
            "--config.optim.learning_rat=0.5",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "learning_rate" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("optim", "weight_decay", -1.0),
        ("optim", "eps", 0.0),
        ("optim", "warmup_steps", -5),
        ("lora", "alpha", -2.0),
        ("data", "max_eval_examples", -1),  # used to drop the last held-out example
        ("optim", "learning_rate", 1e39),  # inf in float32: every update non-finite
        ("optim", "learning_rate", float("inf")),
    ],
)
def test_out_of_range_values_are_refused(section, key, value):
    raw = load_config_file(str(REPO / "configs/tiny.py")).to_dict()
    raw[section][key] = value
    with pytest.raises(ConfigError, match=rf"'{section}\.{key}' must be"):
        parse(raw)
