"""Transformer invariants: padding, KV cache, dropout switch, heads, config errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.config import ModelConfig, model_config
from rlhf_jax.model import Transformer, init_cache, init_params, logical_axes

FAMILIES = ["tiny", "tiny-llama"]


def _setup(size, **kw):
    cfg = model_config(size, vocab_size=40, max_len=32, **kw)
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 9), 1, 40)
    return cfg, params, tokens


def _left_pad(tokens, n):
    b = tokens.shape[0]
    pad = jnp.zeros((b, n), jnp.int32)
    mask = jnp.concatenate([pad, jnp.ones_like(tokens)], axis=1)
    return jnp.concatenate([pad, tokens], axis=1), mask


@pytest.mark.parametrize("size", FAMILIES)
def test_left_padding_does_not_change_real_positions(size):
    cfg, params, tokens = _setup(size)
    model = Transformer(cfg)
    full = model.apply({"params": params}, tokens)
    padded, mask = _left_pad(tokens, 5)
    out = model.apply({"params": params}, padded, mask)
    np.testing.assert_allclose(out[:, 5:], full, atol=1e-5)
    # Rows padded by different amounts in one batch: row 0 by 2, row 1 by 0.
    mixed = jnp.stack([padded[0, 3:], jnp.concatenate([tokens[1], jnp.array([7, 8])])])
    mixed_mask = jnp.stack([mask[0, 3:], jnp.ones(11, jnp.int32)])
    out = model.apply({"params": params}, mixed, mixed_mask)
    np.testing.assert_allclose(out[0, 2:], full[0], atol=1e-5)
    np.testing.assert_allclose(out[1, :9], full[1], atol=1e-5)


@pytest.mark.parametrize("size", FAMILIES)
def test_cached_decode_equals_full_forward(size):
    cfg, params, tokens = _setup(size)
    model = Transformer(cfg)
    padded, mask = _left_pad(tokens, 3)
    full = model.apply({"params": params}, padded, mask)
    cache = init_cache(cfg, 3, padded.shape[1])
    prefill = 6  # three pads and three real tokens
    logits, cache = model.apply(
        {"params": params}, padded[:, :prefill], mask[:, :prefill], cache=cache
    )
    steps = [logits]
    for t in range(prefill, padded.shape[1]):
        logits, cache = model.apply(
            {"params": params}, padded[:, t : t + 1], mask[:, t : t + 1], cache=cache
        )
        steps.append(logits)
    cached = jnp.concatenate(steps, axis=1)
    np.testing.assert_allclose(cached[:, 3:], full[:, 3:], atol=1e-5)
    assert int(cache.index) == padded.shape[1]
    np.testing.assert_array_equal(cache.mask, mask)


def test_scalar_head_shape_and_init_scale():
    cfg, params, tokens = _setup("tiny", head="scalar")
    out = Transformer(cfg).apply({"params": params}, tokens)
    assert out.shape == tokens.shape and out.dtype == jnp.float32
    # N+ head initialisation: std 1/sqrt(D+1) (D = 32 here).
    kernel = np.asarray(params["score_head"]["kernel"])
    assert abs(kernel.std() - 1 / np.sqrt(33)) < 0.08
    assert "embed" in params and "lm_head" not in params


def test_dropout_only_when_asked():
    cfg, params, tokens = _setup("tiny", dropout=0.5)
    model = Transformer(cfg)
    a = model.apply({"params": params}, tokens)
    b = model.apply({"params": params}, tokens)
    np.testing.assert_array_equal(a, b)
    c = model.apply(
        {"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(3)}
    )
    assert float(jnp.abs(a - c).max()) > 1e-3


def test_bfloat16_compute_returns_float32_logits_close_to_float32():
    cfg, params, tokens = _setup("tiny-llama")
    out32 = Transformer(cfg).apply({"params": params}, tokens)
    cfg16 = model_config("tiny-llama", vocab_size=40, max_len=32, dtype="bfloat16")
    out16 = Transformer(cfg16).apply({"params": params}, tokens)
    assert out16.dtype == jnp.float32
    np.testing.assert_allclose(out16, out32, atol=0.05)


@pytest.mark.parametrize("size", FAMILIES)
def test_every_parameter_has_logical_axes(size):
    cfg = model_config(size)
    specs = jax.tree_util.tree_leaves(
        logical_axes(cfg), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )
    shapes = jax.tree_util.tree_leaves(init_params(cfg, jax.random.key(0)))
    assert len(specs) == len(shapes)
    for spec, leaf in zip(specs, shapes):
        assert len(spec) == leaf.ndim and all(isinstance(a, str) for a in spec), spec


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads=3: n_heads=4 is not a multiple of it"),
        (dict(d_model=30, n_heads=4), "n_heads=4: d_model=30 is not divisible by it"),
        (dict(family="t5"), "family='t5'"),
        (dict(family="llama", d_model=12, n_heads=4, n_kv_heads=4), "must be even for RoPE"),
    ],
)
def test_config_errors_name_the_numbers(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**fields).validate()


def test_unknown_size():
    with pytest.raises(ValueError, match="unknown model size 'XXL'"):
        model_config("XXL")


def test_score_head_alone_has_the_full_inits_values():
    from rlhf_jax.model import init_score_head

    for size in ("S", "tiny-llama"):
        model = model_config(size, vocab_size=64, max_len=24, head="scalar")
        full = init_params(model, jax.random.key(2))["score_head"]
        alone = init_score_head(model, jax.random.key(2))
        jax.tree.map(np.testing.assert_array_equal, alone, full)


@pytest.mark.parametrize("size", ["tiny", "tiny-llama"])
def test_remat_recomputes_the_same_gradients(size):
    from rlhf_jax import losses

    model = model_config(size, vocab_size=64, max_len=24)
    remat = dataclasses.replace(model, remat=True)
    params = init_params(model, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 10), 0, 64)

    def grads(config):
        def loss(p):
            logits = Transformer(config).apply({"params": p}, tokens)
            return losses.sft_loss(logits, tokens, jnp.ones_like(tokens))

        return jax.jit(jax.grad(loss))(params)

    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        grads(remat),
        grads(model),
    )


@pytest.mark.parametrize("size", FAMILIES)
def test_the_cpu_cotangent_buffer_changes_no_gradient_bit(size, monkeypatch):
    # On CPU every block's input cotangent is materialised through a conditional (an XLA:CPU
    # fusion workaround, model._materialized_cotangent). It must be there, one per layer, and
    # the gradients must be bit for bit those of the plain model.
    from rlhf_jax import model as model_module

    cfg, params, tokens = _setup(size, n_layers=3)
    padded, mask = _left_pad(tokens, 2)

    def loss(p):
        return (jnp.tanh(Transformer(cfg).apply({"params": p}, padded, mask)) ** 2).mean()

    grad = jax.jit(jax.grad(loss))
    assert grad.lower(params).compile().as_text().count(" conditional(") == cfg.n_layers
    materialised = grad(params)
    monkeypatch.setattr(model_module, "_materialized_cotangent", lambda x: x)
    plain = jax.jit(jax.grad(loss))(params)
    jax.tree.map(np.testing.assert_array_equal, materialised, plain)
