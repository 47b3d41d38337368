"""Host allocator settings (sft_jax/training/host_memory.py): when they apply, and that they stop
XLA:CPU's per-call temporaries from being page-faulted in again on every call."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from sft_jax.training import host_memory

# A jitted function whose compiled temporary (a [2048, 4096] float32 product, 32 MiB) is
# allocated and freed by XLA on every call; prints the median of the minor page faults per call
# (the median: while the heap settles, an occasional call still takes fresh pages).
_FAULTS_PER_CALL = textwrap.dedent(
    """
    import json, resource, sys
    from sft_jax.training.host_memory import configure_host_allocator
    done = configure_host_allocator(sys.argv[1])
    import jax, jax.numpy as jnp
    f = jax.jit(lambda a, b: jnp.sum(jnp.sin(a @ b), axis=0))  # the product is a temporary
    a, b = jnp.ones((2048, 64)), jnp.ones((64, 4096))
    faults = []
    for _ in range(15):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(a, b).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"done": done, "faults_per_call": sorted(faults)[len(faults) // 2]}))
    """
)


def _faults_per_call(mode: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS_PER_CALL, mode],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt: Linux only")
def test_retaining_allocator_stops_per_call_page_faults():
    system = _faults_per_call("system")
    # The lower of two runs: a neighbour's memory pressure (parallel tests) can make the kernel
    # take pages back during one run; without the setting every run faults each call. The
    # second run (a process start and a compile) is needed only when the first faulted.
    retained = _faults_per_call("retain")
    if retained["faults_per_call"] >= 500:
        retained = min(retained, _faults_per_call("retain"), key=lambda r: r["faults_per_call"])
    assert system["done"] == "system allocator"
    assert retained["done"].startswith("retaining host allocator")
    # 32 MiB of fresh pages is 8192 faults per call when glibc unmaps the block after each call.
    assert system["faults_per_call"] > 4000, system
    assert retained["faults_per_call"] < 500, retained


def test_auto_follows_the_platform(monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(host_memory, "accelerator_plugins", lambda: [])
    assert host_memory.runs_on_cpu("")
    assert not host_memory.runs_on_cpu("gpu")  # distributed.expected_platform decides first
    monkeypatch.setattr(host_memory, "accelerator_plugins", lambda: ["cuda"])
    assert not host_memory.runs_on_cpu("")
    assert host_memory.runs_on_cpu("cpu")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_memory.runs_on_cpu("")
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not host_memory.runs_on_cpu("")
    # On an accelerator host "auto" leaves the allocator alone.
    assert host_memory.configure_host_allocator("auto") == "system allocator"


def test_too_late_and_bad_modes_are_reported():
    jax.devices()  # this test process's backend has started
    done = host_memory.configure_host_allocator("retain")
    assert done.startswith("system allocator (")  # names why nothing was changed
    assert host_memory.configure_host_allocator("system") == "system allocator"
    with pytest.raises(ValueError, match="choose one of"):
        host_memory.configure_host_allocator("tcmalloc")
