"""Typed configuration: model, mesh, optimiser, and one dataclass per pipeline stage.

Every config is a plain dataclass declared with ``unsafe_hash=True`` so it can be a static argument
of ``jax.jit``. They are built by the preset files in ``configs/`` (``get_config(arg)``), overridden
from the command line by ``ml_collections.config_flags`` (``--config.ppo.kl_coef=0.05``), and never
mutated after parsing. Batch sizes are global: each process of a multi-host run loads its share.
"""

import dataclasses

import jax.numpy as jnp

# Logical axis name -> mesh axis (or axes, or None = replicated). Parameters are annotated with the
# logical names in model.py; sharding.py resolves them through this table.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("position", None),
    ("norm", None),
    ("scalar", None),
)


@dataclasses.dataclass(unsafe_hash=True)
class ModelConfig:
    """A decoder-only transformer of the GPT-2 or the Llama family.

    ``family="gpt2"``: learned positions, LayerNorm, GELU MLP, biases everywhere.
    ``family="llama"``: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention; ``qkv_bias`` gives
    Qwen2. ``head="scalar"`` replaces the unembedding by a projection to one number per position
    (reward and value models).
    """

    family: str = "gpt2"  # "gpt2" | "llama"
    vocab_size: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int = 0  # 0: d_model // n_heads
    mlp_dim: int = 256
    max_len: int = 64
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    use_bias: bool = True  # biases on every dense layer and norm (GPT-2)
    qkv_bias: bool = False  # biases on q/k/v only (Qwen2); implied by use_bias
    dropout: float = 0.0
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    head: str = "lm"  # "lm" | "scalar"

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    def validate(self) -> "ModelConfig":
        problems = []
        if self.family not in ("gpt2", "llama"):
            problems.append(f"family={self.family!r}: expected 'gpt2' or 'llama'")
        if self.head not in ("lm", "scalar"):
            problems.append(f"head={self.head!r}: expected 'lm' or 'scalar'")
        if self.n_heads % self.n_kv_heads:
            problems.append(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if not self.head_dim and self.d_model % self.n_heads:
            problems.append(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.family == "llama" and self.dim_head % 2:
            problems.append(f"head dim {self.dim_head} must be even for RoPE")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))
        return self


# Named sizes. XS/S/M are the InstructLang sizes of INSTRUCTLANG.md section 3.
MODEL_SIZES: dict[str, dict] = {
    "tiny": dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, mlp_dim=64),
    "tiny-llama": dict(
        family="llama",
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        mlp_dim=64,
        use_bias=False,
        tie_embeddings=False,
        norm_eps=1e-6,
    ),
    "XS": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, mlp_dim=256),
    "S": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, mlp_dim=512),
    "M": dict(d_model=256, n_layers=6, n_heads=8, n_kv_heads=8, mlp_dim=1024),
    "gpt2-small": dict(
        vocab_size=50257,
        d_model=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=12,
        mlp_dim=3072,
        max_len=1024,
    ),
}


def model_config(size: str, **overrides) -> ModelConfig:
    """A named size (``MODEL_SIZES``) with overrides, e.g. ``model_config("S", vocab_size=64)``."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; known sizes: {sorted(MODEL_SIZES)}")
    return ModelConfig(**{**MODEL_SIZES[size], **overrides}).validate()


@dataclasses.dataclass(unsafe_hash=True)
class MeshConfig:
    """Device mesh ``('data', 'fsdp', 'tensor')``; one size may be -1, meaning "all the rest"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: tuple[tuple[str, str | tuple[str, ...] | None], ...] = DEFAULT_RULES

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)


@dataclasses.dataclass(unsafe_hash=True)
class OptimizerConfig:
    """Adam(W) with a warmup then cosine-to-``end_lr_ratio`` or constant schedule.

    Defaults follow InstructGPT appendix C: betas (0.9, 0.95); eps 1e-5 (LHP/N+, the paper is
    silent; optax places eps like PyTorch); cosine to 10% of the peak.
    """

    lr: float = 1e-4
    schedule: str = "cosine"  # "cosine" | "constant"
    warmup_steps: int = 0
    warmup_init_ratio: float = 0.0  # LR at step 0, as a fraction of the peak
    end_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-5
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # global-norm clip; 0 = off (InstructGPT does not state one)


def _opt(**kw):
    return dataclasses.field(default_factory=lambda: OptimizerConfig(**kw))


@dataclasses.dataclass(unsafe_hash=True)
class PretrainConfig:
    """Language-model pretraining of the base model (built-in world only)."""

    steps: int = 2000
    batch_size: int = 128
    optimizer: OptimizerConfig = _opt(lr=1e-3, warmup_steps=200)
    dropout: float = 0.0


@dataclasses.dataclass(unsafe_hash=True)
class SFTConfig:
    """Supervised fine-tuning on demonstrations: the PPO init and KL reference (P appendix C.3)."""

    epochs: int = 2
    batch_size: int = 32
    optimizer: OptimizerConfig = _opt(lr=3e-4)
    prompt_loss_weight: float = 0.0  # 0: response-only loss (METHOD.md 1.1); 1: N+ behaviour
    ptx_fraction: float = 0.1  # share of pretraining sequences mixed into each batch (P C.3)
    dropout: float = 0.1


@dataclasses.dataclass(unsafe_hash=True)
class RMConfig:
    """Reward model on K-wise rankings, grouped per prompt (InstructGPT eq. 1, appendix C.2)."""

    epochs: int = 1
    batch_size: int = 64  # prompts, each with all of its C(K,2) comparisons
    optimizer: OptimizerConfig = _opt(lr=1e-4)


@dataclasses.dataclass(unsafe_hash=True)
class PPOConfig:
    """PPO with a per-token KL penalty; PPO-ptx when ``ptx_coef > 0`` (InstructGPT appendix C.4)."""

    iterations: int = 250
    batch_size: int = 512  # episodes per iteration
    minibatch_size: int = 64
    epochs: int = 1
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.02
    kl_target: float = 0.0  # > 0 switches on the Ziegler et al. adaptive controller
    kl_horizon: int = 10000
    temperature: float = 1.0
    max_new_tokens: int = 12
    ptx_coef: float = 0.0  # gamma of eq. 2; 27.8 in the paper
    ptx_per_episode: int = 8  # pretraining sequences per RL episode (P C.4)
    policy_optimizer: OptimizerConfig = _opt(
        lr=1e-5, schedule="constant", warmup_steps=10, warmup_init_ratio=0.1
    )
    value_optimizer: OptimizerConfig = _opt(lr=1e-4, schedule="constant")
    ema_decay: float = 0.992  # 0 disables the EMA of the policy weights
    # Iterations at the start that train only the value network (policy, its optimiser state and
    # EMA stay put), so the RM-initialised critic is calibrated at intermediate tokens before its
    # advantages move the policy. Not in InstructGPT; OpenRLHF's --freezing_actor_steps.
    freeze_policy_iterations: int = 0
    whiten_rewards: bool = False
    no_eos_penalty: bool = False  # replace the score of responses without EOS by no_eos_score
    no_eos_score: float = -1.0


@dataclasses.dataclass(unsafe_hash=True)
class DataConfig:
    """Where each stage's data comes from: the built-in InstructLang world, or user JSONL files."""

    source: str = "instructlang"  # "instructlang" | "jsonl"
    # JSONL source: a local HF tokenizer directory and one file per record kind.
    tokenizer: str = ""
    demonstrations: str = ""
    comparisons: str = ""
    prompts: str = ""
    pretraining: str = ""
    prompt_len: int = 12  # P: prompts are left-padded to this length
    response_len: int = 12  # R: demonstrations and generated responses
    text_len: int = 24  # pretraining sequences
    # Built-in world (INSTRUCTLANG.md section 2): seed and split sizes.
    world_seed: int = 0
    pretrain_docs: int = 200_000
    heldout_docs: int = 5_000
    sft_train: int = 4_000
    sft_val: int = 500
    rm_train: int = 6_000
    rm_val: int = 1_000
    ppo_train: int = 10_000
    ppo_val: int = 1_000
    test: int = 1_000
    rm_k_min: int = 4
    rm_k_max: int = 9
    labeler_tau: float = 0.25
    deterministic_labels: bool = False


@dataclasses.dataclass(unsafe_hash=True)
class EvalConfig:
    test_prompts: int = 1000  # evaluation prompts per model
    samples_per_prompt: int = 1  # T = 1 answers per prompt; a prompt's gold is their mean
    batch_size: int = 250
    samples_per_model: int = 200  # decoded samples written to samples.jsonl


@dataclasses.dataclass(unsafe_hash=True)
class Config:
    """Everything one run needs; ``configs/<preset>.py:get_config(arg)`` returns one."""

    name: str = "default"
    seed: int = 0
    model: ModelConfig = dataclasses.field(default_factory=lambda: model_config("S"))
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    rm: RMConfig = dataclasses.field(default_factory=RMConfig)
    ppo: PPOConfig = dataclasses.field(default_factory=PPOConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    init_from: str = ""  # a local HF checkpoint directory to start from instead of pretraining
    keep_checkpoints: int = 2
    checkpoint_every: int = 0  # steps (PPO: iterations) between checkpoints; 0 = end of stage only
    log_every: int = 10
