"""Export to a Hugging Face directory that transformers (and so vLLM) loads as is.

    python -m sft_jax.export --workdir W --out DIR [--step N] [--dtype bfloat16] [--overwrite]
    python -m sft_jax.export --workdir W --out DIR --peft      (a LoRA run: the adapter only)
    python -m sft_jax.export --peft-adapter A --out DIR [--base B]  (merge a PEFT adapter)

writes `config.json`, `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`
(metadata format "pt", without which transformers refuses the files), the tokenizer files with
the chat template used in training, and `generation_config.json`. `--overwrite` first removes
the files an earlier export wrote; `--out` may not be the workdir, the base model or the
tokenizer directory.

Why it is built this way:
- config.json is the source checkpoint's own file when there is one (it already describes the
  architecture exactly, including fields we only validate), with dtype and tying updated; a
  randomly initialised model gets a Llama (or Qwen2/Qwen3, or for experts Mixtral, Qwen2-MoE,
  Qwen3-MoE, OLMoE) config derived from ModelConfig. Expert weights are written one tensor per
  expert, as the Hub checkpoints of each family are (Mixtral under its own names), except
  gpt-oss's: fused per layer as transformers stores them, and dequantized (bfloat16 or the
  export dtype, no quantization_config) where the Hub's checkpoints hold MXFP4.
- Weights go one leaf at a time: a leaf is copied to the host (gathered across processes on
  multi-host), split into its per-layer HF tensors and streamed into the shard files; only
  process 0 writes. The shard layout is planned from shapes before any bytes are written, so
  file names can carry the shard count.
- A LoRA run's checkpoints hold only adapters: the base is re-read from `model.path` (or
  re-initialised from the seed), and the adapters are merged into it (at the base's own stored
  precision, as PEFT's merge would) for the HF export, or written as a PEFT adapter (`--peft`).
- The tokenizer files are copied byte for byte (a re-save through transformers can change ids).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import sys
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from sft_jax import hf
from sft_jax.api import TrainedModel, load_workdir
from sft_jax.hf.safetensors import write_safetensors
from sft_jax.model.decoder import ModelConfig
from sft_jax.workdir import best_step, is_workdir

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
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
# What an export writes (and --overwrite removes first: transformers would load a stale
# model.safetensors instead of new shards): weights of either kind, configs, tokenizer files.
EXPORT_FILES = (
    *TOKENIZER_FILES,
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
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
    layout = hf.export_layout(model_config, source_model_dir)
    copied = hf.copied_tensors(source_model_dir, layout) if writer else ({}, None)
    _write_weights(flat, model_config, out_dir, out_dtype, max_shard_bytes, writer, layout, copied)
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


def _plan_shards(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Consecutive groups of tensors (key -> bytes) of at most `limit` bytes (a bigger tensor
    gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, nbytes in sizes.items():
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _write_weights(
    flat: dict,
    c: ModelConfig,
    out_dir: str,
    dtype: np.dtype,
    limit: int,
    writer: bool,
    layout: hf.MoeLayout,
    copied: tuple[dict, Any],
) -> None:
    """Our tensors in `dtype`, then the source's `copied` ones (hf.copied_tensors: key ->
    (shape, stored dtype), and their reader) byte for byte in their own dtype."""
    plan = hf.hf_tensor_plan(c, layout)
    leaves = {path for t in plan for path in t.leaves}
    if set(flat) != leaves:
        diff = sorted(set(flat) ^ leaves)
        raise ExportError(f"parameter tree does not match the model config: {diff}")
    if not writer:  # take part in the gathers, in the same leaf order as the writer
        for path in dict.fromkeys(path for t in plan for path in t.leaves):
            _host_copy(flat[path])
        return
    copied_info, read_copied = copied
    entry = {t.key: (t.shape, dtype) for t in plan} | copied_info
    sizes = {key: int(np.prod(shape)) * np.dtype(dt).itemsize for key, (shape, dt) in entry.items()}
    shards = _plan_shards(sizes, limit)
    current: dict[tuple[str, ...], np.ndarray] = {}
    by_key = {t.key: t for t in plan}

    def produce(key: str) -> np.ndarray:
        if key in copied_info:
            return read_copied(key)
        tensor = by_key[key]
        if tensor.leaf not in current:  # plan order is leaf-grouped: each leaf fetched once
            current.clear()
            for path in tensor.leaves:  # several for fused tensors (gpt-oss, Phi-3)
                current[path] = _host_copy(flat[path])
        joined = tuple(current[path] for path in tensor.joins)
        return hf.to_hf_tensor(c, tensor, current[tensor.leaf], layout, joined).astype(dtype)

    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        entries = [(key, *entry[key]) for key in shard]
        write_safetensors(os.path.join(out_dir, name), entries, produce, {"format": "pt"})
        for key in shard:
            weight_map[key] = name
            total += sizes[key]
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(os.path.join(out_dir, "model.safetensors.index.json"), index)


def _write_json(path: str, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _write_tokenizer(tokenizer_dir: str, out_dir: str, chat_template: str | None) -> Any:
    """Copies the tokenizer files byte for byte; a training chat template other than the
    tokenizer's own is written beside them (chat_template.jinja, and the tokenizer_config.json
    key that older readers use). Never re-saved through transformers: save_pretrained rewrites
    a SentencePiece-style tokenizer.json (its normalizer becomes a Metaspace pre-tokenizer), so
    text after a special token would get other ids than in training."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer_dir, n))]
    if chat_template is not None:  # the tokenizer's own template files are replaced
        names = [n for n in names if n not in TEMPLATE_FILES]
    if not names:  # none of the usual files (a tokenizer transformers converts on load)
        tokenizer.chat_template = chat_template or tokenizer.chat_template
        tokenizer.save_pretrained(out_dir)
        return tokenizer
    for name in names:
        shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
    if chat_template is None:
        return tokenizer
    with open(os.path.join(out_dir, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(chat_template)
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        config["chat_template"] = chat_template
        _write_json(config_path, config)
    return tokenizer


def _dtype_name(dtype: np.dtype) -> str:
    return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[dtype.name]


def _write_config(
    c: ModelConfig, out_dir: str, source: str | None, dtype: np.dtype, tokenizer: Any
) -> None:
    source_file = os.path.join(source, "config.json") if source else ""
    if source_file and os.path.isfile(source_file):
        with open(source_file, encoding="utf-8") as f:
            config = hf.text_only_config(json.load(f))  # Qwen3.5: its language model only
        config["tie_word_embeddings"] = c.tie_embeddings
        # The weights are written dequantized (gpt-oss's MXFP4 experts included).
        config.pop("quantization_config", None)
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


def export_peft(run: TrainedModel, out_dir: str) -> None:
    """Writes a LoRA run's adapter as PEFT's adapter_config.json + adapter_model.safetensors,
    with the tokenizer, the training chat template and the generation config beside it, so
    the adapter directory alone serves chat (`python -m sft_jax.generate --model OUT`)."""
    from sft_jax import lora

    if run.adapters is None or run.lora is None:
        raise ExportError("--peft needs a LoRA run (lora.enabled in its config.json)")
    c = run.lora
    multimodal = hf.is_multimodal(run.source_model_dir)  # keys of its language model
    fused = hf.export_layout(run.model_config, run.source_model_dir or None).fused_proj
    method = c.get("method", "lora")
    if method in ("oft", "boft") and (multimodal or fused):
        raise ExportError(
            f"--peft of an {method.upper()} run is not supported for a multimodal checkpoint or "
            "one with fused projections (qkv_proj, gate_up_proj): PEFT rotates a fused module's "
            "input once, ours per projection; export it merged instead"
        )
    adapters = jax.device_get(lora.oft_projected(run.adapters, lora.oft_spec(c)))
    if method in lora.prefix.PEFT_TYPES:
        config = lora.prefix.peft_config(adapters, run.model_config, base=run.source_model_dir)
    elif method in ("oft", "boft"):
        tied = run.model_config.tie_embeddings
        write_config = lora.oft_peft_config if method == "oft" else lora.boft_peft_config
        config = write_config(adapters, c, base=run.source_model_dir, tied_embeddings=tied)
    else:
        config = lora.peft_config(
            adapters,
            rank=c["rank"],
            alpha=c["alpha"],
            rslora=c["rslora"],
            dropout=c.get("dropout", 0.0),
            base=run.source_model_dir,
            tied_embeddings=run.model_config.tie_embeddings,
            language_model=multimodal,
            fused=fused,
        )
    if jax.process_index() != 0:
        return
    period = len(run.model_config.period)  # a hybrid model's layers per scanned block
    lora.write_peft_adapter(
        out_dir, adapters, config, language_model=multimodal, fused=fused, period=period
    )
    tokenizer = _write_tokenizer(run.tokenizer_dir, out_dir, run.chat_template)
    _write_generation_config(out_dir, (run.source_model_dir, run.tokenizer_dir), tokenizer)


CHECKPOINT_FOLDERS = ("checkpoints", "checkpoints.corrupt")  # a workdir's, managed by the run


def check_out_dir(out: str, overwrite: bool, inputs: dict[str, str]) -> None:
    """Refuses an --out that is one of the export's inputs (`inputs`: what -> directory), since
    --overwrite would delete what is being read, or that is not empty without --overwrite."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"--out {out} exists and is not a directory")
    for what, path in inputs.items():
        if path and os.path.isdir(path) and os.path.isdir(out) and os.path.samefile(path, out):
            raise ExportError(f"--out {out} is the {what}; write the export somewhere else")
    if os.path.isdir(out) and is_workdir(out):
        raise ExportError(
            f"--out {out} is a training workdir; --overwrite would replace its config.json, "
            "and the run could no longer resume or export: write the export somewhere else"
        )
    holder = _checkpoints_holding(out)
    if holder:
        raise ExportError(
            f"--out {out} is inside the checkpoints of the training workdir {holder}, which the "
            "run manages (a resume would move an unknown step directory aside): write the export "
            "somewhere else"
        )
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ExportError(f"{out} is not empty; pass --overwrite to write into it")


def _checkpoints_holding(out: str) -> str | None:
    """The training workdir whose checkpoints folder (or its quarantine) `out` lies in, if any."""
    child = os.path.realpath(out)
    parent = os.path.dirname(child)
    while parent != child:
        in_checkpoints = os.path.basename(child) in CHECKPOINT_FOLDERS
        if in_checkpoints and os.path.isdir(parent) and is_workdir(parent):
            return parent
        child, parent = parent, os.path.dirname(parent)
    return None


def clear_out_dir(out: str) -> None:
    """Removes what an earlier export wrote into `out` (EXPORT_FILES); other files stay."""
    if not os.path.isdir(out):
        return
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if os.path.isfile(path) and any(fnmatch.fnmatchcase(name, p) for p in EXPORT_FILES):
            os.remove(path)


# --------------------------------------------------------------------------------------------
# Command line: a trained workdir -> HF directory.


def resolve_step(workdir: str, step: str | None) -> int | None:
    """None (latest), an explicit step number, or "best" from the run's rewind result."""
    if step is None:
        return None
    if step == "best":
        return best_step(workdir)
    if not step.isdigit():
        raise ExportError(f"--step must be a number or 'best', not {step!r}")
    return int(step)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sft_jax.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="training workdir (config.json + checkpoints)")
    source.add_argument(
        "--peft-adapter",
        "--peft_adapter",
        dest="peft_adapter",
        help="PEFT LoRA adapter directory: merge it into its base (no training needed)",
    )
    parser.add_argument("--out", required=True, help="output HF model directory")
    parser.add_argument(
        "--base",
        default=None,
        help="with --peft-adapter: the base model directory (default: the adapter config's "
        "base_model_name_or_path)",
    )
    parser.add_argument(
        "--step",
        default=None,
        help="checkpoint step (default latest), or 'best': the kept checkpoint chosen by "
        "checkpoint.rewind_to_best under checkpoint.rewind_rule (summary.json's best_step)",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    parser.add_argument("--overwrite", action="store_true", help="allow a non-empty --out")
    parser.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES)
    parser.add_argument("--peft", action="store_true", help="LoRA run: write the PEFT adapter")
    args = parser.parse_args(argv)
    source_dir = args.workdir or args.peft_adapter
    try:
        _check_flags(args)
        inputs = {"workdir": args.workdir, "adapter directory": args.peft_adapter}
        check_out_dir(args.out, args.overwrite, inputs)  # before the (slow) load
        run = _load_source(args)
        inputs |= {"base model": run.source_model_dir, "tokenizer directory": run.tokenizer_dir}
        check_out_dir(args.out, args.overwrite, inputs)
        if jax.process_index() == 0:
            clear_out_dir(args.out)
        if args.peft:
            export_peft(run, args.out)
            print(f"exported the LoRA adapter of step {run.step} of {source_dir} to {args.out}")
            return 0
        if "prefix_k" in run.params.get("layers", {}).get("attn", {}):
            raise ExportError(
                "a prefix- or prompt-tuned model has no merged form (its prefix is not a "
                "weight): export the run with --peft, or use the PEFT adapter as it is"
            )
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
    except (ExportError, OSError, ValueError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    what = f"step {run.step} of {source_dir}" if args.workdir else f"{source_dir} merged"
    print(f"exported {what} to {args.out}")
    return 0


def _check_flags(args: argparse.Namespace) -> None:
    """Flags the export would otherwise ignore: a --dtype the PEFT adapter is not written in,
    and a shard size below one byte (every tensor then went to a shard of its own)."""
    if args.peft and args.dtype:
        raise ExportError(
            "--dtype goes with the merged export; --peft writes the adapter in its trained dtype"
        )
    if args.max_shard_bytes < 1:
        raise ExportError(f"--max-shard-bytes must be positive, not {args.max_shard_bytes}")


def _load_source(args: argparse.Namespace) -> TrainedModel:
    """The workdir's checkpoint, or a PEFT adapter merged into its base."""
    if args.workdir:
        if args.base:
            raise ExportError("--base goes with --peft-adapter (a workdir names its base)")
        return load_workdir(args.workdir, resolve_step(args.workdir, args.step))
    if args.peft or args.step:
        raise ExportError("--peft and --step go with --workdir, not --peft-adapter")
    from sft_jax.api import load_peft

    return load_peft(args.peft_adapter, base=args.base, param_dtype=None)


if __name__ == "__main__":
    sys.exit(main())
