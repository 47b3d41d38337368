"""The decoder's configuration: `ModelConfig` (hashable, so it can sit in a jit-static Module)
and how a run's model section builds it. Kept apart from the Flax modules in model.py, which
re-exports everything here."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from sft_jax.model.gemma4_config import Gemma4Features, check_kv_sharing, layer_types
from sft_jax.model.hybrid import LinearAttention, layer_period

if TYPE_CHECKING:
    from sft_jax.config import ArchConfig, ModelSection

# jax is imported where it is used, so config.py can read the choices below without loading it.
REMAT_POLICIES = ("none", "dots", "dots_saveable", "full")  # sublayers.CHECKPOINT_POLICIES
# Attention implementations (model.attention); attention.py implements them.
IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "blocked", "reference")
ACTIVATIONS = ("silu", "gelu_tanh")
# How a mixture-of-experts layer's tokens reach experts split over devices (model.moe_dispatch);
# expert_dispatch.py implements them.
MOE_DISPATCH = ("auto", "all_gather", "all_to_all")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rescaling of the RoPE inverse frequencies: Llama-3 ("llama3"), "linear" (Gemma 3), YaRN
    ("yarn": gpt-oss, OLMo 3) or LongRoPE ("longrope": Phi-3/4), as transformers'
    modeling_rope_utils computes them."""

    factor: float
    low_freq_factor: float = 0.0  # llama3 only
    high_freq_factor: float = 0.0  # llama3 only
    original_max_position_embeddings: int = 0  # llama3, yarn, longrope
    rope_type: str = "llama3"
    beta_fast: float = 32.0  # yarn: the ramp's bounds, in rotations over the original length
    beta_slow: float = 1.0  # yarn
    truncate: bool = True  # yarn: round the ramp's bounds to whole dimensions
    # yarn, longrope: cos and sin are multiplied by this (so every score by its square);
    # transformers derives it from factor when config.json does not give it.
    attention_factor: float = 1.0
    # longrope: per-frequency divisors of the inverse frequencies; the long ones where a
    # sequence's largest position is beyond original_max_position_embeddings, else the short
    # ones (attention.longrope_tables).
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs; hashable so it can sit in a jit-static Module."""

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
    rope_scaling: RopeScaling | None
    dtype: str  # compute dtype of activations and matmuls: "float32" | "bfloat16"
    param_dtype: str  # storage dtype of the parameters
    remat: str  # "none" | "dots" | "dots_saveable" | "full": jax.checkpoint policy per layer
    # Gemma features; the defaults are the Llama behaviour.
    norm_offset: bool = False  # RMSNorm scale applied as (1 + w), zero-initialised
    embed_scale: bool = False  # embeddings times sqrt(hidden_size), in the compute dtype
    mlp_activation: str = "silu"  # "silu" | "gelu_tanh"
    sandwich_norms: bool = False  # extra norms after attention and after the MLP
    pre_norms: bool = True  # False: no norm before attention and MLP (OLMo 2/3: only the post)
    norm_scale_float32: bool = False  # norms multiply by w in float32, then cast (OLMo 2/3)
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    query_scale: float | None = None  # scores scaled by query_scale**-0.5 (else head_dim**-0.5)
    sliding_window: int | None = None  # a local layer's query sees keys less than this far back
    local_layers: tuple[bool, ...] = ()  # per layer: sliding window (empty: no local layers)
    local_rope_theta: float | None = None  # RoPE base of local layers (None: rope_theta, scaled)
    nope_layers: tuple[bool, ...] = ()  # per layer: no RoPE (SmolLM3's NoPE layers); empty: none
    # RoPE rotates the first int(head_dim * factor) dims of each head only (Phi-4-mini: 0.75,
    # Qwen3.5: 0.25).
    partial_rotary_factor: float = 1.0
    # With qk_norm: one RMSNorm over all heads' queries (N*H) and keys (K*H) instead of one per
    # head (H), as OLMoE does; its scales are then [N*H] and [K*H].
    qk_norm_full: bool = False
    # gpt-oss: a learned logit per query head in every softmax denominator (layers/attn/sinks
    # [L, N]), and a bias on o_proj [L, D] (q/k/v biases are attention_bias).
    attention_sinks: bool = False
    o_proj_bias: bool = False
    # LoRA (sft_jax/lora): used only when the "lora" variable collection is passed to apply.
    # alpha / r (or alpha / sqrt(r), rsLoRA); static, so jit-constant. None: applying adapters
    # is an error (a forgotten scale would otherwise silently give the base model).
    lora_scale: float | None = None
    lora_dropout: float = 0.0  # dropout on the adapter input, active only with a "dropout" rng
    # Performance levers (config keys model.attention, model.scan_layers); results never change.
    attention: str = "auto"  # auto | xla | cudnn | splash | blocked | reference (attention.py)
    scan_layers: bool = True  # False: the layer loop is unrolled (same parameter tree)
    moe_dispatch: str = "auto"  # auto | all_gather | all_to_all (expert_dispatch.py)
    # Where [B, T, D] activations live: batch over the mesh's batch axes (sharding.py's
    # activation_sharding). None: left to XLA's propagation, which under FSDP keeps each layer's
    # activations for the whole batch on every device.
    activation_sharding: Any = None
    # The jax.sharding.Mesh the model runs on and its logical-axis rules (config.mesh.rules): a
    # Pallas kernel (splash) runs under shard_map over them, and the mesh's devices decide the
    # platform "auto" resolves for (a TPU topology compiled on a CPU host is TPU). None: the
    # default backend, one device.
    mesh: Any = None
    mesh_rules: tuple = ()
    # NEFTune (train.neftune_alpha): uniform noise on the input embeddings while training.
    neftune_alpha: float = 0.0
    # Mixture of experts (sft_jax/model/moe.py; HF config names). num_experts 0: every layer has
    # the dense MLP; > 0: every layer has the MoE layer instead (one scanned layer for all).
    num_experts: int = 0
    num_experts_per_tok: int = 0  # top-k
    moe_intermediate_size: int = 0  # each routed expert's width
    norm_topk_prob: bool = False  # renormalise the top-k routing weights to sum 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on expert; 0: none
    router_aux_loss_coef: float = 0.0  # the family's load-balancing loss weight (config.json)
    # gpt-oss's experts (moe.MoeConfig): router and expert biases, clamped SwiGLU (None: off).
    router_bias: bool = False
    expert_bias: bool = False
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702
    # Hybrid linear attention (Qwen3.5; sft_jax/model/hybrid.py): per layer "full_attention" or
    # "linear_attention" (empty: every layer full attention), the Gated DeltaNet layers' shape,
    # and a sigmoid gate on the attention output from q_proj (its kernel [D, N, 2H]: per head the
    # query, then the gate).
    layer_types: tuple[str, ...] = ()
    linear_attention: LinearAttention | None = None
    attn_output_gate: bool = False
    # Gemma 4 (sft_jax/model/gemma4_config.py): per-layer head shapes, K/V sharing, per-layer
    # inputs; its layer types are `local_layers`. None: not Gemma 4.
    gemma4: Gemma4Features | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention"
            )
        if self.head_dim % 2 or self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(
                f"head_dim ({self.head_dim}) and its rotated part ({self.rotary_dim}) must be "
                "even and positive for RoPE"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat is {self.remat!r}; choose one of {REMAT_POLICIES}")
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"attention is {self.attention!r}; choose one of {IMPLEMENTATIONS}")
        if self.moe_dispatch not in MOE_DISPATCH:
            raise ValueError(f"moe_dispatch is {self.moe_dispatch!r}; choose one of {MOE_DISPATCH}")
        if self.mlp_activation not in ACTIVATIONS:
            raise ValueError(f"mlp_activation is {self.mlp_activation!r}; choose silu or gelu_tanh")
        if self.local_layers and len(self.local_layers) != self.num_layers:
            raise ValueError(f"local_layers has {len(self.local_layers)} entries, not num_layers")
        if self.nope_layers and len(self.nope_layers) != self.num_layers:
            raise ValueError(f"nope_layers has {len(self.nope_layers)} entries, not num_layers")
        if not (self.pre_norms or self.sandwich_norms):
            raise ValueError("pre_norms=False (post-norm layers) needs sandwich_norms")
        if self.qk_norm_full and not self.qk_norm:
            raise ValueError("qk_norm_full (the q/k norm over all heads) needs qk_norm")
        if any(self.local_layers) and not self.sliding_window:
            raise ValueError("local_layers are set but sliding_window is not")
        if self.num_experts and not (
            0 < self.num_experts_per_tok <= self.num_experts and self.moe_intermediate_size > 0
        ):
            raise ValueError(
                f"num_experts={self.num_experts} needs 1 <= num_experts_per_tok "
                f"({self.num_experts_per_tok}) <= num_experts and moe_intermediate_size > 0 "
                f"({self.moe_intermediate_size})"
            )
        self._check_hybrid()
        self._check_gemma4()

    def _check_gemma4(self) -> None:
        if self.gemma4 is None:
            return
        if len(self.local_layers) != self.num_layers:
            raise ValueError("a Gemma 4 config names every layer's type in local_layers")
        if self.layer_types or self.shared_expert_intermediate_size or self.expert_bias:
            raise ValueError(
                "Gemma 4 here has no linear-attention layers, shared or biased experts"
            )
        check_kv_sharing(self)

    def _check_hybrid(self) -> None:
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries, not num_layers")
        if self.layer_types:
            layer_period(self.layer_types)
        if "linear_attention" in self.layer_types and self.linear_attention is None:
            raise ValueError("linear_attention layers need ModelConfig.linear_attention")
        if "linear_attention" in self.layer_types and any(self.local_layers):
            raise ValueError("a hybrid (linear attention) model has no sliding-window layers")

    @property
    def rotary_dim(self) -> int:
        """How many dims of each head RoPE rotates (HF: int(head_dim * partial_rotary_factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def is_hybrid(self) -> bool:
        """Whether some layers are linear attention (the decoder then scans `layer_period`)."""
        return "linear_attention" in self.layer_types

    @property
    def period(self) -> tuple[str, ...]:
        """The layer types one scanned block runs (one full-attention layer when not hybrid;
        every layer for Gemma 4, sft_jax/model/gemma4_config.py says why)."""
        if self.gemma4 is not None:
            return layer_types(self)
        return layer_period(self.layer_types) if self.is_hybrid else ("full_attention",)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def active_mlp_width(self) -> int:
        """The feed-forward width one token passes through: F for the dense MLP; its K experts'
        widths plus the shared expert's in a mixture of experts (what its flops and its
        activations scale with, not the E experts it stores); Gemma 4's dense MLP runs beside
        its experts."""
        if not self.is_moe:
            return self.intermediate_size
        routed = self.num_experts_per_tok * self.moe_intermediate_size
        dense = self.intermediate_size if self.gemma4 is not None else 0
        return routed + self.shared_expert_intermediate_size + dense

    @property
    def has_local_layers(self) -> bool:
        return any(self.local_layers)

    @property
    def platform(self) -> str:
        """ "cpu" | "gpu" | "tpu": where the model is compiled for (`mesh_platform`)."""
        return mesh_platform(self.mesh)


def mesh_platform(mesh: Any) -> str:
    """ "cpu" | "gpu" | "tpu": where a model on `mesh` is compiled for (its devices). A mesh
    without devices (an AbstractMesh: the memory plan's) names its platform when it knows it,
    else it is this machine's; so is no mesh (None)."""
    import jax

    if mesh is None:
        return jax.default_backend()
    if isinstance(mesh, jax.sharding.AbstractMesh):
        device = mesh.abstract_device
        return jax.default_backend() if device is None else device.platform
    return mesh.devices.flat[0].platform


def model_config_from_arch(arch: ArchConfig, section: ModelSection) -> ModelConfig:
    """ModelConfig for a random init described by the config file (no HF checkpoint)."""
    return ModelConfig(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_layers=arch.num_layers,
        num_heads=arch.num_heads,
        num_kv_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
        rope_theta=arch.rope_theta,
        rms_norm_eps=arch.rms_norm_eps,
        tie_embeddings=arch.tie_embeddings,
        qk_norm=arch.qk_norm,
        attention_bias=arch.attention_bias,
        max_position_embeddings=arch.max_position_embeddings,
        num_experts=arch.num_experts,
        num_experts_per_tok=arch.num_experts_per_tok,
        moe_intermediate_size=arch.moe_intermediate_size,
        norm_topk_prob=arch.norm_topk_prob,
        rope_scaling=None,
        dtype=section.dtype,
        param_dtype=section.param_dtype,
        remat=section.remat,
        attention=section.attention,
        scan_layers=section.scan_layers,
        moe_dispatch=section.moe_dispatch,
    )


def with_section_options(config: ModelConfig, section: ModelSection) -> ModelConfig:
    """`config` (e.g. read from a HF directory) with the run's performance options from the
    model section: attention implementation, layer scan, expert dispatch. They never change
    results."""
    return dataclasses.replace(
        config,
        attention=section.attention,
        scan_layers=section.scan_layers,
        moe_dispatch=section.moe_dispatch,
    )


def count_params(params: Any) -> int:
    """Number of scalars in a parameter tree (boxed, unboxed or abstract)."""
    import jax

    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
