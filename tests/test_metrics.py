"""metrics.jsonl plus its mirrors: TensorBoard event files (read back with an independent TFRecord
reader that checks CRCs) and W&B (a fake `wandb` module that records calls; no network)."""

import dataclasses
import json
import struct
import sys
import types

import pytest

from configs import base
from sft_jax.config import ConfigError, parse
from sft_jax.training import metrics
from sft_jax.training.metrics import MetricsWriter, read_metrics, record_kind, scalar_tag

TRAIN = {"loss": 2.5, "learning_rate": 1e-3, "grad_norm": 0.75, "tokens_per_s": 900.0, "run": 0}
EVAL = {"kind": "eval", "eval_loss": 1.25, "eval_perplexity": 3.49, "run": 0}
SAMPLES = {
    "kind": "samples",
    "run": 0,
    "samples": [{"prompt": "Q: a|b?", "reference": "red", "output": "red", "correct": True}],
}


def logging_section(**overrides):
    """The parsed `logging` section of configs/base.py with `overrides` (range checks run)."""
    raw = base.get_config().to_dict()
    raw["data"]["train_files"] = "x.jsonl"  # base names no data; parse requires some
    raw["logging"].update(overrides)
    return parse(raw).logging


# ------------------------------------------------------------------ an independent event reader


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path):
    """Events of one tfevents file: TFRecord framing, both CRCs checked, Event protos parsed."""
    from tensorboardX.proto.event_pb2 import Event

    data, events, pos = path.read_bytes(), [], 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[pos + 8 : pos + 12])[0] == _masked(_crc32c(header))
        body = data[pos + 12 : pos + 12 + length]
        assert struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])[0] == _masked(
            _crc32c(body)
        )
        events.append(Event.FromString(body))
        pos += 16 + length
    return events


def tensorboard_values(logdir):
    """{tag: [(step, value)]} over all event files; text summaries as decoded strings."""
    out = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for event in read_events(path):
            for value in event.summary.value:
                item = value.tensor.string_val[0].decode() if value.HasField("tensor") else None
                item = value.simple_value if item is None else item
                out.setdefault(value.tag, []).append((event.step, item))
    return out


# ------------------------------------------------------------------ records and jsonl


def test_record_kinds_and_tags():
    assert record_kind({"loss": 1.0}) == "train"
    assert record_kind({"eval_loss": 1.0}) == "eval"  # older eval records carry no kind
    assert record_kind(EVAL) == "eval"
    assert record_kind(SAMPLES) == "samples"
    assert scalar_tag("eval", "eval_perplexity") == "eval/perplexity"
    assert scalar_tag("train", "loss") == "train/loss"
    got = dict(metrics.scalars({"step": 3, "run": 1, "loss": "nan", "ok": True, "x": 2}))
    assert list(got) == ["loss", "x"] and got["loss"] != got["loss"] and got["x"] == 2.0


def test_jsonl_only_without_logging(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    writer.write(4, TRAIN)
    writer.close()
    assert read_metrics(str(tmp_path))[0]["loss"] == 2.5
    assert not (tmp_path / "tensorboard").exists()


def test_other_processes_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics.jax, "process_index", lambda: 1)
    with MetricsWriter(str(tmp_path), logging=logging_section()) as writer:
        writer.write(4, TRAIN)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ TensorBoard


def test_tensorboard_scalars_and_samples(tmp_path):
    with MetricsWriter(str(tmp_path), logging=logging_section()) as writer:
        writer.write(0, {"kind": "start", "run": 0, "resumed_from": 0})
        writer.write(2, TRAIN)
        writer.write(4, {**TRAIN, "loss": 2.0})
        writer.write(4, EVAL)
        writer.write(4, SAMPLES)
    values = tensorboard_values(tmp_path / "tensorboard")
    assert values["train/loss"] == [(2, 2.5), (4, 2.0)]
    assert values["train/grad_norm"] == [(2, 0.75), (4, 0.75)]
    assert values["eval/loss"] == [(4, 1.25)]
    assert values["eval/perplexity"][0][1] == pytest.approx(3.49)
    assert "train/run" not in values and "train/step" not in values
    [(step, text)] = values["samples/samples/text_summary"]
    assert step == 4 and "Q: a\\|b?" in text and "| red | red | True |" in text


def test_tensorboard_restart_purges_steps_after_the_checkpoint(tmp_path):
    with MetricsWriter(str(tmp_path), logging=logging_section()) as writer:
        writer.write(0, {"kind": "start", "run": 0, "resumed_from": 0})
        for step in (2, 4, 6):
            writer.write(step, {**TRAIN, "loss": float(step)})
    with MetricsWriter(str(tmp_path), logging=logging_section()) as writer:
        writer.write(4, {"kind": "start", "run": 1, "resumed_from": 4})
        writer.write(6, {**TRAIN, "loss": 60.0})
    files = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2
    second = read_events(files[1])
    purges = [e.step for e in second if e.HasField("session_log") and e.session_log.status == 1]
    assert purges == [5]  # TensorBoard hides the first run's steps >= 5 (its step 6)
    assert tensorboard_values(tmp_path / "tensorboard")["train/loss"][-1] == (6, 60.0)


def test_tensorboard_off(tmp_path):
    with MetricsWriter(str(tmp_path), logging=logging_section(tensorboard=False)) as writer:
        writer.write(2, TRAIN)
    assert not (tmp_path / "tensorboard").exists()


# ------------------------------------------------------------------ W&B


class FakeRun:
    def __init__(self, calls):
        self.calls = calls

    def define_metric(self, name, step_metric=None):
        self.calls.append(("define_metric", name, step_metric))

    def log(self, data):
        self.calls.append(("log", data))

    def finish(self):
        self.calls.append(("finish",))


@dataclasses.dataclass
class FakeTable:
    columns: list
    data: list


@pytest.fixture
def fake_wandb(monkeypatch):
    calls = []

    def init(**kwargs):
        calls.append(("init", kwargs))
        return FakeRun(calls)

    module = types.SimpleNamespace(init=init, Table=FakeTable)
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_wandb_logs_and_resumes_the_same_run(tmp_path, fake_wandb):
    section = logging_section(
        tensorboard=False, wandb=True, wandb_entity="team", wandb_mode="offline"
    )
    with MetricsWriter(str(tmp_path), logging=section, run_config={"seed": 3}) as writer:
        writer.write(2, TRAIN)
        writer.write(2, EVAL)
        writer.write(2, SAMPLES)
    with MetricsWriter(str(tmp_path), logging=section) as writer:
        writer.write(4, TRAIN)
    inits = [c[1] for c in fake_wandb if c[0] == "init"]
    assert len(inits) == 2 and inits[0]["id"] == inits[1]["id"]
    assert inits[0]["id"] == (tmp_path / "wandb_run_id.txt").read_text().strip()
    keys = ("resume", "project", "entity", "name", "mode")
    assert {k: inits[0][k] for k in keys} == dict(
        resume="allow", project="sft_jax", entity="team", name=tmp_path.name, mode="offline"
    )
    assert inits[0]["config"] == {"seed": 3} and inits[0]["dir"] == str(tmp_path)
    logs = [c[1] for c in fake_wandb if c[0] == "log"]
    assert logs[0] == {"step": 2, "train/loss": 2.5, "train/learning_rate": 1e-3,
                       "train/grad_norm": 0.75, "train/tokens_per_s": 900.0}  # fmt: skip
    assert logs[1] == {"step": 2, "eval/loss": 1.25, "eval/perplexity": 3.49}
    table = logs[2]["samples/samples"]
    assert table.columns == ["prompt", "reference", "output", "correct"]
    assert table.data == [["Q: a|b?", "red", "red", True]]
    assert logs[3]["step"] == 4
    assert ("define_metric", "eval/*", "step") in fake_wandb
    assert [c[0] for c in fake_wandb].count("finish") == 2


def test_wandb_enabled_but_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(ConfigError, match=r"logging.wandb.*pip install wandb"):
        MetricsWriter(str(tmp_path), logging=logging_section(wandb=True))


def test_logging_config_checks():
    with pytest.raises(ConfigError, match=r"logging\.wandb_mode"):
        logging_section(wandb_mode="sometimes")
    with pytest.raises(ConfigError, match=r"logging\.wandb_project"):
        logging_section(wandb=True, wandb_project="")
    assert json.loads(json.dumps(dataclasses.asdict(logging_section())))["tensorboard"] is True
