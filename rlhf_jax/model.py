"""Decoder-only transformer (GPT-2 and Llama families), LM or scalar head, explicit KV cache.

One Flax Linen module, used only through ``init``/``apply``; parameters are plain pytrees whose
leaves carry logical axis names at init (``sharding.py`` maps them to mesh axes).

- ``family="gpt2"``: learned positions, LayerNorm, tanh-GELU MLP, biases, tied embeddings (GPT-2).
- ``family="llama"``: RoPE (HF "rotate half" layout), RMSNorm, SwiGLU, grouped-query attention,
  optional q/k/v biases (Qwen2) and untied embeddings (Llama 2/3, Mistral, SmolLM).

Padding. ``attention_mask`` [B T] is 1 on real tokens. Position ids are the running count of real
tokens (``cumsum(mask) - 1``), and padded keys are never attended to, so left padding a prompt
does not change the outputs at real positions. Mistral's sliding window is not implemented: it is
exact for sequences shorter than the window (4096 tokens for Mistral 7B).

KV cache. ``init_cache`` returns a ``KVCache`` pytree of fixed length S; ``apply(..., cache=c)``
writes the new tokens at ``c.index``, attends to every valid slot up to each query, and returns
``(logits, new_cache)``. Prefill and one-token decode are the same call with T = P and T = 1.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, Shaped

from rlhf_jax import losses
from rlhf_jax.config import ModelConfig


class KVCache(NamedTuple):
    """Per-layer keys/values [B G S E], the validity of each slot [B S], and the next write slot.

    Heads come before slots so that a decode step's attention reads each head's keys and values
    as they lie: in [B S G E] XLA transposed the whole cache of every layer at every step, about
    a third of a GPT-2-small decode step on CPU (``bench/bench_sampling.py``)."""

    k: tuple[Float[Array, "B G S E"], ...]
    v: tuple[Float[Array, "B G S E"], ...]
    mask: Int[Array, "B S"]
    index: Int[Array, ""]


def init_cache(config: ModelConfig, batch: int, length: int) -> KVCache:
    """An empty cache with room for ``length`` tokens (prompt plus generated)."""
    shape = (batch, config.n_kv_heads, length, config.resolved_head_dim)
    zeros = tuple(jnp.zeros(shape, config.compute_dtype) for _ in range(config.n_layers))
    return KVCache(
        k=zeros,
        v=tuple(jnp.zeros(shape, config.compute_dtype) for _ in range(config.n_layers)),
        mask=jnp.zeros((batch, length), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


def _param(module: nn.Module, name: str, shape, axes, init, dtype):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class Norm(nn.Module):
    """LayerNorm (GPT-2, with bias) or RMSNorm (Llama), computed in float32."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        pdt = jnp.dtype(cfg.param_dtype)
        scale = _param(self, "scale", (x.shape[-1],), ("norm",), nn.initializers.ones, pdt)
        h = x.astype(jnp.float32)
        if cfg.family == "gpt2":
            h = h - h.mean(-1, keepdims=True)
        h = h * jax.lax.rsqrt((h * h).mean(-1, keepdims=True) + cfg.norm_eps) * scale
        if cfg.family == "gpt2":
            h = h + _param(self, "bias", (x.shape[-1],), ("norm",), nn.initializers.zeros, pdt)
        return h.astype(x.dtype)


class Dense(nn.Module):
    """``x @ kernel (+ bias)`` contracting the last ``len(in_axes)`` dims of x.

    With LoRA (``config.lora.rank > 0`` and this layer's name in its targets), adds
    ``(alpha / rank) * (dropout(x) @ lora_a) @ lora_b``: ``lora_a`` [*in, r] drawn like a
    PyTorch Linear's weight (peft's default), ``lora_b`` [r, *out] zero, so at initialisation the
    layer is its base exactly. A params tree without the two leaves (the frozen base alone) runs
    the base layer: PPO's reference is the policy's base with its adapters off."""

    features: tuple[int, ...]
    in_axes: tuple[str, ...]
    out_axes: tuple[str, ...]
    config: ModelConfig
    use_bias: bool = False
    init_std: float = 0.02
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        n_in = len(self.in_axes)
        in_shape = x.shape[x.ndim - n_in :]
        kernel = _param(
            self,
            "kernel",
            (*in_shape, *self.features),
            (*self.in_axes, *self.out_axes),
            nn.initializers.normal(self.init_std),
            jnp.dtype(cfg.param_dtype),
        )
        dims = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = jax.lax.dot_general(x, kernel.astype(cfg.compute_dtype), (dims, ((), ())))
        if self.use_bias:
            bias = _param(
                self,
                "bias",
                self.features,
                self.out_axes,
                nn.initializers.zeros,
                jnp.dtype(cfg.param_dtype),
            )
            y = y + bias.astype(cfg.compute_dtype)
        lora = cfg.lora
        adapted = lora.rank > 0 and self.name in lora.target_set()
        if adapted and (self.is_initializing() or self.has_variable("params", "lora_a")):
            fan_in = int(np.prod(in_shape))
            a = _param(
                self,
                "lora_a",
                (*in_shape, lora.rank),
                (*self.in_axes, "lora"),
                _symmetric_uniform(fan_in**-0.5),
                jnp.dtype(cfg.param_dtype),
            )
            b = _param(
                self,
                "lora_b",
                (lora.rank, *self.features),
                ("lora", *self.out_axes),
                nn.initializers.zeros,
                jnp.dtype(cfg.param_dtype),
            )
            h = nn.Dropout(lora.dropout, deterministic=self.deterministic)(x) if lora.dropout else x
            h = jax.lax.dot_general(h, a.astype(cfg.compute_dtype), (dims, ((), ())))
            h = jnp.tensordot(h, b.astype(cfg.compute_dtype), axes=1)
            y = y + (lora.alpha / lora.rank) * h
        return y


def _symmetric_uniform(bound: float):
    """U(-bound, bound): PyTorch's Linear init with a = sqrt(5), which peft gives ``lora_A``."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def rope(x: Float[Array, "B T N E"], positions: Int[Array, "B T"], theta: float):
    """Rotary embedding in the HF layout: the two halves of the head dim are the (re, im) parts."""
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions[..., None].astype(jnp.float32) * freq  # [B T half]
    cos, sin = jnp.cos(angle)[:, :, None, :], jnp.sin(angle)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Attention(nn.Module):
    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, positions, key_mask, query_offset, layer_cache):
        """``key_mask`` [B S] marks attendable slots; query i sits at slot ``query_offset + i``."""
        cfg = self.config
        H, G, E = cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        bias = cfg.use_bias or cfg.qkv_bias
        det = dict(deterministic=self.deterministic)
        q = Dense((H, E), ("embed",), ("heads", "head_dim"), cfg, bias, name="q", **det)(x)
        k = Dense((G, E), ("embed",), ("kv_heads", "head_dim"), cfg, bias, name="k", **det)(x)
        v = Dense((G, E), ("embed",), ("kv_heads", "head_dim"), cfg, bias, name="v", **det)(x)
        if cfg.family == "llama":
            q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
        k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)  # [B G T E], the cache's layout
        if layer_cache is not None:
            ck, cv = layer_cache
            k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), query_offset, axis=2)
            v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), query_offset, axis=2)
        B, T, S = x.shape[0], x.shape[1], k.shape[2]
        causal = jnp.arange(S)[None, :] <= (query_offset + jnp.arange(T))[:, None]  # [T S]
        allowed = causal[None] & (key_mask[:, None, :] > 0)  # [B T S]
        q = q.reshape(B, T, G, H // G, E)
        scores = jnp.einsum("btgre,bgse->bgrts", q, k).astype(jnp.float32) / jnp.sqrt(E)
        # A finite fill keeps rows with no allowed key (padding queries) NaN-free.
        scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bgrts,bgse->btgre", probs, v).reshape(B, T, H, E)
        out = Dense(
            (cfg.d_model,), ("heads", "head_dim"), ("embed",), cfg, cfg.use_bias, name="o", **det
        )(out)
        return out, (k, v)


class MLP(nn.Module):
    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        F, b, det = cfg.mlp_dim, cfg.use_bias, dict(deterministic=self.deterministic)
        if cfg.family == "gpt2":
            h = Dense((F,), ("embed",), ("mlp",), cfg, b, name="fc", **det)(x)
            h = nn.gelu(h, approximate=True)
        else:
            gate = Dense((F,), ("embed",), ("mlp",), cfg, b, name="gate", **det)(x)
            h = nn.silu(gate) * Dense((F,), ("embed",), ("mlp",), cfg, b, name="up", **det)(x)
        return Dense((cfg.d_model,), ("mlp",), ("embed",), cfg, b, name="down", **det)(h)


class Block(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, key_mask, query_offset, layer_cache, deterministic):
        drop = nn.Dropout(self.config.dropout, deterministic=deterministic)
        h, kv = Attention(self.config, deterministic, name="attn")(
            Norm(self.config, name="attn_norm")(x), positions, key_mask, query_offset, layer_cache
        )
        x = x + drop(h)
        mlp = MLP(self.config, deterministic, name="mlp")
        x = x + drop(mlp(Norm(self.config, name="mlp_norm")(x)))
        return x, kv


@jax.custom_vjp
def _materialized_cotangent(x):
    """The identity, whose cotangent is computed into a buffer of its own (XLA:CPU only).

    The backward pass adds each block's contribution to the residual stream's cotangent, and
    XLA:CPU fuses that chain of adds into every consumer, including the transposes that feed the
    weight gradients, so each layer recomputes the sums of all the layers above it: O(L^2)
    reads, a quarter of a 12-layer x 768 backward (bench/RESULTS.md). An optimisation barrier
    does not stop it there; a conditional does, as XLA cannot fuse across one and cannot prove
    its predicate. Both branches give the same cotangent whenever it holds no NaN (with one, the
    update is all NaN, and a stage stops at the non-finite loss either way)."""
    return x


def _materialized_cotangent_fwd(x):
    return x, None


def _materialized_cotangent_bwd(_, g):
    nan_free = g[0, 0, 0] == g[0, 0, 0]
    return (jax.lax.cond(nan_free, lambda a: a, lambda a: jnp.full_like(a, jnp.nan), g),)


_materialized_cotangent.defvjp(_materialized_cotangent_fwd, _materialized_cotangent_bwd)


def _score_head(cfg: ModelConfig) -> Dense:
    # N+ initialisation of the reward head: std 1/sqrt(D+1).
    return Dense(
        (1,), ("embed",), ("scalar",), cfg, True, (cfg.d_model + 1) ** -0.5, name="score_head"
    )


class _ScoreHeadOnly(nn.Module):
    """The scalar head at the path it has in ``Transformer`` (so the same key gives it the same
    initial values), without the rest of the model."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        return _score_head(self.config)(x)


class Transformer(nn.Module):
    """The whole model. See the module docstring for padding and cache semantics.

    ``apply({"params": p}, tokens, attention_mask)`` -> logits [B T V] float32 (scalar head: [B T]);
    with ``cache=`` it returns ``(logits, cache)``. Dropout is active only with
    ``deterministic=False`` and a ``"dropout"`` rng. ``hidden=True`` returns the final hidden
    states [B T D] instead of the logits (``unembed`` turns any slice of them into logits;
    ``predicted_logprobs`` does so a chunk of tokens at a time).
    """

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens: Int[Array | np.ndarray, "B T"],
        attention_mask: Shaped[Array | np.ndarray, "B T"] | None = None,
        *,
        cache: KVCache | None = None,
        deterministic: bool = True,
        hidden: bool = False,
    ):
        cfg = self.config
        pdt = jnp.dtype(cfg.param_dtype)
        mask = (
            jnp.ones(tokens.shape, jnp.int32)
            if attention_mask is None
            else attention_mask.astype(jnp.int32)
        )
        if cache is None:
            offset, key_mask = jnp.zeros((), jnp.int32), mask
            positions = jnp.cumsum(mask, axis=1) - 1
        else:
            offset = cache.index
            key_mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, mask, offset, axis=1)
            seen = jnp.sum(cache.mask, axis=1, keepdims=True)
            positions = seen + jnp.cumsum(mask, axis=1) - 1
        positions = jnp.maximum(positions, 0)

        embedding = _param(
            self,
            "embed",
            (cfg.vocab_size, cfg.d_model),
            ("vocab", "embed"),
            nn.initializers.normal(0.02),
            pdt,
        )
        x = jnp.take(embedding, tokens, axis=0).astype(cfg.compute_dtype)
        if cfg.family == "gpt2":
            pos_embed = _param(
                self,
                "pos_embed",
                (cfg.max_len, cfg.d_model),
                ("position", "embed"),
                nn.initializers.normal(0.01),
                pdt,
            )
            x = x + jnp.take(pos_embed, positions, axis=0).astype(cfg.compute_dtype)
        x = nn.Dropout(cfg.dropout, deterministic=deterministic)(x)

        # Gradient checkpointing: each block's activations are recomputed in the backward pass
        # instead of stored (argument 6, ``deterministic``, is a Python bool). Decoding with a
        # cache has no backward pass.
        block = nn.remat(Block, static_argnums=(6,)) if cfg.remat and cache is None else Block
        # On CPU, each block's input cotangent gets a buffer of its own (see the function).
        on_cpu = cache is None and jax.default_backend() == "cpu"
        new_k, new_v = [], []
        for i in range(cfg.n_layers):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i])
            if on_cpu:
                x = _materialized_cotangent(x)
            x, (k, v) = block(cfg, name=f"layers_{i}")(
                x, positions, key_mask, offset, layer_cache, deterministic
            )
            new_k.append(k)
            new_v.append(v)
        x = Norm(cfg, name="final_norm")(x)

        if hidden:  # the final hidden states; ``unembed`` makes logits of any slice of them
            out = x
        elif cfg.head == "scalar":
            out = _score_head(cfg)(x)[..., 0].astype(jnp.float32)
        elif cfg.tie_embeddings:
            out = jnp.einsum("btd,vd->btv", x, embedding.astype(cfg.compute_dtype))
            out = out.astype(jnp.float32)
        else:
            out = Dense((cfg.vocab_size,), ("embed",), ("vocab",), cfg, False, name="lm_head")(
                x
            ).astype(jnp.float32)
        if cache is None:
            return out
        new_cache = KVCache(tuple(new_k), tuple(new_v), key_mask, offset + tokens.shape[1])
        return out, new_cache


def abstract_params(config: ModelConfig):
    """Shapes/dtypes of the (boxed, logically annotated) params, without allocating anything."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: Transformer(config).init(jax.random.key(0), tokens)["params"])


def init_params(config: ModelConfig, rng: jax.Array):
    """Freshly initialised, unboxed params on the default device (tests; a sharded init is
    ``train_state.init_model_params``)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return nn.meta.unbox(Transformer(config).init(rng, tokens)["params"])


def init_score_head(config: ModelConfig, rng: jax.Array):
    """The ``score_head`` params that ``init_params(config, rng)`` would give, computed alone
    (Flax derives each submodule's key from its path, so the values are the same)."""
    x = jnp.zeros((1, 1, config.d_model), config.compute_dtype)
    return nn.meta.unbox(_ScoreHeadOnly(config).init(rng, x))["params"]["score_head"]


def logical_axes(config: ModelConfig):
    """A pytree like the params whose leaves are ``PartitionSpec``s of logical axis names."""
    return nn.get_partition_spec(abstract_params(config))


def unembed(params, config: ModelConfig, x: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
    """The LM head of ``Transformer`` on final hidden states (``hidden=True``): float32 logits,
    computed exactly as the full forward computes them."""
    if config.tie_embeddings:
        out = jnp.einsum("btd,vd->btv", x, params["embed"].astype(config.compute_dtype))
    else:
        kernel = params["lm_head"]["kernel"].astype(config.compute_dtype)
        out = jax.lax.dot_general(x, kernel, (((2,), (0,)), ((), ())))
    return out.astype(jnp.float32)


# Float32 logits of at most this many bytes exist at once in ``predicted_logprobs`` (per batch:
# under data parallelism each device holds its rows' share). A [64 x 512 x 128256] block would be
# 16.8 GB; 256 MiB is a few percent of any accelerator's memory and costs nothing in FLOPs.
LOGITS_CHUNK_BYTES = 1 << 28


class TokenLogprobs(NamedTuple):
    """Per-token log-probabilities of the predicted tokens [B N], and the entropy of each
    predicting distribution [B N] (None unless asked for)."""

    logprobs: Float[Array, "B N"]
    entropy: Float[Array, "B N"] | None


def predicted_logprobs(
    params,
    config: ModelConfig,
    tokens: Int[Array | np.ndarray, "B T"],
    attention_mask,
    first: int,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    deterministic: bool = True,
    rngs: dict | None = None,
    chunk_bytes: int = LOGITS_CHUNK_BYTES,
) -> TokenLogprobs:
    """``log pi_T(tokens[:, t] | tokens[:, <t])`` for ``t = first .. T-1`` (teacher forcing).

    The logits are made from the hidden states a chunk of tokens at a time, each chunk
    recomputed in the backward pass (``jax.checkpoint``), so float32 logits of the whole
    [B, T, V] never exist: at most ``chunk_bytes`` of them do. When the whole block is within
    that, it is one chunk, computed as ``losses.token_logprobs`` of the full forward would be."""
    tokens = jnp.asarray(tokens)
    h = Transformer(config).apply(
        {"params": params},
        tokens,
        attention_mask,
        deterministic=deterministic,
        hidden=True,
        rngs=rngs or {},
    )
    return chunked_logprobs(
        lambda x: unembed(params, config, x),
        h[:, first - 1 : -1],
        tokens[:, first:],
        vocab=config.vocab_size,
        temperature=temperature,
        with_entropy=with_entropy,
        chunk_bytes=chunk_bytes,
    )


def chunked_logprobs(
    head,
    h: Float[Array, "B N D"],
    targets: Int[Array | np.ndarray, "B N"],
    *,
    vocab: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_bytes: int = LOGITS_CHUNK_BYTES,
) -> TokenLogprobs:
    """``predicted_logprobs`` on given hidden states: ``head(h)`` [B n V] logits for chunks of
    ``n`` positions, the most whose float32 logits fit in ``chunk_bytes``."""
    B, N = targets.shape

    def piece(hc, tc):
        logits = head(hc)
        logp = losses.token_logprobs(logits, tc, temperature=temperature)
        ent = losses.token_entropy(logits / temperature) if with_entropy else None
        return logp, ent

    per = max(1, chunk_bytes // max(1, B * vocab * 4))
    if per >= N:
        return TokenLogprobs(*piece(h, targets))
    n = -(-N // per)
    extra = n * per - N
    hp = jnp.pad(h, ((0, 0), (0, extra), (0, 0)))
    tp = jnp.pad(targets, ((0, 0), (0, extra)))
    hs = hp.reshape(B, n, per, h.shape[-1]).swapaxes(0, 1)
    ts = tp.reshape(B, n, per).swapaxes(0, 1)
    logp, ent = jax.lax.map(jax.checkpoint(lambda xs: piece(*xs)), (hs, ts))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(B, n * per)[:, :N]  # noqa: E731
    return TokenLogprobs(unchunk(logp), unchunk(ent) if with_entropy else None)
