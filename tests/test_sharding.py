"""Mesh construction, rule-based sharding, sharded = unsharded, and a real 2-process run."""

import textwrap

import jax
import numpy as np
import pytest

from rlhf_jax import sharding
from rlhf_jax.config import MeshConfig, model_config
from rlhf_jax.model import Transformer, abstract_params, init_params


def test_mesh_resolves_minus_one_and_names_bad_sizes():
    assert sharding.mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    assert sharding.mesh_shape(MeshConfig(), 8) == (8, 1, 1)
    with pytest.raises(ValueError, match="needs 12 devices, but 8 are available"):
        sharding.mesh_shape(MeshConfig(data=3, fsdp=2, tensor=2), 8)
    with pytest.raises(ValueError, match="use 3 devices, which does not divide the 8"):
        sharding.mesh_shape(MeshConfig(data=-1, fsdp=3), 8)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sharding.mesh_shape(MeshConfig(data=-1, fsdp=-1), 8)


def test_sharded_forward_equals_single_device_and_weights_are_split():
    cfg = model_config("tiny-llama", vocab_size=48, max_len=32)
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    params = init_params(cfg, jax.random.key(0))
    shardings = sharding.tree_shardings(abstract_params(cfg), mesh, MeshConfig().rules)
    sharded = jax.device_put(params, shardings)

    # Large weights really are split per the rules: embed over fsdp, heads/mlp over tensor.
    q = sharded["layers_0"]["attn"]["q"]["kernel"]  # [D H E] -> (fsdp, tensor, None)
    assert q.sharding.spec == jax.P("fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (16, 2, 8)
    up = sharded["layers_1"]["mlp"]["up"]["kernel"]  # [D F]
    assert up.addressable_shards[0].data.shape == (16, 32)
    assert sharded["embed"].sharding.spec == jax.P("tensor", "fsdp")

    tokens = np.asarray(jax.random.randint(jax.random.key(1), (8, 12), 1, 48))
    mask = np.ones_like(tokens)
    mask[:3, :4] = 0
    expected = Transformer(cfg).apply({"params": params}, tokens, mask)
    batch = sharding.shard_batch({"tokens": tokens, "mask": mask}, mesh)
    assert batch["tokens"].sharding.spec == jax.P(("data", "fsdp"), None)
    forward = jax.jit(lambda p, b: Transformer(cfg).apply({"params": p}, b["tokens"], b["mask"]))
    got = forward(sharded, batch)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_init_sharded_matches_plain_init():
    cfg = model_config("tiny", vocab_size=48)
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=4))
    tokens = np.zeros((1, 1), np.int32)
    params, shardings = sharding.init_sharded(
        lambda: Transformer(cfg).init(jax.random.key(0), tokens)["params"], mesh, MeshConfig().rules
    )
    # Jitted on one device: eager and jitted init differ by an ulp (XLA fuses the scaling).
    plain = jax.jit(lambda: init_params(cfg, jax.random.key(0)))()
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(plain)):
        np.testing.assert_array_equal(a, b)
    assert params["embed"].sharding == shardings["embed"]
    assert params["embed"].sharding.spec == jax.P("tensor", "fsdp")


def test_indivisible_dimension_names_the_parameter():
    cfg = model_config("tiny", vocab_size=50)  # 50 rows do not split over tensor=4
    mesh = sharding.make_mesh(MeshConfig(data=2, tensor=4))
    with pytest.raises(ValueError, match=r"embed: dimension 0 has size 50.*\('tensor',\)"):
        sharding.tree_shardings(abstract_params(cfg), mesh, MeshConfig().rules)


def test_batch_not_divisible_by_data_axes():
    mesh = sharding.make_mesh(MeshConfig(data=4, fsdp=2))
    with pytest.raises(ValueError, match="'tokens'.*batch size 6 is not divisible by .* 8"):
        sharding.shard_batch({"tokens": np.zeros((6, 3), np.int32)}, mesh)


_WORKER = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    from rlhf_jax import sharding
    from rlhf_jax.config import MeshConfig, model_config
    from rlhf_jax.model import Transformer, init_params
    pid = int(sys.argv[1])
    sharding.initialize_distributed(f"127.0.0.1:{sys.argv[2]}", 2, pid)
    cfg = model_config("tiny", vocab_size=48)
    mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=2))
    assert len(mesh.devices.flat) == 4 and jax.process_count() == 2
    tokens = np.arange(8 * 6, dtype=np.int32).reshape(8, 6) % 48
    params, _ = sharding.init_sharded(
        lambda: Transformer(cfg).init(jax.random.key(0), tokens[:1])["params"], mesh,
        MeshConfig().rules)
    local = sharding.shard_batch({"t": tokens[pid * 4:(pid + 1) * 4]}, mesh)
    out = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t).sum())(params, local["t"])
    ref = Transformer(cfg).apply({"params": init_params(cfg, jax.random.key(0))}, tokens).sum()
    np.testing.assert_allclose(float(out), float(ref), rtol=1e-5)
    print("OK", pid)
    """
)


@pytest.mark.e2e
def test_two_process_run_matches_single_process(two_processes):
    two_processes(_WORKER)
