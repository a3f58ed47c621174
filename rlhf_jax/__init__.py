"""rlhf_jax: the InstructGPT recipe (SFT, K-wise reward model, PPO / PPO-ptx) in JAX."""

__version__ = "0.1.0"
