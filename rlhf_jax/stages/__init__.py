"""The stages: ``driver`` (which stage starts from which, data, the one loop), ``lm`` (pretraining,
SFT), ``rm`` and ``ppo`` (PPO, PPO-ptx)."""
