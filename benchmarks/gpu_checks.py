"""GPU-only numerical checks, run by benchmarks/gpu_all.sh before the benchmarks (CPU tests
cannot run cuDNN): cuDNN attention (`model.attention=cudnn`) against the float32 reference on
packed rows (three examples and padding in a row), causal, with a sliding window and with
grouped-query heads, forward and gradient, at the Llama-3.2-1B head shapes.

    python benchmarks/gpu_checks.py     # prints one JSON line; exit 1 when a check fails

cuDNN computes in bfloat16, so it is compared with the float32 reference on the same bf16
inputs, and must be no worse than 2x XLA's own bfloat16 error (or within 1e-2) on real tokens.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.model.attention import (
    AttentionOptions,
    attend,
    attention_mask,
    resolve_implementation,
    window_mask,
)

B, T, N, K, H = 2, 2048, 32, 8, 64  # Llama-3.2-1B heads, one packed 2048-token row each


def segments() -> np.ndarray:
    seg = np.zeros((B, T), np.int32)
    seg[0, :700], seg[0, 700:1500], seg[0, 1500:2000] = 1, 2, 3  # 48 slots of padding
    seg[1, :] = 1
    return seg


def max_errors(impl: str, window: int | None, q, k, v, seg, weights) -> tuple[float, float]:
    """(max |out - ref|, max |grad - ref grad|) over real tokens, ref = float32 reference."""
    mask = attention_mask(seg)
    if window is not None:
        mask = window_mask(mask, jnp.arange(T), window)
    real = (seg > 0)[:, :, None, None]

    def loss(impl_, dtype):
        def f(q, k, v):
            q_, k_, v_ = (x.astype(dtype) for x in (q, k, v))
            out = attend(q_, k_, v_, mask, AttentionOptions(impl_))
            return jnp.sum(jnp.where(real, out.astype(jnp.float32) * weights, 0.0)), out

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

    (_, ref), ref_grads = loss("reference", jnp.float32)(q, k, v)
    (_, out), grads = loss(impl, jnp.bfloat16)(q, k, v)
    out_err = float(jnp.max(jnp.where(real, jnp.abs(out.astype(jnp.float32) - ref), 0.0)))
    grad_err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(grads, ref_grads, strict=True))
    return out_err, grad_err


def main() -> int:
    platform = jax.default_backend()
    result = {"check": "cudnn_attention", "platform": platform}
    if platform != "gpu":
        result["error"] = f"needs a GPU, running on {platform}"
        print(json.dumps(result))
        return 1
    result["auto_resolves_to"] = resolve_implementation(
        "auto", platform=platform, dtype="bfloat16", head_dim=H, softcap=None
    )
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, n, H)), jnp.bfloat16) for n in (N, K, K))
    weights = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    seg = jnp.asarray(segments())
    ok = result["auto_resolves_to"] == "cudnn"
    for window in (None, 512):
        xla = max_errors("xla", window, q, k, v, seg, weights)
        cudnn = max_errors("cudnn", window, q, k, v, seg, weights)
        passed = all(c <= max(2 * x, 1e-2) for c, x in zip(cudnn, xla, strict=True))
        ok = ok and passed
        result[f"window_{window}"] = {
            "cudnn_out_err": cudnn[0], "cudnn_grad_err": cudnn[1],
            "xla_bf16_out_err": xla[0], "xla_bf16_grad_err": xla[1], "passed": passed,
        }  # fmt: skip
    result["passed"] = ok
    print(json.dumps(result), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
