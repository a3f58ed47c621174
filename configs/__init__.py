"""Preset configs: each file exposes ``get_config(arg) -> rlhf_jax.config.Config``.

Installed as ``rlhf_jax.configs``; on the command line use ``--config=configs/<file>.py[:arg]``.
"""
