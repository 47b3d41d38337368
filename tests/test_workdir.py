"""Reading a workdir back (sft_jax/workdir.py) and the saved-config reader it relies on
(sft_jax.config.parse_section): old and malformed config.json files, steps, report records.
Fast: no model is built; the export and chat paths over a trained workdir are in test_export.py."""

import json
import pathlib
import sys
import warnings

import pytest

from sft_jax import workdir
from sft_jax.config import ConfigError, ModelSection, parse, parse_section, to_dict
from sft_jax.config_file import load_config_file
from sft_jax.configs import base

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def saved(tmp_path):
    """A workdir holding only the config.json a run of configs/tiny.py writes; returns it and
    the config as a dict to edit."""
    raw = to_dict(parse(load_config_file(str(REPO / "configs" / "tiny.py"))))
    raw["data"]["chat_template"] = "chatml"

    def write(config=raw):
        (tmp_path / "config.json").write_text(json.dumps(config))
        return str(tmp_path)

    return write, raw


def test_parse_section_fills_keys_an_older_config_lacks_from_the_base_config():
    raw = to_dict(parse(load_config_file(str(REPO / "configs" / "tiny.py"))))["model"]
    del raw["attention"], raw["arch"]["qk_norm"]
    section, missing = parse_section("model", raw)
    assert isinstance(section, ModelSection)
    assert (section.attention, section.arch.qk_norm) == ("auto", False)
    assert sorted(missing) == ["model.arch.qk_norm=False", "model.attention='auto'"]


@pytest.mark.parametrize(
    "name, raw, message",
    [
        ("model", {"flash": True}, r"unknown config key 'model\.flash'"),
        ("model", {"remat": "some"}, r"'model\.remat' is 'some'; choose one of"),
        ("model", {"arch": {"num_layers": "2"}}, r"'model\.arch\.num_layers' must be an integer"),
        ("mesh", [1, 8, 1], r"config key 'mesh' must be a section"),
    ],
)
def test_parse_section_rejects_unknown_keys_wrong_types_and_choices(name, raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_section(name, raw)


def test_read_config_types_sections_and_resolves_tokenizer_and_template(saved):
    write, raw = saved
    config = workdir.read_config(write())
    assert config.model.arch.num_layers == raw["model"]["arch"]["num_layers"]
    assert config.mesh.rules == tuple(tuple(r) for r in raw["mesh"]["rules"])
    assert config.lora.enabled is False and config.raw["seed"] == raw["seed"]
    assert config.tokenizer_dir == (raw["data"]["tokenizer"] or raw["model"]["path"])
    assert "<|im_start|>" in config.chat_template  # the builtin template's Jinja source


def test_read_config_of_an_older_workdir_warns_once_naming_the_defaults(saved):
    write, raw = saved
    del raw["model"]["scan_layers"], raw["lora"]["modules_to_save"]
    with pytest.warns(workdir.OldWorkdirWarning) as caught:
        config = workdir.read_config(write(raw))
    assert len(caught) == 1
    assert "model.scan_layers=True, lora.modules_to_save=()" in str(caught[0].message)
    assert config.model.scan_layers is True and config.lora.modules_to_save == ()


def test_read_config_errors_name_the_file_and_key(saved, tmp_path):
    write, raw = saved
    with pytest.raises(workdir.LoadError, match="not a training workdir"):
        workdir.read_config(str(tmp_path / "nowhere"))
    raw["lora"]["rank"] = "16"
    with pytest.raises(workdir.LoadError, match=r"config\.json: config key 'lora\.rank'"):
        workdir.read_config(write(raw))
    # an export or a model directory passed as --workdir: named, not read as a random-init
    # model of default sections (which failed later in a traceback)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8}))
    with pytest.raises(workdir.LoadError, match=r"Hugging Face model's config\.json.*--model"):
        workdir.read_config(str(tmp_path))


def test_defaults_come_from_the_package_not_from_a_file_path(saved, monkeypatch):
    """An installed wheel has no configs/ checkout: reading a workdir imports the base config
    from the package and never executes a config file by path."""
    write, raw = saved
    del raw["model"]["loss_chunk"]
    path = write(raw)
    from sft_jax import config_file

    def refuse(*args, **kwargs):
        raise AssertionError("a config file was executed by path")

    monkeypatch.setattr(config_file, "load_config_file", refuse)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if pathlib.Path(p or ".") != REPO])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", workdir.OldWorkdirWarning)
        assert workdir.read_config(path).model.loss_chunk == base.get_config().model.loss_chunk


def test_is_workdir_tells_a_training_config_from_a_hugging_face_one(saved, tmp_path):
    write, _ = saved
    assert workdir.is_workdir(write())
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert not workdir.is_workdir(str(hf_dir))
    assert not workdir.is_workdir(str(tmp_path / "missing"))


def test_training_refuses_a_model_directory_as_its_workdir(saved, tmp_path):
    """A --workdir holding an export's or a base model's config.json is refused before anything
    is written: the run used to overwrite that config.json with its own (the model no longer
    loaded) and drop its lock, metrics and checkpoints among the weights."""
    from sft_jax.training import preflight

    write, _ = saved
    preflight.check_workdir(write())  # a run's own workdir: resumable
    for name, text in [("hf", json.dumps({"model_type": "llama"})), ("bad", "{not json")]:
        model_dir = tmp_path / name
        model_dir.mkdir()
        (model_dir / "config.json").write_text(text)
        with pytest.raises(ConfigError, match=rf"workdir '{model_dir}' holds a"):
            preflight.check_workdir(str(model_dir))
        assert sorted(p.name for p in model_dir.iterdir()) == ["config.json"]
        assert (model_dir / "config.json").read_text() == text


def test_best_step_and_missing_checkpoints_are_load_errors(tmp_path):
    with pytest.raises(workdir.LoadError, match=r"names no best_step.*rewind_to_best"):
        workdir.best_step(str(tmp_path))
    (tmp_path / "summary.json").write_text(json.dumps({"best_step": 6}))
    assert workdir.best_step(str(tmp_path)) == 6
    with pytest.raises(workdir.LoadError, match=r"no checkpoint in .*checkpoints"):
        workdir.open_checkpoint(str(tmp_path))


def test_report_readers_note_what_is_missing_or_unreadable(tmp_path):
    notes = []
    assert workdir.read_records(str(tmp_path), notes) == []
    assert workdir.read_json(str(tmp_path), "summary.json", notes) is None
    assert notes == ["metrics.jsonl not found: the run has not logged anything yet."]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n[1]\n{"step": 2, "lo')
    (tmp_path / "summary.json").write_text("[]")
    notes.clear()
    assert workdir.read_records(str(tmp_path), notes) == [{"step": 1, "loss": 2.0}]
    assert workdir.read_json(str(tmp_path), "summary.json", notes) is None
    assert notes[0].startswith("metrics.jsonl: skipped 2 unreadable line(s) (2, 3)")
    assert notes[1] == "summary.json is not a JSON object; shown without it."
