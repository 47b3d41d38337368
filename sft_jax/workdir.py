"""Reading a training workdir back: its saved config, checkpoints, summary and metrics records.

A run leaves in its workdir config.json (the resolved config), checkpoints/<step>/ (the
parameters, or a LoRA run's adapters), summary.json (written at the end) and metrics.jsonl (one
record per line, appended by every start). Export, generate, the run report and `sft_jax.load`
read them through the functions here, so each file is parsed in one place.

Why it is built this way:
- A workdir outlives the code that wrote it: only the sections a reader needs are parsed (model,
  mesh, lora, and data's tokenizer and chat template), and keys added since take their defaults
  from the base config that ships inside the package (`sft_jax.config.parse_section`), with one
  `OldWorkdirWarning`; so an installed wheel reads any workdir, with no source checkout. A key
  that is unknown or of the wrong type is a `LoadError` naming the file and the key.
- The report reads a run that may still be running or was killed: its readers note what is
  missing or unreadable instead of raising, and skip a half-written last line.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from typing import Any

from sft_jax import paths
from sft_jax.config import LoraSection, MeshSection, ModelSection

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"


class LoadError(ValueError):
    """A path that cannot be loaded as a trained model (with the file and the reason)."""


class OldWorkdirWarning(UserWarning):
    """A workdir's config.json lacks keys added since it was written; defaults were used."""


@dataclasses.dataclass(frozen=True)
class SavedConfig:
    """What readers need of a workdir's config.json, typed; `raw` is the file as written."""

    model: ModelSection
    mesh: MeshSection
    lora: LoraSection
    tokenizer_dir: str  # data.tokenizer, else the model directory
    chat_template: str | None  # the Jinja source used in training; None: the tokenizer's own
    raw: dict[str, Any]


def is_workdir(path: str) -> bool:
    """Whether `path` holds a training workdir's config.json (the resolved config, with a
    `model` section) rather than a Hugging Face one (an architecture). A config.json that is
    not a JSON object is a ModelFileError naming it."""
    from sft_jax import hf

    file = paths.join(path, CONFIG_FILE)
    return paths.isfile(file) and isinstance(hf.read_config_json(file).get("model"), dict)


def read_config(workdir: str) -> SavedConfig:
    """The typed sections of `workdir/config.json`; keys an older version did not write take
    their defaults, named in one OldWorkdirWarning."""
    from sft_jax import hf
    from sft_jax.config import ConfigError, parse_section

    path = paths.join(workdir, CONFIG_FILE)
    if not paths.isfile(path):
        raise LoadError(f"{path} not found: not a training workdir")
    raw = hf.read_config_json(path)  # not a JSON object: one line naming the file
    if not isinstance(raw.get("model"), dict):  # else a random-init model of defaults was built
        raise LoadError(
            f"{path} is a Hugging Face model's config.json, not a training run's: {workdir} "
            "is a model directory, not a training workdir (generate takes it as --model)"
        )
    missing: list[str] = []
    sections = {}
    for name in ("model", "mesh", "lora"):
        try:
            sections[name], lacked = parse_section(name, raw.get(name, {}))
        except ConfigError as e:
            raise LoadError(f"{path}: {e}") from None
        missing += lacked
    if missing:
        warnings.warn(
            f"{path} was written by an older sft_jax and lacks config keys "
            f"{', '.join(missing)}; using their defaults from sft_jax/configs/base.py",
            OldWorkdirWarning,
            stacklevel=3,
        )
    data = raw.get("data", {})
    data = data if isinstance(data, dict) else {}
    return SavedConfig(
        **sections,
        tokenizer_dir=data.get("tokenizer") or sections["model"].path,
        chat_template=chat_template_source(data.get("chat_template", "tokenizer")),
        raw=raw,
    )


def chat_template_source(spec: str) -> str | None:
    """The Jinja source of a `data.chat_template` spec; None for the tokenizer's own."""
    if not spec or spec == "tokenizer":
        return None
    from sft_jax.data.templates import BUILTIN_TEMPLATES

    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    with open(spec, encoding="utf-8") as f:
        return f.read()


def open_checkpoint(workdir: str, step: int | None = None) -> tuple[Any, int]:
    """(the workdir's Checkpointer, `step`, or the latest step when None); LoadError when that
    checkpoint does not exist."""
    from sft_jax.training.checkpoint import Checkpointer

    checkpointer = Checkpointer(workdir, keep=1, async_save=False)
    step = checkpointer.latest_step() if step is None else step
    if step is None or not paths.isdir(paths.join(checkpointer.directory, str(step))):
        which = "" if step is None else f" for step {step}"
        raise LoadError(f"no checkpoint{which} in {checkpointer.directory}")
    return checkpointer, step


def best_step(workdir: str) -> int:
    """The kept checkpoint the run rewound to (summary.json's best_step, written when
    checkpoint.rewind_to_best ranked them by checkpoint.rewind_rule); LoadError when unnamed."""
    path = paths.join(workdir, SUMMARY_FILE)
    best = None
    if paths.exists(path):
        best = json.loads(paths.read_text(path)).get("best_step")
    if best is None:
        raise LoadError(
            f"{path} names no best_step: train with "
            "--config.checkpoint.rewind_to_best=True (and checkpoint.keep_best > 0) to rank the "
            "kept checkpoints by eval loss"
        )
    return int(best)


# --------------------------------------------------------------------------------------------
# The report's readers: what is missing or unreadable becomes a note, never an error.


def read_records(workdir: str, notes: list[str]) -> list[dict[str, Any]]:
    """The JSON objects of metrics.jsonl in file order; unreadable lines are noted and skipped."""
    path = paths.join(workdir, METRICS_FILE)
    if not paths.exists(path):
        notes.append(f"{METRICS_FILE} not found: the run has not logged anything yet.")
        return []
    records, bad = [], []
    with paths.open_text(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad.append(number)
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
            else:
                bad.append(number)
    if bad:
        notes.append(
            f"{METRICS_FILE}: skipped {len(bad)} unreadable line(s) "
            f"({', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''}); "
            "a process killed mid-write leaves one."
        )
    return records


def read_json(workdir: str, name: str, notes: list[str]) -> dict[str, Any] | None:
    """The JSON object in `workdir/name` (summary.json, config.json); None when absent, and
    when unreadable or not an object, with a note."""
    path = paths.join(workdir, name)
    if not paths.exists(path):
        return None
    try:
        value = json.loads(paths.read_text(path))
    except (OSError, json.JSONDecodeError) as e:
        notes.append(f"{name} is unreadable ({e}); shown without it.")
        return None
    if not isinstance(value, dict):
        notes.append(f"{name} is not a JSON object; shown without it.")
        return None
    return value
