"""The config's sections as typed, frozen dataclasses: one per top-level key of
sft_jax/configs/base.py, whose comments document every field. `sft_jax.config.parse` builds them
and checks their values; library code reads their attributes only."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    tie_embeddings: bool
    qk_norm: bool
    attention_bias: bool
    max_position_embeddings: int
    # Mixture of experts (every layer; 0 experts: dense). HF config names.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False


@dataclasses.dataclass(frozen=True)
class ModelSection:
    path: str
    dtype: str
    param_dtype: str
    remat: str
    attention: str
    scan_layers: bool
    loss_chunk: int
    arch: ArchConfig
    moe_dispatch: str = "auto"


@dataclasses.dataclass(frozen=True)
class DataSection:
    train_files: str
    eval_files: str
    eval_fraction: float
    tokenizer: str
    seq_len: int
    pack_window: int
    max_eval_examples: int
    on_bad_row: str
    format: str
    field_map: str
    ignore_fields: str
    chat_template: str
    train_on: str
    overlong: str
    on_control_tokens: str
    num_workers: int
    shards: int
    pack_split: bool
    prefetch: int
    cache_dir: str
    streaming: bool
    stream_buffer: int


@dataclasses.dataclass(frozen=True)
class OptimSection:
    learning_rate: float
    warmup_ratio: float
    warmup_steps: int
    end_lr_ratio: float
    weight_decay: float
    b1: float
    b2: float
    eps: float
    clip_norm: float
    state_dtype: str


@dataclasses.dataclass(frozen=True)
class TrainSection:
    global_batch_size: int
    micro_batches: int
    epochs: float
    max_steps: int
    log_every: int
    progress_bar: bool
    max_nonfinite_steps: int
    loss_spike_factor: float
    loss_spike_min_delta: float
    neftune_alpha: float
    kl_to_base: float
    host_allocator: str
    router_aux_loss_coef: float
    router_z_loss_coef: float


GENERATION_MATCHES = ("exact", "contains", "regex")


@dataclasses.dataclass(frozen=True)
class EvalSection:
    every_steps: int
    batch_size: int
    generate_examples: int
    max_new_tokens: int
    match: str  # comma-separated GENERATION_MATCHES; the first is the primary one
    answer_regex: str
    samples: int
    general_text_files: str
    early_stopping_patience: int

    @property
    def matches(self) -> tuple[str, ...]:
        """The generation metrics of `match`, in order (first = primary, used for `correct`)."""
        return tuple(m.strip() for m in self.match.split(",") if m.strip())


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every_steps: int
    every_minutes: float
    keep: int
    keep_best: int
    async_save: bool
    rewind_to_best: bool
    rewind_rule: str
    rewind_metric: str
    rewind_tolerance: float


@dataclasses.dataclass(frozen=True)
class FaultsSection:
    """Fault injection for tests (all off by default); steps count completed updates (1-based)."""

    kill_at_step: int
    kill_during_save: bool
    sigterm_at_step: int
    nan_at_step: int
    nan_steps: int


@dataclasses.dataclass(frozen=True)
class LoraSection:
    enabled: bool
    rank: int
    alpha: float
    targets: tuple[str, ...]
    rslora: bool
    lr_ratio_b: float
    base_dtype: str
    init_from: str
    dropout: float
    dora: bool
    base_quant: str
    modules_to_save: tuple[str, ...]
    method: str
    oft_block_size: int
    oft_block_share: bool
    oft_coft: bool
    oft_eps: float
    oft_cayley_neumann: bool
    oft_neumann_terms: int
    boft_block_size: int
    boft_block_num: int
    boft_n_butterfly_factor: int
    num_virtual_tokens: int
    prefix_projection: bool
    prefix_hidden_size: int


@dataclasses.dataclass(frozen=True)
class DistributedSection:
    coordinator_address: str
    num_processes: int
    process_id: int
    initialization_timeout_s: int
    expected_platform: str


@dataclasses.dataclass(frozen=True)
class MeshSection:
    data: int
    fsdp: int
    tensor: int
    rules: tuple[tuple[str, Any], ...]
    # Last, with defaults, so (data, fsdp, tensor, rules) built in code keep their meaning;
    # configs set them in configs/base.py like every other key.
    context: int = 1
    expert: int = 1


@dataclasses.dataclass(frozen=True)
class LoggingSection:
    """Where metrics go besides metrics.jsonl (process 0 only); see sft_jax/training/metrics.py."""

    tensorboard: bool
    wandb: bool
    wandb_project: str
    wandb_entity: str
    wandb_run_name: str
    wandb_mode: str


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int
    model: ModelSection
    data: DataSection
    optim: OptimSection
    train: TrainSection
    eval: EvalSection
    checkpoint: CheckpointSection
    lora: LoraSection
    distributed: DistributedSection
    mesh: MeshSection
    faults: FaultsSection
    logging: LoggingSection
