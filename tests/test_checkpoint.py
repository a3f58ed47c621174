"""Stage checkpoints: round trip, keep-N, crash safety, cross-mesh restore, hand-off, load order."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rlhf_jax import checkpoint
from rlhf_jax.config import Config, MeshConfig
from rlhf_jax.sharding import make_mesh


@flax.struct.dataclass
class _State:
    params: dict
    opt_state: optax.OptState
    step: jax.Array
    rng: jax.Array  # typed key
    rng_data: jax.Array  # raw uint32 key data


def _params(seed: float = 0.0) -> dict:
    return {
        "dense": {"kernel": jnp.arange(16.0).reshape(8, 2) + seed, "bias": jnp.ones(2) * seed},
        "embed": jnp.full((4, 8), seed, jnp.float32),
    }


def _state(seed: float = 0.0) -> _State:
    params = _params(seed)
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)
    _, opt_state = tx.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
    return _State(
        params=params,
        opt_state=opt_state,
        step=jnp.int32(7),
        rng=jax.random.key(int(seed) + 3),
        rng_data=jax.random.key_data(jax.random.key(5)),
    )


def _abstract(tree):
    return checkpoint.abstract_with_shardings(tree, jax.tree.map(lambda x: x.sharding, tree))


def _unkey(x):
    # key_data so typed keys compare too (== is not defined on key arrays).
    return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x


def _assert_tree_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(_unkey(x), _unkey(y)), a, b)


def test_round_trip_state_data_and_metadata(tmp_path):
    state = _state(1.0)
    with checkpoint.StageCheckpointer(tmp_path, "sft", config=Config(name="t")) as ckpt:
        assert ckpt.latest_step() is None
        ckpt.save(
            np.int64(7),
            state,
            data_state={"position": np.int64(12), "epoch": 0},
            metadata={"loss": jnp.float32(0.5), "seconds": np.float64(1.25), "hist": np.arange(3)},
        )
        assert ckpt.latest_step() == 7

    # A fresh process-like reopen sees the committed step.
    with checkpoint.StageCheckpointer(tmp_path, "sft") as ckpt:
        restored, data_state, meta = ckpt.restore(_abstract(state))
    _assert_tree_equal(restored, state)
    assert isinstance(restored, _State)
    assert jnp.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)  # typed keys come back typed
    assert data_state == {"position": 12, "epoch": 0}
    assert meta == {"loss": 0.5, "seconds": 1.25, "hist": [0, 1, 2]}
    assert type(meta["loss"]) is float
    assert checkpoint.read_metadata(tmp_path, "sft") == meta
    config = json.loads((tmp_path / "sft" / "config.json").read_text())
    assert config["name"] == "t" and config["model"]["d_model"] == 128
    assert json.loads((tmp_path / "sft" / "7" / "meta" / "metadata").read_text()) == meta


def test_keep_last_n(tmp_path):
    with checkpoint.StageCheckpointer(tmp_path, "rm", keep=2) as ckpt:
        for step in range(1, 5):
            ckpt.save(step, {"x": jnp.full(3, step)}, metadata={"step": step})
        assert ckpt.all_steps() == [3, 4]
        with pytest.raises(ValueError, match="cannot save step 4: .* already has step 4"):
            ckpt.save(4, {"x": jnp.zeros(3)})
    assert sorted(p.name for p in (tmp_path / "rm").iterdir() if p.name.isdigit()) == ["3", "4"]
    assert checkpoint.read_metadata(tmp_path, "rm", step=3) == {"step": 3}


_KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from rlhf_jax import checkpoint

    commit = atomicity.AtomicRenameTemporaryPath.finalize

    async def die_before_committing_step_2(self):
        # Everything of step 2 is written; the process dies before the commit (rename).
        if self.get_final().name == "2":
            os.kill(os.getpid(), signal.SIGKILL)
        return await commit(self)

    atomicity.AtomicRenameTemporaryPath.finalize = die_before_committing_step_2
    ckpt = checkpoint.StageCheckpointer(sys.argv[1], "ppo")
    ckpt.save(1, {"x": jnp.full(4, 1.0)}, data_state={"pos": 1})
    ckpt.save(2, {"x": jnp.full(4, 2.0)}, data_state={"pos": 2})
""")


@pytest.mark.e2e
def test_save_killed_before_commit_is_never_resumed(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_SAVE, str(tmp_path)], env=env, capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]
    stage = tmp_path / "ppo"
    assert any(p.name.startswith("2.orbax-checkpoint-tmp") for p in stage.iterdir())
    (stage / "9.orbax-checkpoint-tmp-1234").mkdir()  # a hand-made unfinished one, too

    abstract = _abstract({"x": jnp.zeros(4)})
    ckpt = checkpoint.StageCheckpointer(tmp_path, "ppo")
    assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
    state, data_state, resumed = checkpoint.resume_or_start(ckpt, abstract, start=pytest.fail)
    assert resumed and data_state == {"pos": 1}
    np.testing.assert_array_equal(state["x"], np.full(4, 1.0))
    # Saving step 2 again replaces the stale temporary directory.
    ckpt.save(2, {"x": jnp.full(4, 3.0)})
    assert ckpt.latest_step() == 2
    np.testing.assert_array_equal(ckpt.restore(abstract)[0]["x"], np.full(4, 3.0))
    ckpt.close()


def test_restore_onto_another_mesh(tmp_path):
    mesh8 = make_mesh(MeshConfig(data=8))
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh8, spec))  # noqa: E731
    state = {
        "w": put(jnp.arange(128.0).reshape(16, 8), P("data", None)),
        "b": put(jnp.arange(8.0), P()),
        "step": put(jnp.int32(3), P()),
        "rng": put(jax.random.key(1), P()),
    }
    with checkpoint.StageCheckpointer(tmp_path, "pretrain") as ckpt:
        ckpt.save(3, state)

    mesh222 = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    specs = {"w": P("fsdp", "tensor"), "b": P("tensor"), "step": P(), "rng": P()}
    targets = jax.tree.map(lambda s: NamedSharding(mesh222, s), specs)
    abstract = checkpoint.abstract_with_shardings(jax.eval_shape(lambda: state), targets)
    with checkpoint.StageCheckpointer(tmp_path, "pretrain") as ckpt:
        restored, data_state, meta = ckpt.restore(abstract)
    assert data_state is None and meta == {}
    for name, target in targets.items():
        assert restored[name].sharding == target, name
    assert restored["w"].addressable_shards[0].data.shape == (8, 4)
    _assert_tree_equal(restored, state)

    no_sharding = jax.eval_shape(lambda: state)
    with (
        checkpoint.StageCheckpointer(tmp_path, "pretrain") as ckpt,
        pytest.raises(ValueError, match=r"\['b'\].*abstract_with_shardings"),
    ):
        ckpt.restore(no_sharding)


def test_exported_params_hand_off_and_clear_errors(tmp_path):
    with checkpoint.StageCheckpointer(tmp_path, "sft", keep=3) as ckpt:
        ckpt.save(1, _state(1.0))
        ckpt.save(2, _state(2.0), export_params=_params(2.0))
        ckpt.save(3, _state(3.0))  # a later step without an export: step 2's params still count
    abstract = _abstract(_params())
    _assert_tree_equal(checkpoint.exported_params(tmp_path, "sft", abstract), _params(2.0))

    with checkpoint.StageCheckpointer(tmp_path, "rm") as ckpt:
        ckpt.save(1, _state())
    with pytest.raises(FileNotFoundError, match=f"no exported params under {tmp_path / 'rm'}"):
        checkpoint.exported_params(tmp_path, "rm", abstract)
    with pytest.raises(FileNotFoundError, match=f"no checkpoint directory {tmp_path / 'ppo'}"):
        checkpoint.exported_params(tmp_path, "ppo", abstract)
    assert not (tmp_path / "ppo").exists()  # reading never creates a stage directory


def test_resume_or_start_calls_start_only_without_a_checkpoint(tmp_path):
    calls = []

    def start():
        calls.append(1)
        return _state(0.0)

    abstract = _abstract(_state())
    with checkpoint.StageCheckpointer(tmp_path, "ppo") as ckpt:
        state, data_state, resumed = checkpoint.resume_or_start(ckpt, abstract, start=start)
        assert (len(calls), data_state, resumed) == (1, None, False)
        ckpt.save(5, _state(4.0), data_state={"pos": 40})

    with checkpoint.StageCheckpointer(tmp_path, "ppo") as ckpt:
        state, data_state, resumed = checkpoint.resume_or_start(ckpt, abstract, start=start)
    assert (len(calls), data_state, resumed) == (1, {"pos": 40}, True)
    _assert_tree_equal(state, _state(4.0))


_TWO_PROCESS_WORKER = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jax.experimental import multihost_utils
    from rlhf_jax import checkpoint, sharding
    from rlhf_jax.config import MeshConfig

    pid, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    sharding.initialize_distributed(f"127.0.0.1:{port}", 2, pid)
    mesh = sharding.make_mesh(MeshConfig(data=-1))
    w = jax.device_put(jnp.arange(32.0).reshape(8, 4), NamedSharding(mesh, P("data")))
    with checkpoint.StageCheckpointer(workdir, "sft", config={"pid": pid}) as ckpt:
        ckpt.save(1, {"w": w}, data_state={"pos": 3}, metadata={"loss": np.float32(0.25)},
                  export_params={"w": w})

    mesh2 = sharding.make_mesh(MeshConfig(data=2, fsdp=1, tensor=2))
    target = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32,
                                        sharding=NamedSharding(mesh2, P("data", "tensor")))}
    with checkpoint.StageCheckpointer(workdir, "sft") as ckpt:
        state, data_state, meta = ckpt.restore(target)
    params = checkpoint.exported_params(workdir, "sft", target)
    assert (data_state, meta) == ({"pos": 3}, {"loss": 0.25}), (data_state, meta)
    for tree in (state, params):
        assert tree["w"].sharding == target["w"].sharding
        full = multihost_utils.process_allgather(tree["w"], tiled=True)
        np.testing.assert_array_equal(full, np.arange(32.0).reshape(8, 4))
    print("OK", pid)
""")


@pytest.mark.e2e
def test_two_process_save_and_restore(tmp_path, two_processes):
    two_processes(_TWO_PROCESS_WORKER, str(tmp_path))
    # JSON files come from process 0 only.
    assert json.loads((tmp_path / "sft" / "config.json").read_text()) == {"pid": 0}
