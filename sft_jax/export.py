"""Export to a Hugging Face directory that transformers (and so vLLM) loads as is.

    python -m sft_jax.export --workdir W --out DIR [--step N] [--dtype bfloat16] [--overwrite]
    python -m sft_jax.export --workdir W --out DIR --peft      (a LoRA run: the adapter only)

writes `config.json`, `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`
(metadata format "pt", without which transformers refuses the files), the tokenizer files with
the chat template used in training, and `generation_config.json`.

Why it is built this way:
- config.json is the source checkpoint's own file when there is one (it already describes the
  architecture exactly, including fields we only validate), with dtype and tying updated; a
  randomly initialised model gets a Llama (or Qwen2/Qwen3) config derived from ModelConfig.
- Weights go one leaf at a time: a leaf is copied to the host (gathered across processes on
  multi-host), split into its per-layer HF tensors and streamed into the shard files; only
  process 0 writes. The shard layout is planned from shapes before any bytes are written, so
  file names can carry the shard count.
- A LoRA run's checkpoints hold only adapters: the base is re-read from `model.path` (or
  re-initialised from the seed), and the adapters are merged into it (at the base's own stored
  precision, as PEFT's merge would) for the HF export, or written as a PEFT adapter (`--peft`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import sys
import typing
import warnings
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from sft_jax import hf
from sft_jax.hf.safetensors import write_safetensors
from sft_jax.model import ModelConfig

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


class ExportError(ValueError):
    """Export cannot proceed (no checkpoint, non-empty output directory, ...)."""


def export_hf(
    params: Any,
    model_config: ModelConfig,
    out_dir: str,
    *,
    tokenizer_dir: str,
    source_model_dir: str | None = None,
    chat_template: str | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Writes a complete HF model directory for `params` (our unboxed tree, possibly sharded).

    `dtype`: storage dtype of the exported tensors (default: the parameters' own dtype).
    `chat_template`: Jinja source to store with the tokenizer instead of its own template.
    Every process must call this (leaves may need gathering); only process 0 writes.
    """
    flat = traverse_util.flatten_dict(params)
    out_dtype = np.dtype(dtype or next(iter(flat.values())).dtype)
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(out_dir, exist_ok=True)
    _write_weights(flat, model_config, out_dir, out_dtype, max_shard_bytes, writer)
    if not writer:
        return
    tokenizer = _write_tokenizer(tokenizer_dir, out_dir, chat_template)
    _write_config(model_config, out_dir, source_model_dir, out_dtype, tokenizer)
    _write_generation_config(out_dir, (source_model_dir, tokenizer_dir), tokenizer)


def _host_copy(leaf: jax.Array) -> np.ndarray:
    """The whole leaf on this host; a collective when it spans several processes."""
    if getattr(leaf, "is_fully_addressable", True):
        return np.asarray(jax.device_get(leaf))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))


def _plan_shards(plan: list[hf.HfTensor], itemsize: int, limit: int) -> list[list[hf.HfTensor]]:
    """Consecutive groups of tensors of at most `limit` bytes (a bigger tensor gets its own)."""
    shards: list[list[hf.HfTensor]] = [[]]
    size = 0
    for tensor in plan:
        nbytes = int(np.prod(tensor.shape)) * itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += nbytes
    return shards


def _write_weights(
    flat: dict, c: ModelConfig, out_dir: str, dtype: np.dtype, limit: int, writer: bool
) -> None:
    plan = hf.hf_tensor_plan(c)
    if set(flat) != {t.leaf for t in plan}:
        diff = sorted(set(flat) ^ {t.leaf for t in plan})
        raise ExportError(f"parameter tree does not match the model config: {diff}")
    if not writer:  # take part in the gathers, in the same leaf order as the writer
        for path in dict.fromkeys(t.leaf for t in plan):
            _host_copy(flat[path])
        return
    shards = _plan_shards(plan, dtype.itemsize, limit)
    current: dict[tuple[str, ...], np.ndarray] = {}
    by_key = {t.key: t for t in plan}

    def produce(key: str) -> np.ndarray:
        tensor = by_key[key]
        if tensor.leaf not in current:  # plan order is leaf-grouped: each leaf fetched once
            current.clear()
            current[tensor.leaf] = _host_copy(flat[tensor.leaf])
        return hf.to_hf_tensor(c, tensor, current[tensor.leaf]).astype(dtype)

    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        entries = [(t.key, t.shape, dtype) for t in shard]
        write_safetensors(os.path.join(out_dir, name), entries, produce, {"format": "pt"})
        for t in shard:
            weight_map[t.key] = name
            total += int(np.prod(t.shape)) * dtype.itemsize
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(os.path.join(out_dir, "model.safetensors.index.json"), index)


def _write_json(path: str, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def _write_tokenizer(tokenizer_dir: str, out_dir: str, chat_template: str | None) -> Any:
    """Copies the tokenizer files (or re-saves them with the training chat template)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(out_dir)
        return tokenizer
    copied = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer_dir, n))]
    if not copied:
        tokenizer.save_pretrained(out_dir)
    for name in copied:
        shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
    return tokenizer


def _dtype_name(dtype: np.dtype) -> str:
    return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[dtype.name]


def _write_config(
    c: ModelConfig, out_dir: str, source: str | None, dtype: np.dtype, tokenizer: Any
) -> None:
    source_file = os.path.join(source, "config.json") if source else ""
    if source_file and os.path.isfile(source_file):
        with open(source_file, encoding="utf-8") as f:
            config = json.load(f)
        config["tie_word_embeddings"] = c.tie_embeddings
    else:
        config = hf.hf_config_dict(
            c, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
        )
    config["dtype"] = _dtype_name(dtype)
    if "torch_dtype" in config:
        config["torch_dtype"] = _dtype_name(dtype)
    _write_json(os.path.join(out_dir, "config.json"), config)


def _write_generation_config(out_dir: str, sources: tuple, tokenizer: Any) -> None:
    for source in sources:
        path = os.path.join(source, "generation_config.json") if source else ""
        if path and os.path.isfile(path):
            shutil.copyfile(path, os.path.join(out_dir, "generation_config.json"))
            return
    derived = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if tokenizer.pad_token_id is not None:
        derived["pad_token_id"] = tokenizer.pad_token_id
    _write_json(os.path.join(out_dir, "generation_config.json"), derived)


# --------------------------------------------------------------------------------------------
# A trained workdir: its resolved config.json and its checkpoints.


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """What export and chat need from a workdir: parameters and where the tokenizer lives."""

    params: Any
    model_config: ModelConfig
    step: int
    tokenizer_dir: str
    source_model_dir: str  # "" for a randomly initialised model
    chat_template: str | None  # the Jinja source used in training, None = the tokenizer's own
    adapters: Any = None  # a LoRA run's adapter tree (params is then the merged model)
    lora: dict[str, Any] | None = None  # a LoRA run's `lora` config section


def load_workdir(workdir: str, step: int | None = None) -> TrainedModel:
    """Restores the parameters of `step` (latest when None) over a mesh of all devices.

    Reads only the `model`, `mesh`, `lora` and `data` sections of `workdir/config.json`, so a
    workdir stays exportable when unrelated config keys are added later; keys of those sections
    that an older version did not write take their defaults (see `_section`).
    """
    from sft_jax import sharding
    from sft_jax.checkpoint import Checkpointer
    from sft_jax.model import Transformer
    from sft_jax.state import param_shardings

    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ExportError(f"{path} not found: not a training workdir")
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    if not isinstance(raw, dict):
        raise ExportError(f"{path}: expected a JSON object (the resolved training config)")
    sections = _read_sections(raw, path)
    section = sections["model"]
    raw = {**raw, "lora": dataclasses.asdict(sections["lora"])}
    model_config = hf.build_model_config(section)
    devices = np.asarray(jax.devices()).reshape(1, -1, 1)
    mesh = jax.sharding.Mesh(devices, sharding.MESH_AXES)
    rules = sections["mesh"].rules
    abstract, shardings = param_shardings(Transformer(model_config), mesh, rules)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    checkpointer = Checkpointer(workdir, keep=1, async_save=False)
    step = checkpointer.latest_step() if step is None else step
    if step is None or not os.path.isdir(os.path.join(checkpointer.directory, str(step))):
        which = "" if step is None else f" for step {step}"
        raise ExportError(f"no checkpoint{which} in {checkpointer.directory}")
    lora_raw = raw.get("lora", {})
    adapters = None
    if lora_raw.get("enabled"):
        model = Transformer(model_config)
        params, adapters = _merged_lora(raw, model, mesh, rules, checkpointer, step)
    else:
        params = checkpointer.restore_params(step, abstract)
    data = raw.get("data", {})
    return TrainedModel(
        params=params,
        model_config=model_config,
        step=step,
        tokenizer_dir=data.get("tokenizer") or section.path,
        source_model_dir=section.path,
        chat_template=_chat_template_source(data.get("chat_template", "tokenizer")),
        adapters=adapters,
        lora=lora_raw if adapters is not None else None,
    )


def _merged_lora(raw: dict, model: Any, mesh: Any, rules: tuple, checkpointer: Any, step: int):
    """A LoRA run's (merged parameters, adapters): the base re-read (or re-initialised from the
    run's seed) at its stored precision, the adapters restored from `step` and merged in."""
    from sft_jax import lora
    from sft_jax.state import adapter_shardings, init_params

    c = raw["lora"]
    base = init_params(model, raw["model"]["path"], mesh, rules, raw["seed"])

    def make(params: Any) -> Any:
        adapters = lora.init_adapters(params, tuple(c["targets"]), c["rank"], jax.random.key(0))
        if c.get("dora", False):
            adapters = lora.init_magnitudes(params, adapters)
        return lora.add_saved_modules(params, adapters, tuple(c.get("modules_to_save", ())))

    abstract = jax.eval_shape(make, base)
    shardings = adapter_shardings(abstract, base, mesh)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    adapters = checkpointer.restore_params(step, abstract)
    scale = lora.lora_scale(c["alpha"], c["rank"], c["rslora"])
    out_shardings = jax.tree.map(lambda x: x.sharding, base)
    merged = jax.jit(lambda p, a: lora.merge(p, a, scale), out_shardings=out_shardings)
    return merged(base, adapters), adapters


def export_peft(run: TrainedModel, out_dir: str) -> None:
    """Writes a LoRA run's adapter as PEFT's adapter_config.json + adapter_model.safetensors."""
    from sft_jax import lora

    if run.adapters is None or run.lora is None:
        raise ExportError("--peft needs a LoRA run (lora.enabled in its config.json)")
    c = run.lora
    config = lora.peft_config(
        run.adapters,
        rank=c["rank"],
        alpha=c["alpha"],
        rslora=c["rslora"],
        dropout=c.get("dropout", 0.0),
        base=run.source_model_dir,
        tied_embeddings=run.model_config.tie_embeddings,
    )
    if jax.process_index() == 0:
        lora.write_peft_adapter(out_dir, jax.device_get(run.adapters), config)


class OldWorkdirWarning(UserWarning):
    """A workdir's config.json lacks keys added since it was written; defaults were used."""


BASE_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "base.py")
_SECTIONS = {"model": "ModelSection", "mesh": "MeshSection", "lora": "LoraSection"}


def _read_sections(raw: dict, path: str) -> dict[str, Any]:
    """The typed `model`, `mesh` and `lora` sections of a workdir's config.json (`path`)."""
    from sft_jax import config as config_module

    missing: list[str] = []
    sections = {}
    for name, cls_name in _SECTIONS.items():
        cls = getattr(config_module, cls_name)
        sections[name] = _section(cls, raw.get(name, {}), name, path, missing)
    if missing:
        warnings.warn(
            f"{path} was written by an older sft_jax and lacks config keys "
            f"{', '.join(missing)}; using their defaults from sft_jax/configs/base.py",
            OldWorkdirWarning,
            stacklevel=3,
        )
    return sections


@functools.cache
def _base_defaults() -> dict:
    """sft_jax/configs/base.py as a plain dict: the one place every config key has its default."""
    from sft_jax.config import ConfigError, load_config_file

    try:
        return load_config_file(BASE_CONFIG).to_dict()
    except ConfigError as e:
        raise ExportError(
            f"{e}: it supplies defaults for keys an older workdir lacks (use a source checkout)"
        ) from e


def _section(cls: type, raw: Any, prefix: str, path: str, missing: list[str]) -> Any:
    """Section `prefix` (a frozen config dataclass `cls`) of config.json `path`.

    A workdir outlives the code that wrote it: keys added since (model.attention,
    model.scan_layers, ...) take their base-config defaults and are appended to `missing`
    (the caller warns once); an unknown key or a value of the wrong type is an ExportError
    naming the file and the key, never a TypeError from the dataclass constructor.
    """
    from sft_jax.config import _CHOICES, ConfigError, _coerce

    if not isinstance(raw, dict):
        raise ExportError(f"{path}: config key '{prefix}' must be a section, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ExportError(
            f"{path}: unknown config key '{prefix}.{unknown[0]}' (written by a newer sft_jax?); "
            f"valid keys of '{prefix}': {', '.join(names)}"
        )
    values = {}
    for name in names:
        key = f"{prefix}.{name}"
        if dataclasses.is_dataclass(hints[name]):
            values[name] = _section(hints[name], raw.get(name, {}), key, path, missing)
            continue
        if name in raw:
            value = raw[name]
        else:
            value = functools.reduce(lambda node, k: node[k], key.split("."), _base_defaults())
            missing.append(f"{key}={value!r}")
        try:
            values[name] = _coerce(hints[name], value, key)
        except ConfigError as e:
            raise ExportError(f"{path}: {e}") from e
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ExportError(f"{path}: config key '{key}' is {value!r}; one of {_CHOICES[key]}")
    return cls(**values)


def _chat_template_source(spec: str) -> str | None:
    """The Jinja source of a `data.chat_template` spec; None for the tokenizer's own."""
    if not spec or spec == "tokenizer":
        return None
    from sft_jax.data.templates import BUILTIN_TEMPLATES

    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    with open(spec, encoding="utf-8") as f:
        return f.read()


# --------------------------------------------------------------------------------------------
# Command line: a trained workdir -> HF directory.


def resolve_step(workdir: str, step: str | None) -> int | None:
    """None (latest), an explicit step number, or "best" from the run's rewind result."""
    if step is None:
        return None
    if step != "best":
        if not step.isdigit():
            raise ExportError(f"--step must be a number or 'best', not {step!r}")
        return int(step)
    summary_path = os.path.join(workdir, "summary.json")
    best = None
    if os.path.exists(summary_path):
        with open(summary_path, encoding="utf-8") as f:
            best = json.load(f).get("best_step")
    if best is None:
        raise ExportError(
            f"{summary_path} names no best_step: train with "
            "--config.checkpoint.rewind_to_best=True (and checkpoint.keep_best > 0) to rank the "
            "kept checkpoints by eval loss"
        )
    return int(best)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft_jax.export", description=__doc__)
    parser.add_argument("--workdir", required=True, help="training workdir (config.json + ckpts)")
    parser.add_argument("--out", required=True, help="output HF model directory")
    parser.add_argument(
        "--step",
        default=None,
        help="checkpoint step (default latest), or 'best': the step with the lowest eval loss "
        "found by checkpoint.rewind_to_best (summary.json's best_step)",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    parser.add_argument("--overwrite", action="store_true", help="allow a non-empty --out")
    parser.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES)
    parser.add_argument("--peft", action="store_true", help="LoRA run: write the PEFT adapter")
    args = parser.parse_args(argv)
    try:
        if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
            raise ExportError(f"{args.out} is not empty; pass --overwrite to write into it")
        run = load_workdir(args.workdir, resolve_step(args.workdir, args.step))
        if args.peft:
            export_peft(run, args.out)
            print(f"exported the LoRA adapter of step {run.step} of {args.workdir} to {args.out}")
            return 0
        export_hf(
            run.params,
            run.model_config,
            args.out,
            tokenizer_dir=run.tokenizer_dir,
            source_model_dir=run.source_model_dir or None,
            chat_template=run.chat_template,
            dtype=args.dtype,
            max_shard_bytes=args.max_shard_bytes,
        )
    except (ExportError, FileNotFoundError, hf.UnsupportedModelError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported step {run.step} of {args.workdir} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
