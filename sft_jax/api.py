"""Load a trained model in one call, for use from Python (and by export and generate):

    import sft_jax

    model = sft_jax.load("runs/demo")          # a training workdir (latest checkpoint; step=N),
    model = sft_jax.load("exported_hf_dir")    # a Hugging Face model directory,
    model = sft_jax.load("adapter_dir")        # or a PEFT LoRA adapter (its base is loaded too)
    model = sft_jax.load("base_dir", adapter="adapter_dir")
    logits = model([[1, 365, 471]])            # float32 [batch, length, vocab]
    text = model.generate("Once upon a time", max_new_tokens=20)

Why it is built this way:
- Everything goes through `TrainedModel` (parameters, model config, where the tokenizer and the
  generation config live, the training chat template): a workdir's checkpoint (`load_workdir`),
  an HF directory (`load_hf`) or a PEFT adapter merged into its base (`load_peft`). Export
  writes a TrainedModel; `LoadedModel` wraps one with its tokenizer for inference.
- A LoRA adapter's scale always comes from its own config (a workdir's `lora` section or the
  adapter_config.json), and the adapter is merged into the base (W + scale * A B, DoRA
  rescaled), so the loaded model is the plain architecture and cannot run at scale 0 by mistake.
- A workdir outlives the code that wrote it: it is read through sft_jax/workdir.py, which
  parses only the sections loading needs and gives keys added since their defaults.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax import hf, lora, paths
from sft_jax.model import decode
from sft_jax.model.decoder import ModelConfig, Transformer
from sft_jax.model.prefix import prefix_tree
from sft_jax.workdir import LoadError, is_workdir, open_checkpoint, read_config

DTYPES = ("float32", "bfloat16", "float16")
_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


# --------------------------------------------------------------------------------------------
# A trained workdir: its resolved config.json and its checkpoints.


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """What export and inference need: parameters, and where the tokenizer and config live."""

    params: Any
    model_config: ModelConfig
    step: int | None  # a workdir's checkpoint step; None for an HF directory or adapter
    tokenizer_dir: str
    source_model_dir: str  # "" for a randomly initialised model
    chat_template: str | None  # the Jinja source used in training, None = the tokenizer's own
    adapters: Any = None  # a LoRA run's adapter tree (params is then the merged model)
    lora: dict[str, Any] | None = None  # a LoRA run's `lora` config section


def load_workdir(workdir: str, step: int | None = None) -> TrainedModel:
    """Restores the parameters of `step` (latest when None) over a mesh of all devices.

    The workdir is read through sft_jax.workdir: only the sections loading needs, so a workdir
    stays loadable when unrelated config keys are added later, and keys of those sections that
    an older version did not write take their defaults.
    """
    from sft_jax.training import sharding
    from sft_jax.training.state import param_shardings

    saved = read_config(workdir)
    raw = {**saved.raw, "lora": dataclasses.asdict(saved.lora)}
    model_config = hf.build_model_config(saved.model)
    rules = saved.mesh.rules
    axes = tuple(a for a in sharding.MESH_AXES if a != sharding.EXPERT_AXIS)  # as make_mesh's
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(1, -1, 1, 1), axes)
    abstract, shardings = param_shardings(Transformer(model_config), mesh, rules)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    checkpointer, step = open_checkpoint(workdir, step)
    adapters = None
    if saved.lora.enabled:
        model = Transformer(model_config)
        params, adapters = _merged_lora(saved, model, mesh, checkpointer, step)
    else:
        params = checkpointer.restore_params(step, abstract)
    return TrainedModel(
        params=params,
        model_config=model_config,
        step=step,
        tokenizer_dir=saved.tokenizer_dir,
        source_model_dir=saved.model.path,
        chat_template=saved.chat_template,
        adapters=adapters,
        lora=raw["lora"] if adapters is not None else None,
    )


def _merged_lora(saved: Any, model: Any, mesh: Any, checkpointer: Any, step: int):
    """A LoRA run's (merged parameters, adapters): the base re-read (or re-initialised from the
    run's seed) at its stored precision, the adapters restored from `step` into the layout
    training gave them (`sft_jax.training.state.adapter_layout`) and merged in at the run's
    scale."""
    from sft_jax.training.state import adapter_layout, inference_merge, init_params

    rules, c = saved.mesh.rules, saved.lora
    base = init_params(model, saved.model.path, mesh, rules, saved.raw["seed"])
    adapters = checkpointer.restore_params(step, adapter_layout(base, base, c, mesh))
    out_shardings = jax.tree.map(lambda x: x.sharding, base)
    merged, _ = inference_merge(model, c, out_shardings, mesh)
    return merged(base, adapters), adapters


# --------------------------------------------------------------------------------------------
# A Hugging Face directory, and a PEFT adapter merged into its base.


def stored_dtype(model_dir: str) -> str:
    """The dtype a HF directory's config.json says its weights are stored in (float32 if
    unsaid): a merge at this precision is what PEFT's merge_and_unload gives."""
    raw = hf.read_config_json(os.path.join(model_dir, "config.json"))
    name = raw.get("torch_dtype") or raw.get("dtype")
    return name if name in DTYPES else "float32"


def load_hf(model_dir: str, *, param_dtype: str | None = "float32") -> TrainedModel:
    """A HF model directory; parameters in `param_dtype` (None: as stored), compute in float32."""
    param_dtype = param_dtype or stored_dtype(model_dir)
    config = hf.load_model_config(model_dir, dtype="float32", param_dtype=param_dtype, remat="none")
    return TrainedModel(
        params=hf.load_params(model_dir, config),
        model_config=config,
        step=None,
        tokenizer_dir=model_dir,
        source_model_dir=model_dir,
        chat_template=None,
    )


def resolve_peft_base(adapter_dir: str, base: str) -> str:
    """The local directory of an adapter's base (`base_model_name_or_path`): a directory as
    given (relative to the working directory, else to the adapter), or a Hub id's local
    snapshot (downloaded once; offline, the cached one)."""
    config_file = os.path.join(adapter_dir, lora.peft.CONFIG_FILE)
    if not base:
        raise LoadError(
            f"{config_file} names no base_model_name_or_path; pass the base model directory "
            "(export --base DIR, or sft_jax.load(BASE, adapter=ADAPTER))"
        )
    for candidate in (base, os.path.join(adapter_dir, base)):
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    if hf.looks_like_hub_id(base):
        return hf.resolve_model_dir(base)
    raise LoadError(
        f"{config_file}: base model {base!r} (base_model_name_or_path) is not a model "
        "directory here; pass the base model directory (export --base DIR, or "
        "sft_jax.load(BASE, adapter=ADAPTER))"
    )


def load_peft(
    adapter_dir: str, *, base: str | None = None, param_dtype: str | None = "float32"
) -> TrainedModel:
    """A PEFT LoRA adapter merged into its base (`base`, default the adapter config's). Rank,
    alpha, rsLoRA and DoRA come from adapter_config.json; the tokenizer from the adapter
    directory when it has one (sft_jax's --peft export writes the training template there)."""
    config = lora.read_peft_config(adapter_dir)
    base_dir = resolve_peft_base(adapter_dir, config.base if base is None else base)
    run = load_hf(base_dir, param_dtype=param_dtype)
    adapters = lora.read_peft_adapter(adapter_dir, run.params)
    model = Transformer(run.model_config)  # prompt tuning: its virtual tokens' K/V
    merge = lambda p, a: lora.merge(p, prefix_tree(model, p, a), config.scale, config.oft)
    merged = jax.jit(merge)(run.params, adapters)
    has_tokenizer = any(os.path.isfile(os.path.join(adapter_dir, n)) for n in _TOKENIZER_MARKERS)
    return dataclasses.replace(
        run,
        params=merged,
        tokenizer_dir=adapter_dir if has_tokenizer else base_dir,
        adapters=adapters,
    )


# --------------------------------------------------------------------------------------------
# One call: a path -> a model to call and generate with.


@functools.partial(jax.jit, static_argnums=0)
def _logits(model: Transformer, params: Any, tokens: jax.Array) -> jax.Array:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return model.apply({"params": params}, tokens, positions, jnp.ones_like(tokens))


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A trained model ready for inference: `model(ids)` gives logits, `model.generate(prompt)`
    text. `run` holds the parameters and where they came from; `model_dir` is the directory
    whose generation_config.json names the stop ids."""

    run: TrainedModel
    tokenizer: Any
    model_dir: str

    @property
    def module(self) -> Transformer:
        return Transformer(self.run.model_config)

    @property
    def params(self) -> Any:
        return self.run.params

    def __call__(self, ids: Any) -> np.ndarray:
        """float32 logits [batch, length, vocab] of int token ids [length] or [batch, length]."""
        tokens = np.asarray(ids, np.int32)
        single = tokens.ndim == 1
        out = np.asarray(_logits(self.module, self.params, tokens[None] if single else tokens))
        return out[0] if single else out

    def encode(self, prompt: str | list[dict[str, Any]]) -> list[int]:
        """Prompt ids: a string as raw text (with the tokenizer's BOS), a list of messages
        through the chat template (the training one, for a workdir) with a generation prompt."""
        from sft_jax.chat import encode

        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return encode(self.tokenizer, prompt)

    def generate(
        self,
        prompt: str | list[dict[str, Any]] | list[str] | list[list[dict[str, Any]]],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> str | list[str]:
        """The reply to one prompt (a string or a conversation, see `encode`), or to each of a
        list of them (batched). Greedy by default; stops at EOS and at the chat template's end
        of turn (one token or several), as `python -m sft_jax.generate` does."""
        from sft_jax.chat import chat_stops

        batch = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], dict)
        prompts = prompt if batch else [prompt]
        stops = chat_stops(self.tokenizer, self.model_dir)
        replies = decode.generate(
            self.module,
            self.params,
            [self.encode(p) for p in prompts],
            max_new_tokens=max_new_tokens,
            stop_ids=stops.ids,
            stop_sequences=stops.sequences,
            temperature=temperature,
            top_p=top_p,
            rng=jax.random.PRNGKey(seed),
        )
        to_text = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)
        texts = [decode.cut_at_stop_text(to_text(r), stops.texts) for r in replies]
        return texts if batch else texts[0]


def from_trained(run: TrainedModel, model_dir: str | None = None) -> LoadedModel:
    """`run` with its tokenizer (the training chat template set on it, for a workdir)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer_dir)
    if run.chat_template is not None:
        tokenizer.chat_template = run.chat_template
    return LoadedModel(run, tokenizer, run.source_model_dir if model_dir is None else model_dir)


def load(path: str, *, adapter: str | None = None, step: int | None = None) -> LoadedModel:
    """A training workdir (checkpoint `step`, default the latest), a Hugging Face model
    directory, or a PEFT LoRA adapter directory (merged into the base its config names), as a
    model to call and generate with. `adapter`: a PEFT adapter to merge into the HF directory
    `path`. Parameters and compute are float32 for an HF directory or adapter; a workdir keeps
    its training config's dtypes."""
    if paths.isfile(paths.join(path, lora.peft.CONFIG_FILE)):  # a workdir may be on gs://
        if adapter is not None:
            raise LoadError(f"{path} is a PEFT adapter itself; pass its base as the path")
        run = load_peft(path)
        return from_trained(run, _generation_dir(path, run.source_model_dir))
    config_file = paths.join(path, "config.json")
    if not paths.isfile(config_file):
        raise LoadError(f"{path}: no config.json or adapter_config.json: not a model to load")
    if is_workdir(path):
        if adapter is not None:
            raise LoadError(f"{path} is a training workdir; adapter= goes with an HF directory")
        return from_trained(load_workdir(path, step))
    if step is not None:
        raise LoadError(f"{path} is a Hugging Face directory: it has no checkpoint steps")
    if adapter is None:
        return from_trained(load_hf(path))
    return from_trained(load_peft(adapter, base=path), _generation_dir(adapter, path))


def _generation_dir(adapter_dir: str, base_dir: str) -> str:
    """An adapter's generation_config.json when it has one, else its base's."""
    if os.path.isfile(os.path.join(adapter_dir, "generation_config.json")):
        return adapter_dir
    return base_dir
