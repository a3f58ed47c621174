"""SFT and RM training steps against the machine's own matmul rate, measured in the same run.

    python bench/bench_train.py                         # 12 layers x 768 (GPT-2-small shape)
    python bench/bench_train.py --size=S --vocab=64     # an InstructLang size

First the float32 matmul rate of this machine (a [M K] x [K N] product jitted alone, the best of
a few), then the library's own jitted steps (``stages.lm.make_lm_step``: one SFT/pretraining
optimiser step; ``stages.rm.make_rm_step``: one K-wise RM step) on random tokens, each timed
after a warm-up call that compiles it. A step's work is the model FLOPs of its forward and
backward passes: ``6 N`` per token for the N parameters that multiply (embeddings are a gather;
a tied unembedding does multiply), plus ``12 L T D`` per token for attention scores and values
(causal masking is not subtracted: the kernel computes the whole square). The fraction of the
matmul rate says how close a step comes to this machine's floor.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sharding
from rlhf_jax.config import MeshConfig, OptimizerConfig, model_config
from rlhf_jax.stages.lm import make_lm_step
from rlhf_jax.stages.rm import make_rm_step
from rlhf_jax.train_state import (
    create_train_state,
    init_model_params,
    key_data,
    make_optimizer,
    train_state_shardings,
)


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of one float32 [n n] x [n n] product, the best of ``repeats`` timed calls."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def matmul_params(model) -> int:
    """Parameters that take part in a matmul per token (the embedding lookups do not)."""
    D, F, L, V = model.d_model, model.mlp_dim, model.n_layers, model.vocab_size
    E = model.resolved_head_dim
    q, kv = model.n_heads * E, model.n_kv_heads * E
    mlp = (3 if model.family == "llama" else 2) * D * F
    per_layer = D * (q + 2 * kv) + q * D + mlp
    return L * per_layer + D * V  # the unembedding (tied or not) multiplies


def step_flops(model, batch: int, seq: int, scalar_head: bool = False) -> float:
    n = matmul_params(model) - (model.d_model * model.vocab_size if scalar_head else 0)
    attention = 12 * model.n_layers * seq * model.d_model  # QK^T and AV, forward + backward
    return batch * seq * (6 * n + attention)


def time_step(step, state, batch, steps: int) -> float:
    state, metrics = step(state, batch)  # compiles
    jax.block_until_ready(metrics)
    t = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - t) / steps


def report(name: str, seconds: float, tokens: int, flops: float, rate: float) -> None:
    achieved = flops / seconds
    print(
        f"{name:24s} {seconds * 1e3:7.0f} ms  {tokens / seconds:8.0f} tokens/s  "
        f"{achieved / 1e9:6.1f} GFLOP/s = {achieved / rate:.0%} of the matmul rate"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="gpt2-small")
    parser.add_argument("--vocab", type=int, default=512, help="vocabulary (512: the PPO bench's)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=48, help="tokens per sequence")
    parser.add_argument("--k", type=int, default=4, help="RM: completions per prompt")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up")
    args = parser.parse_args()

    shape = dict(vocab_size=args.vocab, max_len=max(args.seq, 64))
    model = model_config(args.size, **shape)
    mesh = sharding.make_mesh(MeshConfig())
    rules = MeshConfig().rules
    rate = matmul_rate()
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; JAX {jax.__version__}")
    n_params = matmul_params(model) / 1e6
    print(f"model: {args.size}, {n_params:.1f}M matmul params, vocab {args.vocab}")
    print(f"float32 matmul rate (2048^3): {rate / 1e9:.1f} GFLOP/s")

    rng = np.random.default_rng(0)
    B, T = args.batch, args.seq
    tx = make_optimizer(OptimizerConfig(lr=1e-4), 1000)
    lm_shardings = train_state_shardings(model, tx, mesh, rules)
    params = init_model_params(model, jax.random.key(0), mesh, rules)
    state = create_train_state(params, tx, key_data(0), lm_shardings)
    batch = {
        "tokens": rng.integers(0, args.vocab, (B, T), dtype=np.int32),
        "attention_mask": np.ones((B, T), np.int32),
        "loss_mask": np.ones((B, T), np.float32),
    }
    seconds = time_step(make_lm_step(model, tx, lm_shardings, mesh), state, batch, args.steps)
    report(f"SFT step [{B} x {T}]", seconds, B * T, step_flops(model, B, T), rate)
    del state

    scalar = model_config(args.size, **shape, head="scalar")
    rm_shardings = train_state_shardings(scalar, tx, mesh, rules)
    params = init_model_params(scalar, jax.random.key(1), mesh, rules)
    state = create_train_state(params, tx, key_data(0), rm_shardings)
    P, K, n = T // 2, args.k, B // args.k  # as many sequences as the SFT step
    batch = {
        "tokens": rng.integers(0, args.vocab, (n, K, T), dtype=np.int32),
        "attention_mask": np.ones((n, K, T), np.int32),
        "response_mask": np.ones((n, K, T - P), np.int32),
        "ranks": np.tile(np.arange(K, dtype=np.int32), (n, 1)),
        "valid": np.ones((n, K), bool),
    }
    step = make_rm_step(scalar, tx, rm_shardings, mesh, prompt_len=P)
    seconds = time_step(step, state, batch, args.steps)
    flops = step_flops(scalar, n * K, T, scalar_head=True)
    report(f"RM step [{n} x {K} x {T}]", seconds, n * K * T, flops, rate)


if __name__ == "__main__":
    main()
