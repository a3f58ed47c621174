"""paper: the faithful small-scale replication of docs/instructlang.md section 4, one run.

    rlhf-jax pipeline --config=paper --config.seed=0

S-size models (128 wide, 4 layers) on the full-size world (200k pretraining documents, 4k/6k/10k
SFT/RM/PPO prompts), 300 PPO iterations of 256 episodes, PPO-ptx with 8 pretraining sequences
per episode and gamma 27.8. Cost: about 2-3 hours on 2 CPU cores, minutes on one GPU/TPU.
`rlhf-jax study --config=paper` runs the experiments of section 5 on top of three seeds (about
a day on 2 CPU cores). Other sweeps (policy LR, gamma) and seeds are separate runs, e.g.
``--config.ppo.policy_optimizer.lr=3e-5 --config.seed=1 --workdir=runs/paper-lr3e-5-s1``.
"""

from rlhf_jax import config as C
from rlhf_jax.instructlang.config import InstructLangConfig, StudyConfig, WorldConfig


def get_config(arg: str | None = None) -> InstructLangConfig:
    del arg
    return InstructLangConfig(
        name="paper",
        model=C.model_config("S", vocab_size=64, max_len=24),
        world=WorldConfig(),  # the section-2 sizes
        pretrain=C.PretrainConfig(
            steps=3_200, batch_size=128, optimizer=C.OptimizerConfig(lr=1e-3, warmup_steps=200)
        ),
        sft=C.SFTConfig(epochs=2, batch_size=32, dropout=0.1, optimizer=C.OptimizerConfig(lr=3e-4)),
        rm=C.RMConfig(epochs=1, batch_size=64, optimizer=C.OptimizerConfig(lr=1e-4)),
        ppo=C.PPOConfig(
            iterations=300,
            batch_size=256,
            minibatch_size=64,
            ptx_coef=27.8,
            ptx_per_episode=8,
            policy_optimizer=C.OptimizerConfig(
                lr=3e-5, schedule="constant", warmup_steps=10, warmup_init_ratio=0.1
            ),
            value_optimizer=C.OptimizerConfig(lr=1e-4, schedule="constant"),
        ),
        eval=C.EvalConfig(test_prompts=1_000, batch_size=250, samples_per_model=200),
        # `rlhf-jax study --config=paper`: docs/instructlang.md section 5 at full size: the XS
        # policy against the M base (C3), the beta sweep {0.02, 0.2, 2.0} (C6), 16 SFT epochs
        # (C8), proxy RMs up to every RM prompt and best-of-256 (C9), oracle and RM PPO at
        # beta 0.1 and 0.005 beside the paper's 0.02.
        study=StudyConfig(
            c3_policy_size="XS",
            c3_base_size="M",
            c6_kl_coefs="0.2,2.0",
            c8_epochs=16,
            c9_comparisons="250,1000,6000",
            c9_best_of=256,
            oracle_kl_coefs="0.1,0.005",
        ),
        checkpoint_every=50,
    )
