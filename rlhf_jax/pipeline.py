"""``rlhf-jax pipeline``: the whole InstructGPT recipe on the built-in world, then the report.

pretrain the base -> SFT (the PPO init, 10% pretraining mix) -> sample and label comparisons ->
RM -> PPO and PPO-ptx from the same SFT model -> evaluate base, SFT, PPO, PPO-ptx -> report.
Every stage resumes its own checkpoint, so an interrupted pipeline continues where it stopped and
a finished one only re-evaluates. The plain PPO run uses ``ppo.ptx_coef = 0``; the PPO-ptx run
uses the configured ``ppo.ptx_coef`` (skipped when it is 0).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from rlhf_jax import evaluate, report, rollout, sharding
from rlhf_jax.config import Config
from rlhf_jax.data import builders, prepare
from rlhf_jax.data import instructlang as il
from rlhf_jax.data.records import Kind
from rlhf_jax.stages.common import initial_params, loader, stage_exists
from rlhf_jax.stages.lm import run_lm_stage
from rlhf_jax.stages.ppo import run_ppo
from rlhf_jax.stages.rm import load_reward_model, rm_config, run_rm

MODELS = {"base": "pretrain", "sft": "sft", "ppo": "ppo", "ppo_ptx": "ppo_ptx"}
CURVE_DOCS = 512  # held-out documents for the per-iteration pretraining-NLL curve


def _policy_model(config: Config):
    return dataclasses.replace(config.model, dropout=0.0)


def load_policy(config: Config, workdir, stage: str, mesh=None):
    """The exported policy params of ``stage`` (PPO stages export their EMA weights)."""
    mesh = mesh or sharding.make_mesh(config.mesh)
    return initial_params(config, workdir, stage, _policy_model(config), mesh)


def _read_all(config: Config, workdir, use: str, key: str) -> np.ndarray:
    data = loader(config, workdir, use, 256, 0, epochs=1, shuffle=False, drop_remainder=False)
    return np.concatenate([b[key] for b in data])


def _require_world(config: Config) -> None:
    if config.data.source != "instructlang":
        raise ValueError(
            "evaluation with gold rewards needs the built-in world "
            f"(data.source='instructlang'), not {config.data.source!r}"
        )


def ensure_comparisons(config: Config, workdir) -> None:
    """Built-in world: sample K completions per RM prompt and label them, once.

    Completions come 70% from the SFT policy and 30% from the base model (INSTRUCTLANG.md section
    4: most comparisons came from SFT policies, paper section 3.1), mixed per completion.
    """
    if config.data.source != "instructlang":
        return
    path = builders.dataset_path(Kind.COMPARISONS, prepare.WORLD, prepare.data_dir(workdir))
    if path.exists():
        return
    mesh = sharding.make_mesh(config.mesh)
    sft = load_policy(config, workdir, "sft", mesh)
    base = (
        load_policy(config, workdir, "pretrain", mesh) if stage_exists(workdir, "pretrain") else sft
    )
    model, R = _policy_model(config), config.data.response_len
    mix = np.random.default_rng([config.data.world_seed, 11])

    def sample_fn(prompts: np.ndarray, k: int) -> np.ndarray:
        rep = np.repeat(prompts, k, axis=0)
        kw = dict(
            rng=jax.random.key(config.seed + 5), batch_size=config.eval.batch_size, max_new_tokens=R
        )
        from_sft = evaluate.sample_responses(sft, model, rep, **kw)[0]
        from_base = evaluate.sample_responses(base, model, rep, **kw)[0]
        use_base = mix.random(len(rep)) < 0.3
        return np.where(use_base[:, None], from_base, from_sft).reshape(len(prompts), k, R)

    t0 = time.perf_counter()
    prepare.build_world_comparisons(config, workdir, sample_fn)
    print(f"[comparisons] sampled and labelled in {time.perf_counter() - t0:.1f}s")


def _curve_callback(config: Config, workdir, heldout: np.ndarray):
    """Per-log-step extras for PPO curves: gold of the iteration's samples, held-out NLL."""
    w, model = prepare.world(config), _policy_model(config)
    docs = heldout[:CURVE_DOCS]

    def on_log(step, state, samples):
        prompts, tokens, _ = (np.asarray(x) for x in samples)
        gold = il.gold_rewards(prompts, tokens, world=w)
        nll = evaluate.heldout_nll(
            state.policy.params, model, docs, batch_size=config.eval.batch_size
        )
        return {"eval/gold": float(gold.mean()), "eval/pretrain_nll": nll}

    return on_log


def run_pipeline(config: Config, workdir: str | os.PathLike) -> dict:
    """Every stage in order, then evaluation and ``report.md`` in ``workdir``."""
    _require_world(config)
    workdir = Path(workdir)
    seconds: dict[str, float] = {}

    def timed(name, fn, *args, **kw):
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        seconds[name] = time.perf_counter() - t0
        return out

    timed(
        "data",
        lambda: [
            prepare.source(config, workdir, u) for u in prepare.SPLITS if u not in ("rm", "rm_val")
        ],
    )
    if not config.init_from:
        timed("pretrain", run_lm_stage, config, workdir, "pretrain")
    timed("sft", run_lm_stage, config, workdir, "sft")
    timed("comparisons", ensure_comparisons, config, workdir)
    timed("rm", run_rm, config, workdir)
    heldout = _read_all(config, workdir, "heldout", "tokens")
    on_log = _curve_callback(config, workdir, heldout)
    plain = dataclasses.replace(config, ppo=dataclasses.replace(config.ppo, ptx_coef=0.0))
    timed("ppo", run_ppo, plain, workdir, "ppo", on_log=on_log)
    if config.ppo.ptx_coef > 0:
        timed("ppo_ptx", run_ppo, config, workdir, "ppo_ptx", on_log=on_log)

    summary, samples = timed("eval", evaluate_all, config, workdir, heldout)
    summary["seconds"] = seconds
    curves = {
        stage: _curves(workdir / stage)
        for stage in ("ppo", "ppo_ptx")
        if (workdir / stage / "metrics.jsonl").exists()
    }
    report.write_report(workdir, summary, curves, samples)
    print(f"[pipeline] report: {workdir / 'report.md'}")
    for claim in report.check_claims(summary):
        print(f"  {'PASS' if claim.passed else 'FAIL'} {claim.name}: {claim.evidence}")
    return summary


def _curves(stage_dir: Path) -> dict[str, list[float]]:
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    keys = {
        "gold": "eval/gold",
        "score": "objective/score",
        "kl": "objective/kl",
        "pretrain_nll": "eval/pretrain_nll",
        "clipfrac": "ppo/policy/clipfrac",
        "var_explained": "ppo/val/var_explained",
        "entropy": "objective/entropy",
    }
    return {name: [r[k] for r in rows if k in r] for name, k in keys.items()}


class _Evaluator:
    """What every evaluation shares: the world, the test prompts and held-out documents, one
    sampling stream for all models, and the SFT model every other model is compared with."""

    def __init__(self, config: Config, workdir, heldout: np.ndarray, mesh):
        self.config, self.workdir, self.mesh, self.heldout = config, workdir, mesh, heldout
        self.world, self.model = prepare.world(config), _policy_model(config)
        self.test = _read_all(config, workdir, "test", "prompt_tokens")[: config.eval.test_prompts]
        self.sft = load_policy(config, workdir, "sft", mesh)
        self.sft_eval = self._evaluate("sft", self.sft, reference=(self.sft, None))

    def _evaluate(self, name: str, params, reference) -> evaluate.ModelEval:
        return evaluate.evaluate_model(
            name,
            params,
            self.model,
            self.world,
            self.test,
            self.heldout,
            rng=jax.random.key(self.config.seed + 6),
            batch_size=self.config.eval.batch_size,
            max_new_tokens=self.config.data.response_len,
            reference=reference,
            samples_per_prompt=self.config.eval.samples_per_prompt,
        )

    def stage(self, name: str, stage: str) -> evaluate.ModelEval:
        if stage == "sft":
            return self.sft_eval
        params = load_policy(self.config, self.workdir, stage, self.mesh)
        return self._evaluate(name, params, reference=(self.sft, self.sft_eval.golds))


def evaluate_all(config: Config, workdir, heldout: np.ndarray) -> tuple[dict, list[dict]]:
    """Evaluate every model the run has, and the RM; returns (summary, samples)."""
    mesh = sharding.make_mesh(config.mesh)
    ev = _Evaluator(config, workdir, heldout, mesh)
    evals = {n: ev.stage(n, s) for n, s in MODELS.items() if stage_exists(workdir, s)}
    summary = {
        "config": config.name,
        "seed": config.seed,
        "models": {name: e.summary() for name, e in evals.items()},
        "rm": rm_summary(config, workdir, mesh),
    }
    samples = [s for e in evals.values() for s in e.samples(config.eval.samples_per_model)]
    return summary, samples


def rm_summary(config: Config, workdir, mesh) -> dict:
    """RM accuracy on the validation comparisons, against the noisy labels and gold order."""
    params, bias = load_reward_model(config, workdir, mesh)
    data = loader(config, workdir, "rm_val", 64, 0, epochs=1, shuffle=False, drop_remainder=False)
    batches = list(data)
    cat = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    P = config.data.prompt_len
    w = prepare.world(config)
    n, k, _ = cat["tokens"].shape
    golds = il.gold_rewards(
        np.repeat(cat["tokens"][:, :1, :P], k, 1).reshape(n * k, P),
        cat["tokens"][:, :, P:].reshape(n * k, -1),
        world=w,
    ).reshape(n, k)
    out = evaluate.rm_accuracy(
        params,
        rm_config(config),
        bias,
        cat["tokens"],
        cat["attention_mask"],
        cat["response_mask"],
        cat["ranks"],
        cat["valid"],
        golds,
        prompt_len=P,
        batch_size=config.eval.batch_size,
    )
    out["bias"] = float(bias)
    return out


def evaluate_stage(config: Config, workdir, stage: str) -> dict:
    """``rlhf-jax eval``: one stage's exported policy against the SFT model."""
    _require_world(config)
    heldout = _read_all(config, workdir, "heldout", "tokens")
    ev = _Evaluator(config, workdir, heldout, sharding.make_mesh(config.mesh))
    return ev.stage(stage, stage).summary()


def generate_text(
    config: Config,
    workdir,
    stage: str,
    prompt: str,
    *,
    max_new_tokens: int = 0,
    temperature: float = 1.0,
) -> str:
    """``rlhf-jax generate``: sample one response to a text prompt with a stage's policy."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        str(prepare.tokenizer_dir(config, workdir)), local_files_only=True
    )
    ids = tok.encode(prompt, add_special_tokens=False)
    params = load_policy(config, workdir, stage)
    tokens = np.asarray([ids], np.int32)
    out = rollout.sample(
        params,
        _policy_model(config),
        tokens,
        np.ones_like(tokens),
        jax.random.key(config.seed),
        temperature=temperature,
        max_new_tokens=max_new_tokens or config.data.response_len,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id or 0,
    )
    n = int(np.asarray(out.mask).sum())
    return tok.decode(np.asarray(out.tokens[0, :n]).tolist())


def run_seeds(config: Config, workdir: str | os.PathLike, seeds: list[int]) -> str:
    """``rlhf-jax seeds``: the pipeline once per seed into ``<workdir>/seed<k>/``, then
    ``<workdir>/seeds.md``, the mean ± sd table over seeds (also returned). The world is the same
    for every seed (``data.world_seed``); the seed changes every initialisation and sample. Runs
    that already finished are only re-read, so an interrupted sweep resumes."""
    workdir = Path(workdir)
    summaries = []
    for seed in seeds:
        run_dir = workdir / f"seed{seed}"
        summary_file = run_dir / "summary.json"
        if summary_file.exists():
            summaries.append(json.loads(summary_file.read_text()))
        else:
            summaries.append(run_pipeline(dataclasses.replace(config, seed=seed), run_dir))
    text = report.seeds_markdown(summaries)
    (workdir / "seeds.md").write_text(text)
    return text
