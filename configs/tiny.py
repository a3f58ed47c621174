"""tiny: every stage for a few steps on a tiny model and a small InstructLang world (tests, CI).

    rlhf-jax pipeline --config=tiny --workdir=runs/tiny

Cost: well under a minute on 2 CPU cores (mostly compilation). Numbers are meaningless.
"""

import dataclasses

from rlhf_jax import config as C
from rlhf_jax.instructlang.config import (
    InstructLangConfig,
    SplitSizes,
    StudyConfig,
    WorldConfig,
)


def get_config(arg: str | None = None) -> InstructLangConfig:
    del arg
    return InstructLangConfig(
        name="tiny",
        model=C.model_config("tiny", vocab_size=64, max_len=24),
        world=WorldConfig(
            pretrain_docs=2_000,
            heldout_docs=200,
            splits=SplitSizes(
                sft_train=256,
                sft_val=64,
                rm_train=128,
                rm_val=64,
                ppo_train=256,
                ppo_val=64,
                test=64,
            ),
        ),
        pretrain=C.PretrainConfig(
            steps=20, batch_size=32, optimizer=C.OptimizerConfig(lr=1e-3, warmup_steps=5)
        ),
        sft=C.SFTConfig(epochs=1, batch_size=32),
        rm=C.RMConfig(batch_size=16),
        ppo=dataclasses.replace(
            C.PPOConfig(),
            iterations=3,
            batch_size=32,
            minibatch_size=16,
            ptx_per_episode=2,
            ptx_coef=1.0,
        ),
        # For `rlhf-jax grpo --config=tiny` after the pipeline, or `--config.methods=grpo,rloo`.
        grpo=dataclasses.replace(
            C.GRPOConfig(), iterations=3, batch_size=8, group_size=4, minibatch_size=16
        ),
        eval=C.EvalConfig(
            test_prompts=64, samples_per_prompt=2, batch_size=32, samples_per_model=8
        ),
        # `rlhf-jax study --config=tiny`: every experiment at a size that only tests the plumbing.
        study=StudyConfig(
            c3_policy_size="tiny",
            c3_base_size="XS",
            c6_kl_coefs="2.0",
            c8_prompts=16,
            c9_comparisons="32,96",
            c9_best_of=4,
            c9_prompts=16,
            oracle_kl_coefs="0.1",
        ),
        log_every=1,
    )
