"""rlhf_jax: the InstructGPT recipe (SFT, K-wise reward model, PPO / PPO-ptx) in JAX."""

import os

__version__ = "0.1.0"

# libtpu 0.0.42.1 (jax 0.10.2) fails to compile the SFT and pretraining steps on an fsdp mesh:
# its all-reduce-scatter fusion replaces the batch slice of the all-reduced logits [B, T, V] with
# a fusion of another shape ("RET_CHECK failure ... The shape doesn't match when replacing
# 'dynamic-slice'", found by `rlhf-jax plan --topology=v5e-4 --config.mesh.fsdp=-1`). The fusion
# is turned off before JAX starts libtpu (set here, at import, as JAX reads it at backend start).
TPU_FLAGS = ("--xla_tpu_enable_all_reduce_scatter_fusion=false",)
_flags = os.environ.get("LIBTPU_INIT_ARGS", "")
os.environ["LIBTPU_INIT_ARGS"] = " ".join(
    [_flags, *(f for f in TPU_FLAGS if f.split("=")[0] not in _flags)]
).strip()
