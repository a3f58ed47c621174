"""Preset configs: each file exposes ``get_config(arg) -> rlhf_jax.config.Config``.

Installed as ``rlhf_jax.configs``; on the command line ``--config=<name>[:arg]`` (``default``,
``tiny``, ``paper``, ``hf:<checkpoint dir>``) or ``--config=<file>.py[:arg]`` for a preset of
your own.
"""
