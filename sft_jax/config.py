"""Typed, frozen view of an ml_collections config.

Config files stay plain Python (`configs/*.py`, overridable with `--config.a.b=v`); at the edge of
the program `parse` turns the tree into frozen dataclasses, checking that every key exists, that no
key is unknown (naming the closest valid one), and that values are in range. Library code reads
attributes only, so a default can never hide in library code: they all live in
sft_jax/configs/base.py. The sections' dataclasses are in sft_jax/config_sections.py (re-exported
here, the one import for callers); reading files and command lines is sft_jax/config_file.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any

import ml_collections

from sft_jax.config_sections import (
    GENERATION_MATCHES,
    ArchConfig,
    CheckpointSection,
    Config,
    DataSection,
    DistributedSection,
    EvalSection,
    FaultsSection,
    LoggingSection,
    LoraSection,
    MeshSection,
    ModelSection,
    OptimSection,
    TrainSection,
)
from sft_jax.model.config import IMPLEMENTATIONS, MOE_DISPATCH, REMAT_POLICIES

__all__ = [
    "GENERATION_MATCHES",
    "SAVEABLE_LORA_MODULES",
    "ArchConfig",
    "CheckpointSection",
    "Config",
    "ConfigError",
    "DataSection",
    "DistributedSection",
    "EvalSection",
    "FaultsSection",
    "LoggingSection",
    "LoraSection",
    "MeshSection",
    "ModelSection",
    "OptimSection",
    "TrainSection",
    "parse",
    "parse_section",
    "to_dict",
]


class ConfigError(ValueError):
    """A config is malformed: unknown or missing key, wrong type, or out-of-range value."""


def parse(config: ml_collections.ConfigDict | dict) -> Config:
    """Builds the frozen `Config` from a config tree; raises ConfigError naming the bad key."""
    raw = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    parsed = _build(Config, raw, prefix="")
    _validate(parsed)
    return parsed


def parse_section(name: str, raw: Any) -> tuple[Any, list[str]]:
    """Section `name` of a saved config (a workdir's config.json) as its frozen dataclass, and
    the keys it lacked as "key=value" strings.

    A saved config outlives the code that wrote it, so keys added since take their defaults from
    the base config (inside the package: sft_jax/configs/base.py) and are returned for the caller
    to report; an unknown key, a wrong type or a value outside the choices is a ConfigError.
    """
    from sft_jax.configs import base

    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{name}' must be a section, got {raw!r}")
    missing: list[str] = []
    filled = _fill_missing(raw, base.get_config().to_dict()[name], name, missing)
    section = _coerce(typing.get_type_hints(Config)[name], filled, name)
    for key, allowed in _CHOICES.items():
        if key.startswith(f"{name}."):
            _check_choice(key, getattr(section, key.split(".")[1]), allowed)
    return section, missing


def _fill_missing(raw: dict, defaults: dict, prefix: str, missing: list[str]) -> dict:
    """`raw` with the keys of `defaults` it lacks added (recorded in `missing`), recursively."""
    filled = dict(raw)
    for key, default in defaults.items():
        dotted = f"{prefix}.{key}"
        if key not in raw:
            filled[key] = default
            missing.append(f"{dotted}={default!r}")
        elif isinstance(default, dict) and isinstance(raw[key], dict):
            filled[key] = _fill_missing(raw[key], default, dotted, missing)
    return filled


def to_dict(config: Config) -> dict:
    """Plain nested dict (JSON-serialisable) of a parsed config, for saving next to checkpoints."""
    return dataclasses.asdict(config)


def _build(cls: type, raw: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {names}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    values = {}
    for name in names:
        if name not in raw:
            raise ConfigError(
                f"missing config key '{prefix}{name}' (every key lives in sft_jax/configs/base.py)"
            )
        values[name] = _coerce(hints[name], raw[name], f"{prefix}{name}")
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a section, got {value!r}")
        return _build(hint, value, prefix=f"{key}.")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    if typing.get_origin(hint) is tuple or isinstance(hint, types.GenericAlias):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a tuple, got {value!r}")
        if typing.get_args(hint)[0] is str:
            if not all(isinstance(v, str) for v in value):
                raise ConfigError(f"config key '{key}' must be a tuple of strings, got {value!r}")
            return tuple(value)
        return tuple(tuple(_freeze(v) for v in item) for item in value)
    return value


def _freeze(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# HF module names `lora.modules_to_save` accepts (sft_jax.lora.SAVEABLE_MODULES; a test checks).
SAVEABLE_LORA_MODULES = (
    "embed_tokens",
    "lm_head",
    "norm",
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
    "q_norm",
    "k_norm",
)

_CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat": REMAT_POLICIES,
    "model.attention": IMPLEMENTATIONS,
    "model.moe_dispatch": MOE_DISPATCH,
    "optim.state_dtype": ("float32", "bfloat16"),
    "train.host_allocator": ("auto", "retain", "system"),
    "data.on_bad_row": ("error", "skip"),
    "data.format": ("auto", "text", "prompt_completion", "alpaca", "sharegpt", "messages"),
    "data.train_on": ("all_assistant", "last_assistant", "completion", "all"),
    "data.overlong": ("truncate", "split", "drop"),
    "data.on_control_tokens": ("warn", "keep", "error"),
    "distributed.expected_platform": ("", "cpu", "gpu", "tpu"),
    "lora.base_dtype": ("float32", "bfloat16"),
    "lora.base_quant": ("none", "int8", "nf4"),
    "lora.method": ("lora", "oft", "boft", "prefix", "prompt"),
    "checkpoint.rewind_rule": ("task", "eval_loss", "retention", "knee"),
    "checkpoint.rewind_metric": ("eval_loss", "generation"),
    "logging.wandb_mode": ("online", "offline"),
}


def _validate(c: Config) -> None:
    """Choices, value ranges and the mesh shape; the first violation raises ConfigError."""
    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        _check_choice(key, getattr(getattr(c, section), name), allowed)
    for key, ok, message in _range_checks(c):
        if not ok:
            raise ConfigError(f"config key '{key}' {message}")
    sizes = (c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh sizes (data, fsdp, tensor) = {sizes}: each >= 1, at most one -1")
    _validate_context(c)
    _validate_expert(c)


def _validate_expert(c: Config) -> None:
    """The expert axis is an explicit size (never -1: the experts must divide by it, so "the
    rest of the devices" would rarely fit)."""
    n = c.mesh.expert
    if n < 1:
        raise ConfigError(
            f"config key 'mesh.expert' is {n}; it must be >= 1 (1: off; the number of devices "
            "a mixture-of-experts layer's experts are split over)"
        )
    if n > 1 and c.model.moe_dispatch == "all_to_all":
        batch_axes = dict(c.mesh.rules).get("batch") or ()
        batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
        if "expert" not in batch_axes:
            raise ConfigError(
                "model.moe_dispatch='all_to_all' needs the batch split over the expert axis, but "
                f"mesh.rules gives batch {batch_axes}; add 'expert' to the batch rule (as the "
                "default rules do) or use moe_dispatch='auto'"
            )


def _validate_context(c: Config) -> None:
    """Context parallelism's constraints, before any device is touched: the sequence must cut
    into 2 x context chunks (two per device, one early and one late, to balance the causal
    work), and only ring attention and splash attend across a split sequence."""
    n = c.mesh.context
    if n < 1:
        raise ConfigError(f"config key 'mesh.context' is {n}; it must be >= 1 (1: off)")
    if n == 1:
        return
    if c.data.seq_len % (2 * n):
        raise ConfigError(
            f"data.seq_len={c.data.seq_len} must be a multiple of 2 x mesh.context = {2 * n}: "
            "context parallelism cuts each row into two chunks per context device"
        )
    if c.lora.enabled and c.lora.method in ("prefix", "prompt"):
        raise ConfigError(
            f"lora.method={c.lora.method!r} cannot run under mesh.context={n}: its prefix "
            "attention masks rows in slot order, which context parallelism permutes"
        )
    if c.model.attention not in ("auto", "splash"):
        raise ConfigError(
            f"model.attention={c.model.attention!r} cannot run under mesh.context={n}: the "
            "sequence is split over devices and only ring attention and splash (TPU) attend "
            "across the split; use model.attention='auto' (it picks one of them)"
        )


def _check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"config key '{key}' is {value!r}; choose one of {allowed}")


def _range_checks(c: Config) -> list[tuple[str, bool, str]]:
    """(key, whether its value is valid, what it must be), in the order keys are reported."""
    return [*_run_checks(c), *_eval_and_output_checks(c)]


def _run_checks(c: Config) -> list[tuple[str, bool, str]]:
    """The data, optimizer and training-loop keys."""
    return [
        ("data.seq_len", c.data.seq_len >= 8, "must be >= 8"),
        (
            "model.loss_chunk",
            c.model.loss_chunk >= -1,
            "must be >= -1 (-1: automatic, 0: unchunked)",
        ),
        ("data.pack_window", c.data.pack_window >= 1, "must be >= 1"),
        ("data.eval_fraction", 0.0 <= c.data.eval_fraction < 1.0, "must be in [0, 1)"),
        ("data.max_eval_examples", c.data.max_eval_examples >= 0, "must be >= 0"),
        ("data.num_workers", c.data.num_workers >= 0, "must be >= 0 (0 = automatic)"),
        ("data.shards", c.data.shards >= 0, "must be >= 0 (0 = one per process)"),
        ("data.prefetch", c.data.prefetch >= 0, "must be >= 0 (0: no prefetch thread)"),
        ("data.stream_buffer", c.data.stream_buffer >= 1, "must be >= 1"),
        (
            "data.streaming",
            not (c.data.streaming and c.data.cache_dir == "off"),
            "reads the tokenisation cache: data.cache_dir must not be 'off'",
        ),
        ("optim.learning_rate", 0 < c.optim.learning_rate < 3.4e38, "must be in (0, 3.4e38)"),
        ("optim.warmup_steps", c.optim.warmup_steps >= -1, "must be >= 0 (-1: warmup_ratio)"),
        ("optim.warmup_ratio", 0.0 <= c.optim.warmup_ratio < 1.0, "must be in [0, 1)"),
        ("optim.weight_decay", c.optim.weight_decay >= 0, "must be >= 0"),
        ("optim.eps", c.optim.eps > 0, "must be > 0"),
        ("optim.end_lr_ratio", 0.0 <= c.optim.end_lr_ratio <= 1.0, "must be in [0, 1]"),
        ("optim.b1", 0.0 <= c.optim.b1 < 1.0, "must be in [0, 1)"),
        ("optim.b2", 0.0 <= c.optim.b2 < 1.0, "must be in [0, 1)"),
        ("optim.clip_norm", c.optim.clip_norm >= 0, "must be >= 0 (0 disables clipping)"),
        ("train.global_batch_size", c.train.global_batch_size >= 1, "must be >= 1"),
        ("train.micro_batches", c.train.micro_batches >= 1, "must be >= 1"),
        (
            "train.micro_batches",
            c.train.global_batch_size % max(c.train.micro_batches, 1) == 0,
            f"must divide train.global_batch_size ({c.train.global_batch_size})",
        ),
        (
            "train.epochs",
            c.train.epochs > 0 or c.train.max_steps > 0,
            "or train.max_steps must be > 0",
        ),
        ("train.log_every", c.train.log_every >= 1, "must be >= 1"),
        ("eval.batch_size", c.eval.batch_size >= 1, "must be >= 1"),
        ("train.max_nonfinite_steps", c.train.max_nonfinite_steps >= 1, "must be >= 1"),
        ("train.loss_spike_factor", c.train.loss_spike_factor >= 0, "must be >= 0 (0: off)"),
        ("train.neftune_alpha", c.train.neftune_alpha >= 0, "must be >= 0 (0: off; paper: 5)"),
        ("train.kl_to_base", c.train.kl_to_base >= 0, "must be >= 0 (0: off)"),
        (
            "train.router_aux_loss_coef",
            c.train.router_aux_loss_coef >= 0 or c.train.router_aux_loss_coef == -1,
            "must be >= 0 (0: off) or -1 (the model's own, from its config.json)",
        ),
        ("train.router_z_loss_coef", c.train.router_z_loss_coef >= 0, "must be >= 0 (0: off)"),
        (
            "train.kl_to_base",
            c.train.kl_to_base == 0 or c.model.loss_chunk <= 0,
            "needs model.loss_chunk 0 or -1 (the KL is computed from whole logits)",
        ),
    ]


def _eval_and_output_checks(c: Config) -> list[tuple[str, bool, str]]:
    """Evaluation, checkpoint, fault-injection, LoRA and logging keys."""
    return [
        ("eval.every_steps", c.eval.every_steps >= 0, "must be >= 0 (0: only at the end)"),
        ("eval.early_stopping_patience", c.eval.early_stopping_patience >= 0, "must be >= 0"),
        *_eval_match_checks(c.eval),
        ("eval.samples", c.eval.samples >= 0, "must be >= 0 (0: off)"),
        (
            "eval.early_stopping_patience",
            c.eval.early_stopping_patience == 0 or c.eval.every_steps > 0,
            "needs eval.every_steps > 0 (early stopping compares periodic evaluations)",
        ),
        ("checkpoint.every_steps", c.checkpoint.every_steps >= 0, "must be >= 0"),
        ("checkpoint.every_minutes", c.checkpoint.every_minutes >= 0, "must be >= 0 (0: off)"),
        ("checkpoint.keep", c.checkpoint.keep >= 1, "must be >= 1"),
        ("checkpoint.keep_best", c.checkpoint.keep_best >= 0, "must be >= 0 (0: off)"),
        ("checkpoint.rewind_tolerance", c.checkpoint.rewind_tolerance >= 0, "must be >= 0"),
        (
            "checkpoint.rewind_rule",
            c.checkpoint.rewind_rule != "retention"
            or (c.checkpoint.rewind_to_best and bool(c.eval.general_text_files)),
            "'retention' needs checkpoint.rewind_to_best and eval.general_text_files (the "
            "general text whose loss measures retention)",
        ),
        (
            "checkpoint.rewind_rule",
            c.checkpoint.rewind_rule != "knee"
            or (c.checkpoint.rewind_to_best and bool(c.eval.general_text_files)),
            "'knee' needs checkpoint.rewind_to_best and eval.general_text_files (its second "
            "axis is the general-text loss)",
        ),
        (
            "checkpoint.rewind_metric",
            c.checkpoint.rewind_metric != "generation" or c.eval.generate_examples > 0,
            "'generation' needs eval.generate_examples > 0 (held-out prompts to score each "
            "kept checkpoint on)",
        ),
        ("faults.kill_at_step", c.faults.kill_at_step >= 0, "must be >= 0 (0: off)"),
        ("faults.sigterm_at_step", c.faults.sigterm_at_step >= 0, "must be >= 0 (0: off)"),
        ("faults.nan_at_step", c.faults.nan_at_step >= 0, "must be >= 0 (0: off)"),
        ("faults.nan_steps", c.faults.nan_steps >= 1, "must be >= 1"),
        (
            "faults.kill_during_save",
            not c.faults.kill_during_save or c.faults.kill_at_step > 0,
            "needs faults.kill_at_step > 0",
        ),
        ("data.train_files", bool(c.data.train_files), "must name at least one file"),
        ("lora.rank", c.lora.rank >= 1, "must be >= 1"),
        ("lora.alpha", c.lora.alpha > 0, "must be > 0"),
        ("lora.dropout", 0.0 <= c.lora.dropout < 1.0, "must be in [0, 1)"),
        ("lora.lr_ratio_b", c.lora.lr_ratio_b > 0, "must be > 0"),
        (
            "lora.modules_to_save",
            set(c.lora.modules_to_save) <= set(SAVEABLE_LORA_MODULES),
            f"entries must be among {SAVEABLE_LORA_MODULES}",
        ),
        *_oft_checks(c.lora),
        (
            "logging.wandb_project",
            not c.logging.wandb or bool(c.logging.wandb_project),
            "must name a W&B project when logging.wandb is true",
        ),
    ]


def _oft_checks(lo: LoraSection) -> list[tuple[str, bool, str]]:
    """OFT's, prefix and prompt tuning's own keys, and the LoRA-only ones they have no use for
    (never silently ignored)."""
    other = lo.method != "lora"
    only_lora = f"is LoRA's; lora.method={lo.method!r} has no"
    prefix = lo.method in ("prefix", "prompt")
    return [
        ("lora.oft_block_size", lo.oft_block_size >= 2, "must be >= 2"),
        ("lora.oft_eps", lo.oft_eps > 0, "must be > 0"),
        ("lora.oft_neumann_terms", lo.oft_neumann_terms >= 1, "must be >= 1"),
        ("lora.boft_block_size", lo.boft_block_size >= 0, "must be >= 0"),
        ("lora.boft_block_num", lo.boft_block_num >= 0, "must be >= 0"),
        (
            "lora.boft_block_size",
            (lo.boft_block_size == 0) != (lo.boft_block_num == 0),
            "exactly one of lora.boft_block_size and lora.boft_block_num must be non-zero (as "
            "PEFT's BOFTConfig)",
        ),
        ("lora.boft_n_butterfly_factor", lo.boft_n_butterfly_factor >= 1, "must be >= 1"),
        ("lora.num_virtual_tokens", lo.num_virtual_tokens >= 1, "must be >= 1"),
        ("lora.prefix_hidden_size", lo.prefix_hidden_size >= 0, "must be >= 0 (0: K x H)"),
        (
            "lora.prefix_projection",
            not (lo.prefix_projection and (lo.method != "prefix" or lo.init_from)),
            "needs lora.method='prefix' and no lora.init_from (PEFT saves only the K/V its "
            "encoder gives, not the encoder)",
        ),
        ("lora.dora", not (other and lo.dora), f"{only_lora} magnitudes"),
        ("lora.dropout", not (other and lo.dropout > 0), f"{only_lora} adapter-input dropout"),
        ("lora.lr_ratio_b", not (other and lo.lr_ratio_b != 1.0), f"{only_lora} B matrix"),
        (
            "lora.modules_to_save",
            not (prefix and lo.modules_to_save),
            f"is not supported with lora.method={lo.method!r}",
        ),
    ]


def _eval_match_checks(e: EvalSection) -> list[tuple[str, bool, str]]:
    """eval.match names known, distinct metrics; eval.answer_regex compiles when regex is used."""
    unknown = [m for m in e.matches if m not in GENERATION_MATCHES]
    error = None
    try:
        re.compile(e.answer_regex)
    except re.error as exc:
        error = str(exc)
    return [
        (
            "eval.match",
            bool(e.matches) and not unknown and len(set(e.matches)) == len(e.matches),
            f"is {e.match!r}; give one or more distinct comma-separated names of "
            f"{GENERATION_MATCHES}" + (f" (unknown: {', '.join(unknown)})" if unknown else ""),
        ),
        (
            "eval.answer_regex",
            "regex" not in e.matches or bool(e.answer_regex),
            "must be set when eval.match includes 'regex' (e.g. '####\\s*(-?[\\d,.]+)')",
        ),
        ("eval.answer_regex", error is None, f"{e.answer_regex!r} does not compile: {error}"),
    ]
