"""``rlhf-jax plan``: every stage compiled ahead of time for a TPU topology (libtpu, no TPU), the
per-chip bytes against a hand count, and the refusal of a config that does not fit.

The TPU compiles run in this process through the CLI's ``main`` (no training, no process), but
take minutes on 2 cores for the whole tiny recipe, so those are ``e2e``.
"""

import json
import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from rlhf_jax import cli, plan, sharding, stage_table
from rlhf_jax.configs import tiny
from rlhf_jax.data import sources
from rlhf_jax.data.loaders import prompt_batch
from rlhf_jax.model import abstract_params
from rlhf_jax.stages import lm, ppo, rm

GIB = 1024**3
EVERY_METHOD = "--config.methods=dpo,grpo,rloo,best_of_n"


def run_plan(capsys, *args: str) -> tuple[int, str, str]:
    """``(exit status, stdout, stderr)`` of ``rlhf-jax plan *args`` in this process."""
    code = 0
    try:
        cli.main(["plan", *args])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def tiny_plan(capsys, topology: str, *overrides: str) -> dict:
    code, out, err = run_plan(
        capsys, "--config=tiny", f"--topology={topology}", "--json", EVERY_METHOD, *overrides
    )
    assert code == 0, err[-3000:]
    return json.loads(out)


def expected_programs() -> set[tuple[str, str]]:
    """Every training stage of the table (the tiny world has pretraining text and PPO-ptx)
    with its program, and the evaluation's sampler."""
    programs = {
        (s.name, f"{s.name} {'iteration' if s.curves else 'step'}")
        for s in stage_table.STAGES
        if s.trains
    }
    return programs | {("eval", "eval prefill"), ("eval", "eval decode")}


@pytest.mark.e2e
@pytest.mark.parametrize(
    "topology,mesh",
    [
        ("v5e-4", ("--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.mesh.tensor=1")),
        ("v5e-4", ("--config.mesh.data=2", "--config.mesh.fsdp=1", "--config.mesh.tensor=2")),
        ("v5e-8", ("--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2")),
    ],
    ids=["v5e-4-fsdp4", "v5e-4-data2xtensor2", "v5e-8-data2xfsdp2xtensor2"],
)
def test_every_tiny_stage_compiles_for_v5e(capsys, topology, mesh):
    """Every stage of the tiny recipe (every method too) and the evaluation's sampler compile
    for TPU v5e chips on fsdp, data x tensor and data x fsdp x tensor meshes, and fit."""
    result = tiny_plan(capsys, topology, *mesh)
    chips = int(topology.split("-")[1])
    sizes = dict(flag.removeprefix("--config.mesh.").split("=") for flag in mesh)
    expect_mesh = {k: (chips if v == "-1" else int(v)) for k, v in sizes.items()}
    assert result["mesh"] == expect_mesh and result["devices"] == chips
    assert result["device"] == "TPU v5e" and result["fits"]
    rows = result["rows"]
    assert {(r["stage"], r["program"]) for r in rows} == expected_programs()
    for r in rows:
        assert r["hbm"] == 16 * GIB and r["fits"] and not r["error"], r
        assert r["arguments"] > 0 and r["temporaries"] >= 0 and r["total"] >= r["arguments"], r
        assert r["flops"] > 0 and r["roofline_s"] > 0 and r["tokens_per_s"] > 0, r
        assert r["compiler_flops"] and r["compiler_flops"] > 0, r
    # A PPO-ptx iteration does PPO's work and more; a step holds its optimiser state.
    by = {r["program"]: r for r in rows}
    assert by["ppo_ptx iteration"]["flops"] > by["ppo iteration"]["flops"]
    assert by["sft step"]["arguments"] > by["eval prefill"]["arguments"]


def test_argument_bytes_match_a_hand_count(capsys):
    """The SFT step's arguments per device are its float32 params, two Adam moments of each,
    the step counter and key, and the batch (tokens, attention and loss masks), counted here
    from the parameter shapes; on one CPU device (no TPU tiling pads small arrays)."""
    code, out, err = run_plan(capsys, "--config=tiny", "--topology=cpu:1", "--json", "--stages=sft")
    assert code == 0, err
    (row,) = json.loads(out)["rows"]
    config = tiny.get_config()
    shapes = jax.tree.leaves(nn.meta.unbox(abstract_params(config.model)))
    params = sum(math.prod(x.shape) for x in shapes)
    d = config.data
    tokens = config.sft.batch_size * max(d.prompt_len + d.response_len, d.text_len)
    by_hand = 4 * (3 * params) + 3 * 4 * tokens  # params + mu + nu; three int32/f32 batch arrays
    assert row["arguments"] == pytest.approx(by_hand, rel=0.01)
    assert row["hbm"] is None and row["fits"]


def test_a_config_that_does_not_fit_ends_in_one_line_per_program(capsys):
    """On one v5e chip (16 GiB): an SFT batch of 4096 sequences whose MLP activations of width
    65,536 (26 GB each) overflow while the weights fit (logits are made in chunks, so a large
    vocabulary alone no longer does), then two blocks of width 8192 (1.6e9 params: float32
    weights and Adam moments alone are 19 GB). Each ends in one line saying what would fit."""
    common = ("--config=tiny", "--topology=v5e-1", "--stages=sft")
    cases = [
        (("--config.model.mlp_dim=65536", "--config.sft.batch_size=4096"),
         ("--config.model.remat=True", "--config.sft.grad_accum=2",
          "--config.sft.batch_size=2048")),
        (("--config.model.d_model=8192", "--config.model.mlp_dim=32768"),
         ("--config.model.lora.rank=16 --config.model.frozen_dtype=bfloat16",
          "a topology of at least 2 chips with --config.mesh.fsdp=-1")),
    ]  # fmt: skip
    for overrides, fixes in cases:
        code, out, err = run_plan(capsys, *common, *overrides)
        assert code == 1, err[-3000:]
        lines = [line for line in err.strip().splitlines() if line.startswith("rlhf-jax: plan:")]
        assert len(lines) == 1, err[-3000:]
        assert "sft (sft step) does not fit" in lines[0] and "GiB over" in lines[0]
        assert all(fix in lines[0] for fix in fixes), lines[0]
        assert "Traceback" not in err
        assert "NO (-" in out  # the table says so too


def test_bad_topologies_are_one_line(capsys):
    for topology, says in [
        ("v9-8", "expected one of v2-8"),
        ("h100-x", "expected <gpu>-<number of GPUs>"),
        ("cpu:99", "xla_force_host_platform_device_count=99"),
    ]:
        code, _, err = run_plan(capsys, "--config=tiny", f"--topology={topology}")
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_roofline_counts_every_loop_pass():
    """The FLOPs of a decode pass grow with its positions and a train pass is three forwards;
    the weight bytes of a decode are read once per position (the compiler's cost analysis
    counts a loop's body once)."""
    model = tiny.get_config().model
    fwd = stage_table.Pass(model, "forward", 100, 10)
    train = stage_table.Pass(model, "train", 100, 10)
    decode = stage_table.Pass(model, "decode", 100, 10, steps=5)
    assert plan.pass_flops(train) == 3 * plan.pass_flops(fwd)
    assert plan.pass_bytes(decode, 1) == 5 * plan.pass_bytes(fwd, 1)
    assert plan.pass_bytes(fwd, 2) == plan.pass_bytes(fwd, 1) / 2
    # The matmul weights of a GPT-2 block by hand: 4 D^2 attention + 2 D F MLP, plus the head.
    D, F, V, L = model.d_model, model.mlp_dim, model.vocab_size, model.n_layers
    assert plan.matmul_params(model) == L * (4 * D * D + 2 * D * F) + V * D
    assert plan.param_bytes(model) == 4 * sum(
        np.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(abstract_params(model)))
    )


@pytest.mark.e2e
@pytest.mark.parametrize(
    "topology,mesh",
    [("t4", ()), ("a100-8", ("--config.mesh.data=1", "--config.mesh.fsdp=-1"))],
    ids=["t4", "a100-8-fsdp"],
)
def test_every_tiny_stage_compiles_for_gpus(capsys, topology, mesh):
    """Through jax's CUDA plugin, described by the data sheet's figures: no GPU, no CUDA."""
    pytest.importorskip("jax_plugins.xla_cuda12", reason="needs `pip install jax-cuda12-plugin`")
    result = tiny_plan(capsys, topology, *mesh)
    rows = result["rows"]
    assert {(r["stage"], r["program"]) for r in rows} == expected_programs()
    assert result["devices"] == int(topology.partition("-")[2] or 1) and result["fits"]
    for r in rows:
        assert r["hbm"] == plan.GPUS[topology.partition("-")[0]].chip.hbm_bytes, r
        assert r["fits"] and r["arguments"] > 0 and r["roofline_s"] > 0, r


def test_a_multi_host_slice_compiles_the_multi_process_program(capsys):
    """v5e-16 is four hosts of four chips: one program over the 16 devices of 4 processes."""
    code, out, err = run_plan(
        capsys,
        "--config=tiny",
        "--topology=v5e-16",
        "--stages=sft",
        "--config.mesh.data=1",
        "--config.mesh.fsdp=-1",
        "--json",
    )
    assert code == 0, err[-3000:]
    result = json.loads(out)
    assert (result["devices"], result["hosts"], result["mesh"]["fsdp"]) == (16, 4, 16)
    assert result["rows"][0]["fits"] and result["rows"][0]["arguments"] > 0


@pytest.mark.e2e
def test_planned_batches_are_the_batches_a_stage_reads(tiny_run):
    """What a plan compiles for is what runs: each stage's planned batch has the keys, shapes
    and dtypes of the batch its runner builds from the data (the shared tiny run's datasets; K
    set to the comparisons' own), for SFT with its pretraining share, the RM, DPO, PPO-ptx and
    GRPO."""
    config, workdir = tiny_run.config, tiny_run.workdir
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    read = lambda use, n: next(iter(sources.loader(config, workdir, use, n, 0)))  # noqa: E731
    K = read("rm", 1)["tokens"].shape[1]
    inputs = stage_table.PlanInputs(completions=K)
    n_demo, n_text = lm.lm_shares(config, "sft")
    real = {
        "sft": lm.lm_batch(config, "sft", read("sft", n_demo), read("pretrain", n_text)),
        "rm": rm.comparison_batch(read("rm", config.rm.batch_size)),
        "dpo": rm.comparison_batch(read("rm", config.dpo.batch_size)),
        "ppo_ptx": (
            prompt_batch(read("ppo", config.ppo.batch_size)),
            read("pretrain", ppo.ptx_rows(config)),
        ),
        "grpo": prompt_batch(read("ppo", config.grpo.batch_size)),
    }  # fmt: skip
    # Where each step takes its batch: (state, frozen base, batch) for SFT and the RM, (state,
    # batch, reference) for DPO, (state, frozen bases, prompts, ptx) for PPO, (state, prompts,
    # frozen) for GRPO.
    where = {"sft": 2, "rm": 2, "dpo": 1, "ppo_ptx": slice(2, 4), "grpo": 1}
    for name, batch in real.items():
        (program,) = stage_table.get(name).plan(config, mesh, inputs)
        planned = program.args[where[name]]
        describe = lambda tree: jax.tree.map(lambda x: (x.shape, np.dtype(x.dtype)), tree)  # noqa: E731
        assert describe(sharding.abstract_batch(batch, mesh)) == describe(planned), name
