"""Memory and compute planning: the estimate, the XLA/TPU compile check, flops."""
