"""The CPU mixture-of-experts benchmark workload: `cpu_small.py` with every MLP replaced by 8
experts of width 344, top-2 with renormalised weights, so a token passes through the same MLP
width (688) as in the dense workload while the layer stores 4x its weights.

    python -m sft_jax.bench --config configs/bench/cpu_moe.py

Same attention, sequence, batch, optimizer and synthetic data as cpu_small; the router's
load-balancing loss is on (weight 0.01). Figures beside the dense workload's are in
docs/benchmarks.md.
"""

from configs.bench import cpu_small


def get_config():
    c = cpu_small.get_config()
    a = c.model.arch
    a.num_experts = 8
    a.num_experts_per_tok = 2
    a.moe_intermediate_size = 344
    a.norm_topk_prob = True
    c.train.router_aux_loss_coef = 0.01
    return c
