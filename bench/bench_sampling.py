"""Sampling throughput: KV-cached ``rollout.sample`` against a no-cache baseline and against
Hugging Face ``transformers`` ``generate``, in the same command.

    python bench/bench_sampling.py                       # GPT-2-small shape, batch 64, 128 tokens
    python bench/bench_sampling.py --size=S --vocab=64   # an InstructLang size
    python bench/bench_sampling.py --transformers        # + transformers.generate (".[bench]")

The baseline is what a naive implementation does: a fixed [B, P+R] buffer and a full forward pass
over it for every new token (fixed shapes, so it compiles once). Its cost per token does not depend
on how many tokens have been generated, so it is timed over ``--baseline_steps`` steps only and
reported per token. The cached sampler is timed over the whole response; tokens per second count
the tokens it actually generated (through each row's EOS), not R.

``--transformers`` adds the PyTorch baseline: ``GPT2LMHeadModel.generate`` (random weights of
the same shape, float32, KV cache on, multinomial sampling, exactly R new tokens) on the same
prompts, timed the same way. It runs only for GPT-2-family sizes.

It also prints a floor for one decode step, from a matmul rate and a memory read bandwidth
measured at the start of the same run: the step's weight matmuls (``2 N`` FLOPs per row for the N
parameters that multiply, ``bench_train.matmul_params``) at that rate, plus one read of the KV
cache (every layer's K and V for all P + R slots) at that bandwidth. Everything else a step does
(drawing the token, norms, softmax, copies) comes on top of it.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_train import matmul_params, matmul_rate

from rlhf_jax import rollout
from rlhf_jax.config import model_config
from rlhf_jax.model import Transformer, init_params


@functools.partial(jax.jit, static_argnums=(1, 5, 6))
def uncached_generate(params, config, prompt_tokens, prompt_mask, rng, max_new_tokens, steps):
    """The no-cache baseline: ``steps`` tokens, each from a full forward over [B, P+R]."""
    B, P = prompt_tokens.shape
    tokens = jnp.concatenate([prompt_tokens, jnp.zeros((B, max_new_tokens), jnp.int32)], axis=1)
    mask = jnp.concatenate([prompt_mask, jnp.zeros((B, max_new_tokens), jnp.int32)], axis=1)

    def body(t, carry):
        tokens, mask = carry
        logits = Transformer(config).apply({"params": params}, tokens, mask)
        next_logits = jax.lax.dynamic_index_in_dim(logits, P + t - 1, axis=1, keepdims=False)
        token = jax.random.categorical(jax.random.fold_in(rng, t), next_logits).astype(jnp.int32)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], P + t, axis=1)
        mask = jax.lax.dynamic_update_slice_in_dim(mask, jnp.ones((B, 1), jnp.int32), P + t, 1)
        return tokens, mask

    return jax.lax.fori_loop(0, steps, body, (tokens, mask))[0]


def timed(fn, repeats):
    fn()  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of one jitted sum over a float32 array of ``gib`` GiB, the best of ``repeats``."""
    x = jnp.ones((int(gib * 2**30) // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    seconds = timed(lambda: f(x).block_until_ready(), repeats)
    return x.nbytes / seconds


def transformers_tokens_per_second(cfg, prompts: np.ndarray, new_tokens: int, repeats: int):
    """Tokens/s of ``transformers`` ``generate`` on a random GPT-2 of ``cfg``'s shape."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    shape = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_len,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=cfg.mlp_dim,
    )
    model = GPT2LMHeadModel(shape).eval()
    ids = torch.as_tensor(prompts, dtype=torch.long)

    def run():
        with torch.no_grad():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
                use_cache=True,
            )

    return prompts.shape[0] * new_tokens / timed(run, repeats), torch.__version__


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="gpt2-small")
    ap.add_argument("--vocab", type=int, default=0, help="override the vocabulary size")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--baseline_steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--transformers", action="store_true", help="add the transformers baseline")
    args = ap.parse_args()
    rate, bandwidth = matmul_rate(), read_bandwidth()

    overrides = {"max_len": max(1024, args.prompt_len + args.new_tokens)}
    if args.vocab:
        overrides["vocab_size"] = args.vocab
    cfg = model_config(args.size, **overrides)
    params = init_params(cfg, jax.random.key(0))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    rng = np.random.default_rng(0)
    prompts = jnp.asarray(rng.integers(3, cfg.vocab_size, (args.batch, args.prompt_len)), jnp.int32)
    pmask = jnp.ones_like(prompts)
    eos = cfg.vocab_size - 1  # for the count below; random weights rarely emit it

    out = {}

    def cached():
        out["s"] = rollout.sample(
            params,
            cfg,
            prompts,
            pmask,
            jax.random.key(1),
            max_new_tokens=args.new_tokens,
            eos_id=eos,
            pad_id=0,
        )
        out["s"].tokens.block_until_ready()

    def baseline():
        uncached_generate(
            params, cfg, prompts, pmask, jax.random.key(1), args.new_tokens, args.baseline_steps
        ).block_until_ready()

    t_cached = timed(cached, args.repeats)
    generated = int(np.asarray(out["s"].mask).sum())
    t_base = timed(baseline, args.repeats)
    base_tps = args.batch * args.baseline_steps / t_base
    cached_tps = generated / t_cached
    print(
        f"device={jax.devices()[0].device_kind} backend={jax.default_backend()} "
        f"model={args.size} params={n_params / 1e6:.1f}M batch={args.batch} "
        f"prompt={args.prompt_len} new_tokens={args.new_tokens}"
    )
    print(
        f"no-cache baseline: {base_tps:10.1f} tokens/s ({args.baseline_steps} steps in "
        f"{t_base:.2f} s)"
    )
    print(
        f"KV cache         : {cached_tps:10.1f} tokens/s ({generated} tokens in {t_cached:.2f} s)"
    )
    print(f"speed-up         : {cached_tps / base_tps:10.1f}x")
    steps = int(np.asarray(out["s"].mask).sum(axis=1).max())  # decode steps the loop ran
    step_ms = 1e3 * t_cached / steps
    matmul_ms = 1e3 * 2 * matmul_params(cfg) * args.batch / rate
    slots = args.prompt_len + args.new_tokens
    cache_bytes = 2 * cfg.n_layers * args.batch * slots * cfg.n_kv_heads * cfg.resolved_head_dim * 4
    cache_ms = 1e3 * cache_bytes / bandwidth
    print(
        f"decode step      : {step_ms:10.1f} ms; floor {matmul_ms + cache_ms:.1f} ms = weight "
        f"matmuls {matmul_ms:.1f} ms at {rate / 1e9:.1f} GFLOP/s + reading the "
        f"{cache_bytes / 1e6:.0f} MB KV cache {cache_ms:.1f} ms at {bandwidth / 1e9:.1f} GB/s"
    )
    if args.transformers:
        if cfg.family != "gpt2":
            raise SystemExit("--transformers: the baseline is a GPT-2 model; pick a gpt2 size")
        hf_tps, version = transformers_tokens_per_second(
            cfg, np.asarray(prompts), args.new_tokens, args.repeats
        )
        print(
            f"transformers     : {hf_tps:10.1f} tokens/s (generate, torch {version}; "
            f"{1e3 * args.batch / hf_tps:.1f} ms per decode step)"
        )
        print(f"rlhf_jax / transformers: {cached_tps / hf_tps:.2f}x")


if __name__ == "__main__":
    main()
