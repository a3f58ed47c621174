"""LoRA, shared frozen weights, logits in chunks and gradient accumulation.

Reference numbers: the base model's own forward (an adapted model at initialisation must equal
it bit for bit), a float64 NumPy evaluation of the adapted layers, transformers' PyTorch models
(merged exports) and peft's LoRA layers on them (adapter exports), and the same update taken
over the whole batch (accumulated micro-batches must equal it within float32 rounding).
"""

import ast
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers as T
from flax import traverse_util

from rlhf_jax import hf, lora, losses, sharding
from rlhf_jax.config import (
    LoraConfig,
    MeshConfig,
    OptimizerConfig,
    PPOConfig,
    model_config,
)
from rlhf_jax.errors import ConfigError
from rlhf_jax.fields import validate
from rlhf_jax.model import Transformer, init_params, predicted_logprobs, unembed
from rlhf_jax.train_state import (
    abstract_state,
    adapt,
    create_train_state,
    key_data,
    make_optimizer,
    train_state_shardings,
)

V = 61


def _model(family: str, head: str = "lm", rank: int = 4, **kw):
    size = "tiny" if family == "gpt2" else "tiny-llama"
    lo = LoraConfig(rank=rank, alpha=8.0) if rank else LoraConfig()
    return model_config(size, vocab_size=V, head=head, lora=lo, **kw)


def _tokens(b=3, t=9, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, V, (b, t)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[0, :3] = 0  # left padding
    return tokens, mask


def _perturbed(adapters, seed=1):
    """Adapters with B drawn too (at initialisation B = 0 and an adapter changes nothing)."""
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    )


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("head", ["lm", "scalar"])
def test_adapters_at_initialisation_give_the_base_exactly(family, head):
    model = _model(family, head)
    base = init_params(model.plain(), jax.random.key(0))
    parts = adapt(base, model, jax.random.key(1))
    names = {"/".join(k) for k in traverse_util.flatten_dict(parts.trainable)}
    # Only the adapters (and a scalar head) are trained; every other weight is frozen.
    assert all(n.endswith(("lora_a", "lora_b")) or n.startswith("score_head") for n in names)
    assert any(n.startswith("score_head") for n in names) == (head == "scalar")
    frozen = {"/".join(k) for k in traverse_util.flatten_dict(parts.frozen)}
    assert not frozen & names and "embed" in frozen
    tokens, mask = _tokens()
    plain = Transformer(model.plain()).apply({"params": base}, tokens, mask)
    adapted = Transformer(model).apply(
        {"params": lora.merge(parts.frozen, parts.trainable)}, tokens, mask
    )
    head = {k: v for k, v in parts.trainable.items() if k == "score_head"}
    # The frozen base alone (and the head) runs with its adapters switched off.
    off = Transformer(model).apply({"params": lora.merge(parts.frozen, head)}, tokens, mask)
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(plain))
    np.testing.assert_array_equal(np.asarray(off), np.asarray(plain))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_folded_adapters_equal_the_adapted_forward(family):
    """``fold`` writes W + (alpha/r) A B into each kernel (float64 reference: the adapted
    layers' own arithmetic, evaluated by the model in float32)."""
    model = _model(family)
    base = init_params(model.plain(), jax.random.key(0))
    parts = adapt(base, model, jax.random.key(1))
    trained = lora.merge(parts.frozen, _perturbed(parts.trainable))
    tokens, mask = _tokens()
    adapted = Transformer(model).apply({"params": trained}, tokens, mask)
    folded = Transformer(model.plain()).apply({"params": lora.fold(trained, model)}, tokens, mask)
    assert float(jnp.max(jnp.abs(adapted - base_logits(model, base, tokens, mask)))) > 1e-3
    np.testing.assert_allclose(np.asarray(folded), np.asarray(adapted), atol=2e-5, rtol=1e-5)
    q = traverse_util.flatten_dict(trained)
    a, b = (np.asarray(q[("layers_0", "attn", "q", n)], np.float64) for n in ("lora_a", "lora_b"))
    w = np.asarray(q[("layers_0", "attn", "q", "kernel")], np.float64)
    want = w + (8.0 / 4) * np.tensordot(a, b, axes=1)
    got = np.asarray(lora.fold(trained, model)["layers_0"]["attn"]["q"]["kernel"], np.float64)
    np.testing.assert_allclose(got, want, atol=1e-6)


def base_logits(model, params, tokens, mask):
    return Transformer(model.plain()).apply({"params": params}, tokens, mask)


def test_frozen_base_is_held_in_its_dtype_and_only_adapters_have_optimiser_state():
    model = dataclasses.replace(_model("llama"), frozen_dtype="bfloat16")
    base = init_params(model.plain(), jax.random.key(0))
    parts = adapt(base, model, jax.random.key(1))
    assert {x.dtype for x in jax.tree.leaves(parts.frozen)} == {jnp.dtype("bfloat16")}
    assert {x.dtype for x in jax.tree.leaves(parts.trainable)} == {jnp.dtype("float32")}
    tx = optax.adam(1e-3)
    state = abstract_state(model, tx)
    n_adapter = sum(x.size for x in jax.tree.leaves(parts.trainable))
    n_state = sum(x.size for x in jax.tree.leaves(state.params))
    assert n_state == n_adapter < sum(x.size for x in jax.tree.leaves(base)) / 4
    mesh = sharding.make_mesh(MeshConfig())
    sh = train_state_shardings(model, tx, mesh, MeshConfig().rules)
    created = create_train_state(parts.trainable, tx, key_data(0), sh)
    assert sum(x.size for x in jax.tree.leaves(created.opt_state)) <= 2 * n_adapter + 2


def test_lora_settings_are_checked():
    for bad, says in [
        (dict(targets="q,qkv"), "unknown qkv"),
        (dict(stages="sft,pretrain"), "pretrain trains no adapters"),
        (dict(stages="sft,ppx"), "ppx is no stage"),
    ]:
        with pytest.raises(ConfigError, match=says):
            model_config("tiny", lora=LoraConfig(rank=4, **bad))
    with pytest.raises(ConfigError, match="grad_accum"):
        validate(PPOConfig(minibatch_size=6, batch_size=12, grad_accum=4), "ppo")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_logits_in_chunks_equal_the_whole_block(family):
    """Log-probs, entropies and their gradient, a few tokens' logits at a time (the chunk
    rounded down, padded at the end) against the whole [B T V] block at once."""
    model = _model(family, rank=0)
    params = init_params(model, jax.random.key(0))
    tokens, mask = _tokens(t=11)

    def total(p, chunk):
        out = predicted_logprobs(p, model, tokens, mask, 3, temperature=0.7, with_entropy=True,
                                 chunk_bytes=chunk)  # fmt: skip
        return jnp.sum(out.logprobs) + jnp.sum(out.entropy), out

    (whole, ref), g_ref = jax.value_and_grad(total, has_aux=True)(params, 1 << 30)
    (part, out), g = jax.value_and_grad(total, has_aux=True)(params, 3 * V * 4 * 3)  # 3 tokens
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.entropy), np.asarray(ref.entropy), atol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)
    # And the whole block equals the full forward's logits through losses.token_logprobs.
    logits = Transformer(model).apply({"params": params}, tokens, mask)
    full = losses.token_logprobs(logits[:, 2:-1], jnp.asarray(tokens[:, 3:]), temperature=0.7)
    np.testing.assert_allclose(np.asarray(ref.logprobs), np.asarray(full), atol=1e-6)
    h = Transformer(model).apply({"params": params}, tokens, mask, hidden=True)
    np.testing.assert_array_equal(np.asarray(unembed(params, model, h)), np.asarray(logits))


# --------------------------------------------------------------------------------------------------
# Exports: transformers and peft


def _hf_pair(tmp_path, family):
    """A random LoRA model with trained-looking adapters, its base saved as an HF directory and
    its adapters as a PEFT directory."""
    model = _model(family, rank=4, max_len=32) if family == "gpt2" else _model(family, rank=4)
    base = init_params(model.plain(), jax.random.key(0))
    parts = adapt(base, model, jax.random.key(1))
    adapters = _perturbed(parts.trainable)
    hf.save_checkpoint(tmp_path / "base", model.plain(), base)
    hf.save_checkpoint(
        tmp_path / "merged", model.plain(), lora.fold(lora.merge(base, adapters), model)
    )
    hf.save_adapters(tmp_path / "adapters", model, adapters, base=str(tmp_path / "base"))
    tokens, mask = _tokens(b=2, t=8)
    mask[:] = 1
    ours = Transformer(model).apply({"params": lora.merge(base, adapters)}, tokens, mask)
    return tokens, np.asarray(ours)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_merged_and_peft_exports_equal_the_lora_forward(tmp_path, family):
    from peft import PeftModel  # (a test dependency; the library does not import it)

    tokens, ours = _hf_pair(tmp_path, family)
    with torch.no_grad():
        merged = T.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        got = merged(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
        np.testing.assert_allclose(got, ours, atol=1e-4)
        base = T.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        peft_model = PeftModel.from_pretrained(base, tmp_path / "adapters")
        got = peft_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
        np.testing.assert_allclose(got, ours, atol=1e-4)
        # peft's own merge gives the same weights as ours
        folded = peft_model.merge_and_unload()(torch.tensor(tokens, dtype=torch.long)).logits
        np.testing.assert_allclose(folded.numpy(), ours, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# Gradient accumulation


def _one_update(make, model, batch, micro):
    mesh = sharding.make_mesh(MeshConfig())
    tx = make_optimizer(OptimizerConfig(lr=1e-3, schedule="constant"), 10)
    sh = train_state_shardings(model, tx, mesh, MeshConfig().rules)
    params = init_params(model, jax.random.key(0))
    state = create_train_state(params, tx, key_data(0), sh)
    new, metrics = make(model, tx, sh, mesh, micro)(state, None, sharding.shard_batch(batch, mesh))
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                zip(jax.tree.leaves(new.params), jax.tree.leaves(params)))  # fmt: skip
    assert moved > 1e-4
    return jax.device_get(new.params), {k: float(v) for k, v in metrics.items()}


def _same(a, b):
    (pa, ma), (pb, mb) = a, b
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-6, rtol=1e-5)
    for k in ma:
        assert mb[k] == pytest.approx(ma[k], rel=1e-5, abs=1e-6), k


def test_sft_update_over_4_accumulated_micro_batches_equals_the_whole_batch():
    """The token-mean loss over rows of unequal weight (padding, prompt tokens at 0.5)."""
    from rlhf_jax.stages.lm import make_lm_step

    tokens, mask = _tokens(b=8, t=9, seed=3)
    mask[1, :5] = 0
    loss_mask = mask.astype(np.float32)
    loss_mask[:, :4] *= 0.5
    loss_mask[5] = 0.0  # a row with nothing to predict
    batch = {"tokens": tokens, "attention_mask": mask, "loss_mask": loss_mask}
    make = lambda m, tx, sh, mesh, micro: make_lm_step(m, tx, sh, mesh, micro=micro)  # noqa: E731
    model = _model("llama", rank=0)
    _same(_one_update(make, model, batch, 1), _one_update(make, model, batch, 4))


def test_rm_update_over_4_accumulated_micro_batches_equals_the_whole_batch():
    """The ranking loss is a mean over the prompts that have a pair: a prompt whose
    completions tie counts in neither."""
    from rlhf_jax.stages.rm import make_rm_step

    rng = np.random.default_rng(4)
    B, K, T, P = 8, 3, 9, 4
    tokens = rng.integers(1, V, (B, K, T)).astype(np.int32)
    attention = np.ones_like(tokens)
    attention[:, :, :2] = 0
    response = np.zeros_like(tokens)
    response[:, :, P:] = 1
    ranks = np.stack([rng.permutation(K) for _ in range(B)]).astype(np.int32)
    ranks[2] = 0  # all tied: no pair
    valid = np.ones((B, K), np.int32)
    valid[6, 2] = 0
    batch = dict(tokens=tokens, attention_mask=attention, response_mask=response, ranks=ranks,
                 valid=valid)  # fmt: skip
    make = lambda m, tx, sh, mesh, micro: make_rm_step(m, tx, sh, mesh, P, micro=micro)  # noqa: E731
    model = _model("gpt2", head="scalar", rank=0)
    _same(_one_update(make, model, batch, 1), _one_update(make, model, batch, 4))


# --------------------------------------------------------------------------------------------------
# Through the stages and the CLI (the tiny world's shared pretrain, SFT and RM)


def _lora_ppo_config(**lora_kw):
    from rlhf_jax.configs import tiny

    config = tiny.get_config()
    adapters = LoraConfig(rank=4, alpha=16.0, stages="ppo", **lora_kw)
    return dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, lora=adapters),
        ppo=dataclasses.replace(config.ppo, iterations=4),
        checkpoint_every=2,
    )


@pytest.mark.e2e
def test_interrupted_lora_ppo_resumes_to_the_uninterrupted_result(rm_run, tmp_path, interrupted):
    """Checkpoints hold the adapters (not the bases): resuming reloads the bases from SFT and
    the RM and continues bit for bit."""
    import shutil

    from rlhf_jax import checkpoint
    from rlhf_jax.rundir import RunDir
    from rlhf_jax.stages.lineage import load_policy
    from rlhf_jax.stages.ppo import run_ppo

    config = _lora_ppo_config()
    whole = shutil.copytree(rm_run, tmp_path / "whole")
    parts = shutil.copytree(rm_run, tmp_path / "parts")
    run_ppo(config, whole)
    interrupted(lambda w: run_ppo(config, w), parts, "ppo", at=3, kept=2)
    export = lambda w: jax.device_get(load_policy(config, w, "ppo"))  # noqa: E731
    jax.tree.map(np.testing.assert_array_equal, export(parts), export(whole))
    assert RunDir(parts).metrics("ppo") == RunDir(whole).metrics("ppo")
    # The state holds no base: a step's state is the adapters and their moments.
    meta = checkpoint.read_metadata(whole, "ppo")
    assert meta["lora"]["rank"] == 4 and meta["lora"]["base"] == "stage:sft"
    # The saved tree's leaves: adapters (with moments and EMA), the value and reward heads and
    # counters; no embedding, norm or base kernel.
    meta = json.loads((whole / "ppo" / "2" / "state" / "_METADATA").read_text())
    leaves = [ast.literal_eval(k) for k in meta["tree_metadata"]]
    params = [k for k in leaves if len(k) > 1 and any(p.endswith("params") for p in k)]
    assert params and all(k[-1] in ("lora_a", "lora_b") or "score_head" in k for k in params)


@pytest.mark.e2e
def test_cli_lora_ppo_exports_merged_weights_and_a_peft_adapter(rm_run, tmp_path, rlhf_jax_cli):
    """``rlhf-jax ppo`` with LoRA, then ``export`` merged (transformers) and ``--adapters``
    (peft onto the SFT export): the two give the same logits. A base changed under the
    adapters is refused in one line."""
    import shutil

    from peft import PeftModel

    work = shutil.copytree(rm_run, tmp_path / "run")
    args = ("--config=tiny", f"--workdir={work}", "--config.model.lora.rank=4",
            "--config.model.lora.stages=ppo", "--config.ppo.iterations=3",
            "--config.ppo.ptx_coef=0", "--config.ppo.ema_decay=0",
            "--config.ppo.policy_optimizer.lr=3e-3")  # fmt: skip
    ran = rlhf_jax_cli("ppo", *args, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    for stage, extra, out in (("sft", (), "sft_hf"), ("ppo", (), "ppo_hf"),
                              ("ppo", ("--adapters",), "ppo_lora")):  # fmt: skip
        done = rlhf_jax_cli("export", *args, f"--stage={stage}", f"--out={tmp_path / out}", *extra,
                            cwd=tmp_path)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    assert "load them onto the export of stage 'sft'" in done.stdout + done.stderr
    adapter = json.loads((tmp_path / "ppo_lora" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["rank_pattern"]  # GPT-2's fused q|k|v: rank 12
    tokens = torch.tensor([[1, 5, 9, 13, 7, 3, 11, 2]])
    with torch.no_grad():
        merged = T.AutoModelForCausalLM.from_pretrained(tmp_path / "ppo_hf")(tokens).logits
        base = T.AutoModelForCausalLM.from_pretrained(tmp_path / "sft_hf")
        sft = base(tokens).logits
        adapted = PeftModel.from_pretrained(base, tmp_path / "ppo_lora")(tokens).logits
    np.testing.assert_allclose(adapted.numpy(), merged.numpy(), atol=1e-4)
    assert float((merged - sft).abs().max()) > 1e-2  # PPO moved the policy
    # Without --adapters on a stage that trained every weight: one line.
    full = rlhf_jax_cli("export", *args, "--stage=sft", f"--out={tmp_path / 'x'}", "--adapters",
                        cwd=tmp_path)  # fmt: skip
    assert full.returncode != 0 and "trained every weight" in full.stderr
    assert "Traceback" not in full.stderr
    # SFT run again (here: its final metadata rewritten) changes the base under the adapters.
    meta = max((work / "sft").glob("[0-9]*"), key=lambda p: int(p.name)) / "meta" / "metadata"
    meta.write_text(meta.read_text().replace('"seconds": ', '"seconds": 1'))
    again = rlhf_jax_cli("ppo", *args, "--config.ppo.iterations=4", cwd=tmp_path)
    assert again.returncode != 0, again.stdout[-2000:]
    lines = [x for x in again.stderr.splitlines() if x.startswith("rlhf-jax")]
    assert len(lines) == 1 and "the frozen base of policy" in lines[0], again.stderr[-2000:]
