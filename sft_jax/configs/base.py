"""Every config key and its default. Other configs start from `get_config()` and override a few:

    from sft_jax.configs import base

    def get_config():
        c = base.get_config()
        c.data.train_files = "my_data.jsonl"
        return c

It ships with the package, so a config file works from any directory. Not runnable on its own
(it names no data); see configs/demo.py in the repository for the runnable demo.

Library code never invents defaults: `sft_jax.config.parse` turns this tree into frozen dataclasses
and fails on any key that is missing here or unknown.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # parameter init, data order, dropout and sampling all derive from it

    # --- model: a Hugging Face directory, or (path == "") a random init of the `arch` below.
    c.model = m = ml_collections.ConfigDict()
    m.path = ""  # local HF directory with config.json + model.safetensors (sharded with index too)
    m.dtype = "float32"  # compute dtype of activations and matmuls: float32 | bfloat16
    m.param_dtype = "float32"  # storage dtype of trainable weights (master weights)
    m.remat = "none"  # activation checkpointing per layer: none | dots | dots_saveable | full
    # attention kernel: auto (fastest correct one per platform) | xla | cudnn | splash | blocked
    # (CPU's: causal blocks, flash-style backward) | reference
    m.attention = "auto"
    # lax.scan over layers (compiled once); False unrolls them (on XLA:CPU then remat recomputes
    # but saves almost no memory: docs/benchmarks.md, levers)
    m.scan_layers = True
    # cross-entropy over pieces of this many positions (never the whole [B, T, V] logits);
    # 0: whole logits; -1: automatic, whole unless a device's float32 logits for a micro-batch
    # would exceed 1 GiB (long sequences, large vocabularies), then pieces of <= 128 MiB
    m.loss_chunk = -1
    # mixture-of-experts under expert parallelism: how tokens reach their experts' devices:
    # auto (the one moving fewer rows: all_to_all when the expert group exceeds the experts per
    # token, on TPU and GPU) | all_gather | all_to_all; results are the same
    m.moe_dispatch = "auto"
    m.arch = a = ml_collections.ConfigDict()  # used only when path == "" (random init)
    a.vocab_size = 512  # embedding rows (at least the tokenizer's length)
    a.hidden_size = 64  # model width D
    a.intermediate_size = 172  # MLP width F
    a.num_layers = 2  # decoder layers
    a.num_heads = 4  # query heads
    a.num_kv_heads = 2  # key/value heads (grouped-query attention when < num_heads)
    a.head_dim = 16  # width of one attention head
    a.rope_theta = 10000.0  # RoPE base frequency
    a.rms_norm_eps = 1e-5  # RMSNorm epsilon
    a.tie_embeddings = True  # the LM head reuses the input embedding
    a.qk_norm = False  # RMSNorm on queries and keys per head (Qwen3, Gemma 3)
    a.attention_bias = False  # biases on the q/k/v projections (Qwen2)
    a.max_position_embeddings = 2048  # longest position the model is meant for
    a.num_experts = 0  # mixture of experts in every layer instead of the dense MLP; 0: dense
    a.num_experts_per_tok = 0  # experts each token is routed to (top-k)
    a.moe_intermediate_size = 0  # each expert's MLP width
    a.norm_topk_prob = False  # renormalise a token's k routing weights to sum to 1

    # --- data: JSONL/JSON/Parquet/CSV files or saved HF dataset dirs; see docs/data.md.
    c.data = d = ml_collections.ConfigDict()
    d.train_files = ""  # comma-separated paths/globs, each optionally ":weight" (a mixture)
    d.eval_files = ""  # held-out split; "" means carve `eval_fraction` out of the train files
    d.eval_fraction = 0.0  # share of the train files held out when eval_files is ""
    d.tokenizer = ""  # HF tokenizer directory; "" means model.path
    d.seq_len = 512  # packed row length (tokens)
    d.pack_window = 512  # examples considered together by best-fit-decreasing packing
    d.max_eval_examples = 512  # held-out examples used for evaluation, at most
    d.on_bad_row = "error"  # error | skip (skipped rows are counted and logged)
    d.format = "auto"  # auto | text | prompt_completion | alpaca | sharegpt | messages
    d.field_map = ""  # rename fields first, e.g. "prompt=question,completion=answer"
    d.ignore_fields = ""  # extra metadata fields to ignore (comma-separated), besides id/source/...
    d.chat_template = "tokenizer"  # tokenizer | chatml | alpaca | plain | qwen3_thinking | x.jinja
    d.train_on = "all_assistant"  # all_assistant | last_assistant | completion | all
    d.overlong = "truncate"  # truncate | split (at turn ends) | drop; all are counted
    d.on_control_tokens = "warn"  # special-token text in content: warn (train as text)|keep|error
    d.num_workers = 0  # tokenisation processes; 0 = all cores for large datasets
    d.shards = 0  # data shards, each read and tokenised by one process; 0 = one per process
    d.pack_split = False  # cut examples into the gaps best fit leaves (<1% padding; docs/data.md)
    d.prefetch = 2  # batches gathered ahead on a background thread; 0 = off
    d.cache_dir = ""  # tokenisation cache: "" = workdir/data_cache, "off", or a shared directory
    d.streaming = False  # stream rows from the cache: memory bounded by buffer + window, not data
    d.stream_buffer = 4096  # examples in the streaming shuffle buffer (data.streaming)

    # --- optimizer: clip -> AdamW (no decay on norms/biases) with warmup + cosine to a floor.
    c.optim = o = ml_collections.ConfigDict()
    o.learning_rate = 2e-5  # peak
    o.warmup_ratio = 0.03  # fraction of total steps; ignored when warmup_steps >= 0
    o.warmup_steps = -1  # linear warmup steps; -1: use warmup_ratio
    o.end_lr_ratio = 0.1  # cosine floor as a fraction of the peak
    o.weight_decay = 0.0  # decoupled (AdamW) weight decay
    o.b1 = 0.9  # Adam first-moment decay
    o.b2 = 0.999  # Adam second-moment decay
    o.eps = 1e-8  # Adam denominator epsilon
    o.clip_norm = 1.0  # global gradient norm; 0 disables clipping
    o.state_dtype = "float32"  # dtype of Adam's moments: float32 | bfloat16

    # --- train loop
    c.train = t = ml_collections.ConfigDict()
    t.global_batch_size = 8  # packed rows per optimizer step, over all devices and micro-batches
    t.micro_batches = 1  # gradient accumulation: the global batch is split into this many pieces
    t.epochs = 1.0  # used when max_steps < 0
    t.max_steps = -1  # optimizer steps; > 0 overrides epochs
    t.log_every = 10  # write a training record to metrics.jsonl every this many steps
    t.progress_bar = True  # tqdm bar on stderr (process 0)
    # A step whose loss or gradient norm is NaN/Inf is skipped (params and optimizer untouched,
    # its batch consumed); this many in a row stop the run with exit code 43.
    t.max_nonfinite_steps = 5
    t.loss_spike_factor = 3.0  # log a spike when loss > factor x running mean; 0: off
    t.loss_spike_min_delta = 0.5  # ... and loss - running mean >= this (quiet near loss 0)
    # Forgetting control (sft_jax/model/regularize.py). NEFTune: noise alpha / sqrt(L * d) on the
    # input embeddings while training (the paper uses 5-15). KL-to-base: adds kl_to_base x KL(model
    # || base) per loss token to the objective; the base is the frozen weights under LoRA, else a
    # copy of the initial parameters (one more parameter-sized buffer per device).
    t.neftune_alpha = 0.0  # NEFTune noise alpha (see above); 0: off
    t.kl_to_base = 0.0  # KL-to-base coefficient (see above); 0: off
    # Host malloc (sft_jax/training/host_memory.py): retain = glibc keeps XLA:CPU's per-step buffers
    # for reuse instead of unmapping and re-faulting them every step (faster CPU steps, measured in
    # docs/benchmarks.md); system = leave it; auto = retain when the run is on the CPU.
    t.host_allocator = "auto"
    # Mixture-of-experts models (ignored by dense ones): weight of the router's load-balancing
    # loss (-1: the model's own router_aux_loss_coef from its config.json, as transformers adds
    # it when output_router_logits is on; 0: off) and of the router z-loss (logsumexp of the
    # router logits squared; 0: off). Both are logged, with each expert's share of the tokens.
    t.router_aux_loss_coef = -1.0  # load-balancing loss weight (see above); -1: the model's
    t.router_z_loss_coef = 0.0  # router z-loss weight (see above); 0: off

    # --- evaluation
    c.eval = e = ml_collections.ConfigDict()
    e.every_steps = 0  # 0: only at the end
    e.batch_size = 8  # packed rows per eval step
    e.generate_examples = (
        0  # held-out prompts scored by greedy generation before and after training
    )
    e.max_new_tokens = 32  # longest greedy generation per held-out prompt
    # How a generation is scored against the reference; comma-separated, each reported (first =
    # primary, the `correct` of logged samples): exact (equal after stripping whitespace) |
    # contains (reference in output) | regex (the answer_regex captures of both are equal).
    e.match = "exact"
    e.answer_regex = (
        ""  # for "regex", e.g. GSM8K r"####\s*(-?[\d,.]+)"; see sft_jax/evaluation/evaluate.py
    )
    e.samples = 4  # held-out generations logged (kind "samples") at every periodic eval; 0: off
    # Forgetting check: loss/perplexity on general text (.txt: blank-line-separated documents, or
    # JSONL/JSON/... with a "text" field) before training and at the end; "": off.
    e.general_text_files = ""
    e.early_stopping_patience = 0  # stop after this many evals without a new best eval loss; 0: off

    # --- checkpoints (Orbax)
    c.checkpoint = k = ml_collections.ConfigDict()
    k.every_steps = 0  # 0: only at the end
    k.every_minutes = 0.0  # also save when this much time has passed since the last save; 0: off
    k.keep = 2  # most recent checkpoints kept
    k.keep_best = 0  # also keep this many checkpoints with the lowest eval loss (eval at each save)
    k.async_save = True  # write checkpoints in the background while training goes on
    k.rewind_to_best = False  # at the end, evaluate kept checkpoints; summary names the best step
    # Each kept checkpoint is measured on validation loss, on the generation score (when
    # eval.generate_examples > 0) and on general-text loss (when eval.general_text_files is set).
    # How rewind_to_best ranks them. task: the best rewind_metric ("eval_loss" is its former
    # name). retention: the best rewind_metric among checkpoints whose general-text loss is at
    # most rewind_tolerance above the base model's (else the one closest to it). knee: the knee
    # of the Pareto front of rewind_metric and general-text loss. See sft_jax/evaluation/rewind.py.
    k.rewind_rule = "task"
    # The task metric: eval_loss (lowest validation loss) | generation (highest fraction of
    # held-out prompts answered right under the first rule of eval.match).
    k.rewind_metric = "eval_loss"
    # Retention rule: allowed rise of the general-text loss over the base model's, in nats; 0.69
    # (ln 2) lets its perplexity at most double (the calibration: docs/benchmarks.md).
    k.rewind_tolerance = 0.69

    # --- LoRA: adapters are a separate, trainable tree; the base weights are frozen constants.
    c.lora = lo = ml_collections.ConfigDict()
    lo.enabled = False  # train LoRA adapters instead of every weight
    # lora: low-rank A, B (rank, alpha, dora, rslora, dropout, lr_ratio_b); oft: orthogonal
    # fine-tuning, a trained block-diagonal rotation of each target's input (the oft_* keys);
    # boft: PEFT's butterfly OFT, rotations of permuted blocks and a trained output scale (the
    # boft_* keys); prefix: trained per-layer key/value prefix; prompt: trained
    # virtual input tokens.
    lo.method = "lora"
    lo.rank = 16  # adapter rank r
    lo.alpha = 32.0  # adapter scale alpha (applied as alpha / rank)
    # Module-name globs: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj. A MoE layer's
    # experts only when named: "experts", or "experts.gate_up_proj" / "experts.down_proj".
    lo.targets = ("*_proj",)
    lo.rslora = False  # scale alpha / sqrt(rank) instead of alpha / rank
    lo.lr_ratio_b = 1.0  # LoRA+: learning rate of B = this x optim.learning_rate
    lo.base_dtype = "bfloat16"  # storage dtype of the frozen base weights
    lo.init_from = ""  # a PEFT adapter directory to continue training from
    lo.dropout = 0.0  # dropout on the adapter input (training only)
    lo.dora = False  # DoRA: per-output magnitude m, W' = m (W + sBA) / ||W + sBA||
    lo.base_quant = "none"  # QLoRA: none | int8 | nf4 blockwise storage of the frozen kernels
    # PEFT modules_to_save: HF module names trained in full next to the adapters (embed_tokens,
    # lm_head, norm, input_layernorm, post_attention_layernorm, q_norm, k_norm, ...)
    lo.modules_to_save = ()
    lo.oft_block_size = 32  # OFT rotation block size b (PEFT adjusts it to divide each input)
    lo.oft_block_share = False  # OFT: one rotation block shared by all blocks of a module
    lo.oft_coft = False  # constrained OFT: each block's generator kept within oft_eps
    lo.oft_eps = 6e-5  # COFT radius (PEFT's eps), only with oft_coft
    lo.oft_cayley_neumann = True  # Neumann-series Cayley (PEFT's default); False: exact inverse
    lo.oft_neumann_terms = 5  # terms of that series (PEFT's num_cayley_neumann_terms)
    lo.boft_block_size = 4  # BOFT block size (PEFT's default); must divide every target's input
    lo.boft_block_num = 0  # BOFT blocks per module instead of a size (one of the two is 0)
    # BOFT butterfly factors (1: block-diagonal; PEFT computes more only with its CUDA extension)
    lo.boft_n_butterfly_factor = 1
    lo.num_virtual_tokens = 20  # prefix / prompt tuning: P prefix slots or virtual tokens
    lo.prefix_projection = False  # prefix tuning: train K/V through PEFT's tanh-MLP encoder
    lo.prefix_hidden_size = 0  # that encoder's hidden width; 0: kv_heads x head_dim (PEFT's)

    # --- multi-process runs: detected on TPU VMs, SLURM, GKE JobSet; explicit flags otherwise.
    c.distributed = ds = ml_collections.ConfigDict()
    ds.coordinator_address = ""  # "host:port" of process 0; "" = auto-detect or single process
    ds.num_processes = 0  # 0 = auto; 1 = never initialise jax.distributed
    ds.process_id = -1  # -1 = auto
    ds.initialization_timeout_s = 300  # a dead host fails the job instead of hanging it
    ds.expected_platform = ""  # "tpu" | "gpu" | "cpu": fail instead of silently falling back
    # --- device mesh: sizes of (data, fsdp, context, expert, tensor); data, fsdp or tensor may
    # be -1.
    c.mesh = ms = ml_collections.ConfigDict()
    ms.data = -1  # data-parallel size (-1: all remaining devices)
    ms.fsdp = 1  # fully sharded data-parallel size (parameters sharded too)
    ms.tensor = 1  # tensor-parallel size (heads and MLP split)
    # context-parallel size: each row's sequence split over this many devices (ring attention);
    # data.seq_len must be a multiple of 2 x context. Never -1.
    ms.context = 1
    # expert-parallel size: a mixture-of-experts layer's experts split over this many devices
    # (num_experts must be a multiple of it, else they stay whole); for everything else these
    # devices are data-parallel (batch rows split over them). Never -1.
    ms.expert = 1
    # logical axis -> mesh axes. A dimension is sharded only when its size divides evenly.
    # Weights are sharded over context and expert as over fsdp: devices that split a row's
    # sequence or the batch would otherwise each hold a full copy of the parameters and optimizer
    # state (an expert weight's embed dimension skips expert, which already splits its experts).
    ms.rules = (
        ("batch", ("data", "fsdp", "expert")),
        ("vocab", "tensor"),
        ("embed", ("fsdp", "context", "expert")),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("mlp", "tensor"),
        ("expert", "expert"),  # a mixture-of-experts layer's expert dimension
        ("head_dim", None),
        ("layers", None),
        ("seq", "context"),
    )

    # --- fault injection, for tests of resume and preemption. All off (0 / False) by default.
    c.faults = fl = ml_collections.ConfigDict()
    fl.kill_at_step = 0  # SIGKILL this process after step k completes
    fl.kill_during_save = False  # ... right after starting an asynchronous save at step k
    fl.sigterm_at_step = 0  # send SIGTERM (preemption) to this process after step k
    fl.nan_at_step = 0  # make the loss (and so the gradients) NaN at step k ...
    fl.nan_steps = 1  # ... and the following nan_steps - 1 steps

    # --- logging besides metrics.jsonl (process 0 only): TensorBoard event files and W&B.
    c.logging = lg = ml_collections.ConfigDict()
    lg.tensorboard = True  # event files in workdir/tensorboard
    lg.wandb = False  # needs `pip install wandb`; the run id is kept in workdir/wandb_run_id.txt
    lg.wandb_project = "sft_jax"  # W&B project name
    lg.wandb_entity = ""  # "" = your default entity
    lg.wandb_run_name = ""  # "" = the workdir's name
    lg.wandb_mode = "online"  # online | offline (sync later with `wandb sync`)
    return c
