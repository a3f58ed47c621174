"""The stages: ``driver`` (the checks before a stage writes, the one loop), ``lineage`` (which
stage starts from which), ``lm`` (pretraining, SFT), ``rm`` and ``ppo`` (PPO, PPO-ptx), and beside
the recipe ``dpo`` (DPO, IPO, hinge) and ``grpo`` (GRPO, RLOO)."""
