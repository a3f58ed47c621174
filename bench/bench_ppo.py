"""One PPO iteration: rlhf_jax against TRL 1.12's PPO trainer and against the FLOP floor.

    pip install -e ".[bench]"                      # trl==1.12.0, torch==2.13.0 (CPU build)
    python bench/bench_ppo.py                      # 2 layers x 128 wide
    python bench/bench_ppo.py --size=12L768        # 12 layers x 768 (GPT-2-small shape)

Both sides do the same iteration on random weights of the same GPT-2 shapes, float32: 64 episodes
of a 16-token prompt and exactly 32 sampled tokens (no stop token), scored by a frozen reference,
a value network and a reward model of the policy's shape, then 4 epochs x 2 minibatches of
policy and value updates. TRL runs in a subprocess (``--trl``: ``trl.experimental.ppo``, the last
release with PPO) with its time per iteration taken between ``on_step_end`` callbacks; ours is
``stages.ppo.make_ppo_iteration`` jitted as the PPO stage jits it. Each is timed over
``--iterations`` iterations after a first one that compiles (ours) or warms up (TRL), in wall
time and in process CPU time (a shared VM's steal time inflates the first, not the second).

The floor is the iteration's matmul FLOPs over this machine's float32 matmul rate, measured at
the start of the same run (``bench_train.matmul_rate``): sampling (prefill + one decode per
token), scoring (two policy-shaped and two critic-shaped forwards over the 48 tokens) and the
updates (forward + backward of policy and value per episode and epoch), each counted as
``2 N`` FLOPs per token per forward for the N parameters that multiply, plus attention.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np

SIZES = {
    "2L128": dict(n_layers=2, d_model=128, n_heads=4, mlp_dim=512),
    "12L768": dict(n_layers=12, d_model=768, n_heads=12, mlp_dim=3072),
}
VOCAB, PROMPT, RESPONSE, EPISODES, MINIBATCHES, EPOCHS = 512, 16, 32, 64, 2, 4


def iteration_flops(size: dict) -> dict[str, float]:
    """Matmul FLOPs of one iteration, by phase (see the module docstring)."""
    L, D, F = size["n_layers"], size["d_model"], size["mlp_dim"]
    body = L * (4 * D * D + 2 * D * F)  # q, k, v, o and the MLP
    policy, critic = body + D * VOCAB, body + D  # LM head / scalar head
    T, B = PROMPT + RESPONSE, EPISODES

    def fwd(n, tokens, context):  # 2 N per token, plus QK^T and AV (2 x 2 L D per key)
        return tokens * (2 * n + 4 * L * D * context)

    sample = fwd(policy, B * PROMPT, PROMPT) + sum(
        fwd(policy, B, PROMPT + t + 1) for t in range(RESPONSE)
    )
    score = 2 * fwd(policy, B * T, T) + 2 * fwd(critic, B * T, T)
    update = EPOCHS * 3 * (fwd(policy, B * T, T) + fwd(critic, B * T, T))  # fwd + 2x bwd
    return {"sample": sample, "score": score, "update": update}


# --------------------------------------------------------------------------------------------------
# rlhf_jax


def run_ours(size: dict, iterations: int) -> dict:
    import jax

    from rlhf_jax import sharding
    from rlhf_jax.config import Config, MeshConfig, OptimizerConfig, PPOConfig, model_config
    from rlhf_jax.stages.ppo import (
        init_ppo_state,
        jit_ppo_iteration,
        make_ppo_iteration,
        ppo_state_shardings,
    )
    from rlhf_jax.train_state import init_model_params, make_optimizer

    model = model_config("S", **size, n_kv_heads=size["n_heads"], vocab_size=VOCAB, max_len=64)
    critic = dataclasses.replace(model, head="scalar")
    ppo = PPOConfig(
        iterations=1000,
        batch_size=EPISODES,
        minibatch_size=EPISODES // MINIBATCHES,
        epochs=EPOCHS,
        max_new_tokens=RESPONSE,
        ema_decay=0.0,
        policy_optimizer=OptimizerConfig(lr=1e-6, schedule="constant", warmup_steps=0),
    )
    config = Config(model=model, ppo=ppo)
    mesh = sharding.make_mesh(MeshConfig())
    rules = config.mesh.rules
    policy_tx = make_optimizer(ppo.policy_optimizer, ppo.iterations)
    value_tx = make_optimizer(ppo.value_optimizer, ppo.iterations)
    shardings = ppo_state_shardings(config, policy_tx, value_tx, mesh, critic)
    sft = init_model_params(model, jax.random.key(0), mesh, rules)
    reward = init_model_params(critic, jax.random.key(1), mesh, rules)
    state = init_ppo_state(config, policy_tx, value_tx, shardings, sft, reward, 0.0).state
    # EOS outside the vocabulary: never sampled, so every response has 32 tokens, as in TRL.
    iteration = make_ppo_iteration(
        config, policy_tx, value_tx, eos_id=VOCAB, pad_id=0, critic=critic
    )
    step = jit_ppo_iteration(iteration, shardings, mesh, with_ptx=False)
    rng = np.random.default_rng(0)
    prompts = {
        "prompt_tokens": rng.integers(1, VOCAB, (EPISODES, PROMPT), dtype=np.int32),
        "prompt_mask": np.ones((EPISODES, PROMPT), np.int32),
    }
    times, cpu = [], []
    for _ in range(iterations + 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        state, metrics, _ = step(state, None, prompts, None)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"first": times[0], "times": times[1:], "cpu": cpu[1:]}


# --------------------------------------------------------------------------------------------------
# TRL, in its own process


def run_trl(size: dict, iterations: int) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import (
        GPT2Config,
        GPT2ForSequenceClassification,
        GPT2LMHeadModel,
        PreTrainedTokenizerFast,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.manual_seed(0)
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
        pad_token="t0",
        eos_token=f"t{VOCAB - 1}",  # TRL needs one; stop_token=None never stops on it
    )
    shape = dict(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=size["d_model"],
        n_layer=size["n_layers"],
        n_head=size["n_heads"],
        n_inner=size["mlp_dim"],
        pad_token_id=0,
    )
    policy, ref = GPT2LMHeadModel(GPT2Config(**shape)), GPT2LMHeadModel(GPT2Config(**shape))
    value = GPT2ForSequenceClassification(GPT2Config(num_labels=1, **shape))
    reward = GPT2ForSequenceClassification(GPT2Config(num_labels=1, **shape))
    rng = np.random.default_rng(0)
    n = EPISODES * (iterations + 1)
    data = Dataset.from_dict({"input_ids": rng.integers(1, VOCAB, (n, PROMPT)).tolist()})
    args = PPOConfig(
        output_dir=os.environ.get("TMPDIR", "/tmp") + "/bench_ppo_trl",
        per_device_train_batch_size=EPISODES,
        gradient_accumulation_steps=1,
        num_mini_batches=MINIBATCHES,
        num_ppo_epochs=EPOCHS,
        local_rollout_forward_batch_size=EPISODES,
        response_length=RESPONSE,
        total_episodes=n,
        stop_token=None,
        missing_eos_penalty=None,
        num_sample_generations=0,
        learning_rate=1e-6,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    times: list[float] = []
    cpu: list[float] = []

    class Clock(TrainerCallback):
        last = None

        def on_train_begin(self, *a, **k):
            Clock.last = (time.perf_counter(), time.process_time())

        def on_step_end(self, *a, **k):
            now = (time.perf_counter(), time.process_time())
            times.append(now[0] - Clock.last[0])
            cpu.append(now[1] - Clock.last[1])
            Clock.last = now

    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        value_model=value,
        train_dataset=data,
        callbacks=[Clock()],
    )
    trainer.train()
    return {"first": times[0], "times": times[1:], "cpu": cpu[1:], "torch": torch.__version__}


def trl_subprocess(size_name: str, iterations: int) -> dict:
    cmd = [sys.executable, __file__, f"--size={size_name}", f"--iterations={iterations}", "--trl"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"TRL run failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="2L128")
    ap.add_argument("--iterations", type=int, default=3, help="timed iterations after the first")
    ap.add_argument("--skip_trl", action="store_true", help="only rlhf_jax and the floor")
    ap.add_argument("--trl", action="store_true", help=argparse.SUPPRESS)  # the subprocess
    args = ap.parse_args()
    size = SIZES[args.size]
    if args.trl:
        print(json.dumps(run_trl(size, args.iterations)))
        return

    import jax
    from bench_train import matmul_rate

    rate = matmul_rate()
    flops = iteration_flops(size)
    floor = sum(flops.values()) / rate
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; JAX {jax.__version__}")
    print(
        f"size {args.size}: {EPISODES} episodes, prompt {PROMPT}, response {RESPONSE}, "
        f"{EPOCHS} epochs x {MINIBATCHES} minibatches, vocab {VOCAB}, float32"
    )
    print(
        f"float32 matmul rate (2048^3): {rate / 1e9:.1f} GFLOP/s; iteration work "
        + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in flops.items())
        + f" GFLOP; floor {floor * 1e3:.0f} ms"
    )
    ours = run_ours(size, args.iterations)
    t_ours, c_ours = float(np.median(ours["times"])), float(np.median(ours["cpu"]))
    print(
        f"rlhf_jax: {t_ours * 1e3:8.0f} ms/iteration (median of {len(ours['times'])}; "
        f"first call with compilation {ours['first']:.1f} s) = {floor / t_ours:.0%} of the floor; "
        f"{c_ours:.1f} CPU s"
    )
    if args.skip_trl:
        return
    trl = trl_subprocess(args.size, args.iterations)
    t_trl, c_trl = float(np.median(trl["times"])), float(np.median(trl["cpu"]))
    print(
        f"TRL 1.12: {t_trl * 1e3:8.0f} ms/iteration (median of {len(trl['times'])}; "
        f"first {trl['first']:.1f} s; torch {trl['torch']}) = {floor / t_trl:.0%} of the floor; "
        f"{c_trl:.1f} CPU s"
    )
    print(
        f"ratio: rlhf_jax is {t_trl / t_ours:.2f}x TRL's speed ({c_trl / c_ours:.2f}x in CPU "
        "time, which hypervisor steal does not inflate)"
    )


if __name__ == "__main__":
    main()
