"""Typed configuration: model, mesh, optimiser, data, one dataclass per stage, and their checks.

Every config is a plain dataclass declared with ``unsafe_hash=True`` so it can be a static argument
of ``jax.jit``. They are built by the preset files in ``configs/`` (``get_config(arg)``), changed
from the command line with ``fields.apply_overrides`` (``--config.ppo.kl_coef=0.05``), checked with
``fields.validate`` and never mutated after that. Batch sizes are global: every process of a
multi-host run reads the global batch and keeps its share of the rows.

Each field is declared with ``fields.field(default, doc, **checks)``, its one-line meaning and
its checks (``rlhf_jax.fields``); checks that tie several fields together live in each class's
``problems`` method.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from rlhf_jax import stage_table
from rlhf_jax.errors import ConfigError
from rlhf_jax.fields import field, validate

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
DTYPES = ("float32", "bfloat16", "float16")
# data.too_long: what an imported record over a length budget does (rlhf_jax.data.files).
TOO_LONG = ("error", "drop")


# The Dense layers LoRA can adapt (model.py names them so): attention q, k, v, o; the MLP's fc
# (GPT-2), gate and up (Llama) and down.
LORA_TARGETS = ("q", "k", "v", "o", "fc", "gate", "up", "down")


@dataclasses.dataclass(unsafe_hash=True)
class LoraConfig:
    """Low-rank adapters (Hu et al. 2021) on the model's Dense layers: ``W x + (alpha / rank) B A
    x`` with A [in, rank] random and B [rank, out] zero, so an adapted model starts as its base.
    Only the adapters (and a scalar head, where there is one) are trained; the base is frozen and
    shared (PPO's reference is the policy's base with the adapters off)."""

    rank: int = field(0, "adapter rank r; 0: train every weight (no LoRA)", ge=0)
    alpha: float = field(32.0, "scale numerator: the update is (alpha / rank) B A x", gt=0)
    dropout: float = field(0.0, "dropout on an adapter's input while training", ge=0, lt=1)
    targets: str = field(
        "all", "comma-separated Dense layers to adapt, any of " + ", ".join(LORA_TARGETS)
        + "; all: every one the family has"
    )  # fmt: skip
    stages: str = field(
        ",".join(stage_table.names(adapts=True)),
        "comma-separated stages that train adapters (pretraining always trains every weight)",
    )

    def target_set(self) -> frozenset[str]:
        if self.targets.strip() == "all":
            return frozenset(LORA_TARGETS)
        return frozenset(t.strip() for t in self.targets.split(",") if t.strip())

    def stage_set(self) -> frozenset[str]:
        return frozenset(s.strip() for s in self.stages.split(",") if s.strip())

    def problems(self) -> list[tuple[str, str]]:
        out = []
        unknown = sorted(self.target_set() - set(LORA_TARGETS))
        if unknown or not self.target_set():
            out.append(("targets", f"unknown {', '.join(unknown) or 'none given'}; expected "
                        f"'all' or any of {', '.join(LORA_TARGETS)}"))  # fmt: skip
        adapting = stage_table.names(adapts=True)
        for stage in sorted(self.stage_set() - set(adapting)):
            why = "trains no adapters" if stage in stage_table.names() else "is no stage"
            out.append(("stages", f"{stage} {why}; expected any of {', '.join(adapting)}"))
        return out


NO_LORA = LoraConfig()


@dataclasses.dataclass(unsafe_hash=True)
class ModelConfig:
    """A decoder-only transformer of the GPT-2 or the Llama family.

    ``family="gpt2"``: learned positions, LayerNorm, GELU MLP, biases everywhere.
    ``family="llama"``: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention; ``qkv_bias`` gives
    Qwen2. ``head="scalar"`` replaces the unembedding by a projection to one number per position
    (reward and value models).
    """

    family: str = field("gpt2", "architecture family", choices=("gpt2", "llama"))
    vocab_size: int = field(64, "vocabulary size V (rows of the embedding)", ge=1)
    d_model: int = field(64, "model width D", ge=1)
    n_layers: int = field(2, "transformer blocks L", ge=0)
    n_heads: int = field(4, "query heads H", ge=1)
    n_kv_heads: int = field(4, "key/value heads G (< n_heads: grouped-query attention)", ge=1)
    head_dim: int = field(0, "width E of one head; 0: d_model // n_heads", ge=0)
    mlp_dim: int = field(256, "MLP hidden width F", ge=1)
    max_len: int = field(64, "longest sequence (the learned-position table of gpt2)", ge=1)
    norm_eps: float = field(1e-5, "epsilon of LayerNorm / RMSNorm", gt=0)
    rope_theta: float = field(10000.0, "RoPE base frequency (llama)", gt=0)
    tie_embeddings: bool = field(True, "share the embedding with the unembedding")
    use_bias: bool = field(True, "biases on every dense layer and norm (GPT-2)")
    qkv_bias: bool = field(False, "biases on q/k/v only (Qwen2); implied by use_bias")
    dropout: float = field(0.0, "residual dropout rate (stages set their own)", ge=0, lt=1)
    dtype: str = field("float32", "compute dtype", choices=DTYPES)
    param_dtype: str = field("float32", "parameter dtype", choices=DTYPES)
    head: str = field(
        "lm", "output head: next-token logits or one scalar", choices=("lm", "scalar")
    )
    remat: bool = field(False, "recompute each block in the backward pass (saves memory)")
    lora: LoraConfig = field(NO_LORA, "low-rank adapters (rank 0: off)")
    frozen_dtype: str = field(
        "", "LoRA: dtype of the frozen base weights ('': param_dtype)", choices=("", *DTYPES)
    )

    @property
    def resolved_head_dim(self) -> int:
        """``head_dim``, or ``d_model // n_heads`` when it is 0."""
        return self.head_dim or self.d_model // self.n_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def adapted(self) -> bool:
        """Whether this model trains low-rank adapters over a frozen base."""
        return self.lora.rank > 0

    @property
    def base_dtype(self) -> str:
        """The dtype the frozen base is held in (LoRA): ``frozen_dtype``, or ``param_dtype``."""
        return self.frozen_dtype or self.param_dtype

    def plain(self) -> ModelConfig:
        """This architecture without adapters: what a LoRA stage exports (adapters merged)."""
        return dataclasses.replace(self, lora=NO_LORA, frozen_dtype="")

    def for_stage(self, stage: str) -> ModelConfig:
        """The model ``stage`` trains: with the adapters when ``lora.stages`` names it."""
        return self if stage in self.lora.stage_set() else self.plain()

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.n_heads % self.n_kv_heads:
            out.append(("n_kv_heads", f"n_heads={self.n_heads} is not a multiple of it"))
        if not self.head_dim and self.d_model % self.n_heads:
            out.append(
                ("n_heads", f"d_model={self.d_model} is not divisible by it (or set head_dim)")
            )
        elif self.family == "llama" and self.resolved_head_dim % 2:
            out.append(("head_dim", f"head dim {self.resolved_head_dim} must be even for RoPE"))
        return out

    def validate(self) -> ModelConfig:
        """This config, checked (``validate``); raises ``ConfigError`` naming each bad field."""
        return validate(self, "model")


# Named sizes. XS/S/M are the InstructLang sizes of docs/instructlang.md section 3.
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
        raise ConfigError(f"unknown model size {size!r}; known sizes: {sorted(MODEL_SIZES)}")
    return ModelConfig(**{**MODEL_SIZES[size], **overrides}).validate()


@dataclasses.dataclass(unsafe_hash=True)
class MeshConfig:
    """Device mesh ``('data', 'fsdp', 'tensor')``; one size may be -1, meaning "all the rest"."""

    data: int = field(-1, "data-parallel axis size (-1: all remaining devices)", ge=-1)
    fsdp: int = field(1, "fully-sharded data-parallel axis size (-1: all remaining)", ge=-1)
    tensor: int = field(1, "tensor-parallel axis size (-1: all remaining)", ge=-1)
    rules: tuple[tuple[str, str | tuple[str, ...] | None], ...] = field(
        DEFAULT_RULES, "logical axis -> mesh axis table (see sharding.py)"
    )

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    def problems(self) -> list[tuple[str, str]]:
        out = [
            (a, "expected -1 or a size >= 1")
            for a in ("data", "fsdp", "tensor")
            if not getattr(self, a)
        ]
        if self.shape.count(-1) > 1:
            out.append(("data", f"at most one axis may be -1, got {self.shape}"))
        return out


@dataclasses.dataclass(unsafe_hash=True)
class OptimizerConfig:
    """Adam(W) with a warmup then cosine-to-``end_lr_ratio`` or constant schedule.

    Defaults follow InstructGPT appendix C: betas (0.9, 0.95); eps 1e-5 (LHP/N+, the paper is
    silent; optax places eps like PyTorch); cosine to 10% of the peak.
    """

    lr: float = field(1e-4, "peak learning rate", gt=0)
    schedule: str = field("cosine", "after warmup", choices=("cosine", "constant"))
    warmup_steps: int = field(0, "linear warmup steps", ge=0)
    warmup_init_ratio: float = field(0.0, "LR at step 0, as a fraction of the peak", ge=0, le=1)
    end_lr_ratio: float = field(0.1, "cosine: final LR as a fraction of the peak", ge=0, le=1)
    b1: float = field(0.9, "Adam beta1", ge=0, lt=1)
    b2: float = field(0.95, "Adam beta2", ge=0, lt=1)
    eps: float = field(1e-5, "Adam epsilon (PyTorch placement)", gt=0)
    weight_decay: float = field(0.0, "decoupled weight decay (AdamW)", ge=0)
    grad_clip: float = field(0.0, "global-norm gradient clip; 0: off (the paper states none)", ge=0)


def _accum_problem(batch: int, accum: int, batch_field: str) -> list[tuple[str, str]]:
    if batch % accum:
        return [("grad_accum", f"{batch_field}={batch} does not split into {accum} micro-batches")]
    return []


@dataclasses.dataclass(unsafe_hash=True)
class PretrainConfig:
    """Language-model pretraining of the base model on the pretraining text."""

    steps: int = field(2000, "optimiser steps", ge=1)
    batch_size: int = field(128, "documents per step (global)", ge=1)
    optimizer: OptimizerConfig = field(OptimizerConfig(lr=1e-3, warmup_steps=200), "optimiser")
    dropout: float = field(0.0, "residual dropout", ge=0, lt=1)


@dataclasses.dataclass(unsafe_hash=True)
class SFTConfig:
    """Supervised fine-tuning on demonstrations: the PPO init and KL reference (P appendix C.3)."""

    epochs: int = field(2, "passes over the demonstrations (the paper's PPO init: 2)", ge=1)
    batch_size: int = field(32, "sequences per step, pretraining share included (global)", ge=1)
    optimizer: OptimizerConfig = field(OptimizerConfig(lr=3e-4), "optimiser")
    prompt_loss_weight: float = field(
        0.0, "loss weight of prompt tokens (0: response only; 1: N+)", ge=0, le=1
    )
    ptx_fraction: float = field(
        0.1, "share of each batch drawn from the pretraining text (P C.3: 10%)", ge=0, lt=1
    )
    dropout: float = field(0.1, "residual dropout", ge=0, lt=1)
    grad_accum: int = field(
        1, "micro-batches per optimiser step: memory follows the micro-batch", ge=1
    )

    def problems(self) -> list[tuple[str, str]]:
        out = _accum_problem(self.batch_size, self.grad_accum, "batch_size")
        if self.batch_size - round(self.batch_size * self.ptx_fraction) < 1:
            out.append(("ptx_fraction", f"leaves no demonstration in a batch of {self.batch_size}"))
        return out


@dataclasses.dataclass(unsafe_hash=True)
class RMConfig:
    """Reward model on K-wise rankings, grouped per prompt (InstructGPT eq. 1, appendix C.2)."""

    epochs: int = field(1, "passes over the comparisons (the paper: 1; more overfits)", ge=1)
    init_from: str = field(
        "", "'' (this run's sft), an HF checkpoint or run stage directory, or a model size"
    )
    batch_size: int = field(64, "prompts per step, each with all its C(K,2) pairs (global)", ge=1)
    optimizer: OptimizerConfig = field(OptimizerConfig(lr=1e-4), "optimiser")
    grad_accum: int = field(
        1, "micro-batches per optimiser step: memory follows the micro-batch", ge=1
    )

    def problems(self) -> list[tuple[str, str]]:
        return _accum_problem(self.batch_size, self.grad_accum, "batch_size")


@dataclasses.dataclass(unsafe_hash=True)
class DPOConfig:
    """Direct preference optimisation of the SFT policy on the comparisons (Rafailov et al. 2023),
    every K-wise comparison expanded to its C(K,2) pairs; the SFT model is the reference."""

    epochs: int = field(1, "passes over the comparisons", ge=1)
    batch_size: int = field(16, "prompts per step, each with all its C(K,2) pairs (global)", ge=1)
    beta: float = field(0.1, "KL strength of the implicit reward (Rafailov et al.: 0.1)", gt=0)
    loss_type: str = field(
        "sigmoid", "sigmoid (DPO), ipo (Azar et al.) or hinge (SLiC)",
        choices=("sigmoid", "ipo", "hinge"),
    )  # fmt: skip
    label_smoothing: float = field(
        0.0, "sigmoid: assumed label-noise rate eps (conservative DPO); 0: off", ge=0, lt=0.5
    )
    average_logprobs: bool = field(
        False, "compare length-averaged log-probs (usual for ipo) instead of sums"
    )
    optimizer: OptimizerConfig = field(OptimizerConfig(lr=1e-5), "optimiser")
    grad_accum: int = field(
        1, "micro-batches per optimiser step: memory follows the micro-batch", ge=1
    )

    def problems(self) -> list[tuple[str, str]]:
        out = _accum_problem(self.batch_size, self.grad_accum, "batch_size")
        if self.label_smoothing and self.loss_type != "sigmoid":
            why = f"applies to loss_type='sigmoid', not {self.loss_type!r}"
            out.append(("label_smoothing", why))
        return out


@dataclasses.dataclass(unsafe_hash=True)
class GRPOConfig:
    """Group-relative policy optimisation (Shao et al. 2024) from the SFT model against the
    reward model, with the RLOO baseline (Ahmadian et al. 2024) as an option: no value network;
    K responses per prompt are each other's baseline; KL to the SFT model is a loss term."""

    iterations: int = field(80, "sample + update iterations", ge=1)
    batch_size: int = field(32, "prompts per iteration (global)", ge=1)
    group_size: int = field(8, "K: responses sampled per prompt", ge=2)
    minibatch_size: int = field(64, "responses per optimiser step", ge=1)
    epochs: int = field(1, "passes over each iteration's responses", ge=1)
    baseline: str = field(
        "group", "group (GRPO: the group mean) or rloo (the mean of the other K-1)",
        choices=("group", "rloo"),
    )  # fmt: skip
    scale_rewards: bool = field(True, "group: divide by the group's std (GRPO); False: Dr. GRPO")
    normalize: str = field(
        "sequence", "loss over tokens: sequence (GRPO), token (DAPO) or constant (Dr. GRPO)",
        choices=("sequence", "token", "constant"),
    )  # fmt: skip
    clip_eps: float = field(0.2, "policy ratio clip epsilon", gt=0)
    kl_coef: float = field(0.04, "beta of the KL loss term (Shao et al.: 0.04)", ge=0)
    kl_estimator: str = field(
        "k3", "KL estimator of the loss term (GRPO: k3)", choices=("k1", "k2", "k3")
    )
    temperature: float = field(1.0, "sampling temperature", gt=0)
    max_new_tokens: int = field(12, "response tokens sampled per response", ge=1)
    policy_optimizer: OptimizerConfig = field(
        OptimizerConfig(lr=1e-5, schedule="constant"), "policy optimiser"
    )
    grad_accum: int = field(
        1, "micro-batches per optimiser step: memory follows the micro-batch", ge=1
    )

    def problems(self) -> list[tuple[str, str]]:
        out = _accum_problem(self.minibatch_size, self.grad_accum, "minibatch_size")
        n = self.batch_size * self.group_size
        if n % self.minibatch_size:
            out.append(("minibatch_size", f"batch_size x group_size = {n} is not a multiple of it"))
        return out


@dataclasses.dataclass(unsafe_hash=True)
class PPOConfig:
    """PPO with a per-token KL penalty; PPO-ptx when ``ptx_coef > 0`` (InstructGPT appendix C.4)."""

    iterations: int = field(250, "rollout + update iterations", ge=1)
    batch_size: int = field(512, "episodes per iteration (global)", ge=1)
    minibatch_size: int = field(64, "episodes per optimiser step", ge=1)
    epochs: int = field(1, "passes over each iteration's episodes (the paper: 1)", ge=1)
    clip_eps: float = field(0.2, "policy ratio clip epsilon", gt=0)
    value_clip_eps: float = field(0.2, "value clip epsilon", gt=0)
    gamma: float = field(1.0, "GAE discount (the paper: 1)", ge=0, le=1)
    lam: float = field(0.95, "GAE lambda", ge=0, le=1)
    kl_coef: float = field(0.02, "beta: per-token KL penalty toward the SFT policy", ge=0)
    kl_target: float = field(0.0, "> 0: adaptive beta toward this KL (Ziegler et al.)", ge=0)
    kl_horizon: int = field(10000, "adaptive beta: horizon in episodes", ge=1)
    temperature: float = field(1.0, "sampling temperature of the rollouts", gt=0)
    max_new_tokens: int = field(12, "response tokens sampled per episode", ge=1)
    ptx_coef: float = field(0.0, "gamma of eq. 2: > 0 is PPO-ptx (the paper: 27.8)", ge=0)
    ptx_per_episode: int = field(8, "PPO-ptx: pretraining sequences per episode", ge=1)
    policy_optimizer: OptimizerConfig = field(
        OptimizerConfig(lr=1e-5, schedule="constant", warmup_steps=10, warmup_init_ratio=0.1),
        "policy optimiser",
    )
    value_optimizer: OptimizerConfig = field(
        OptimizerConfig(lr=1e-4, schedule="constant"), "value-network optimiser"
    )
    ema_decay: float = field(0.992, "policy-weight EMA per step; 0: off", ge=0, lt=1)
    # Iterations at the start that train only the value network (policy, its optimiser state and
    # EMA stay put), so the RM-initialised critic is calibrated at intermediate tokens before its
    # advantages move the policy. Not in InstructGPT; OpenRLHF's --freezing_actor_steps.
    freeze_policy_iterations: int = field(0, "iterations that train only the value network", ge=0)
    whiten_rewards: bool = field(False, "whiten per-token rewards without shifting (LHP)")
    no_eos_penalty: bool = field(False, "score responses without EOS as no_eos_score")
    no_eos_score: float = field(-1.0, "the score of a response without EOS, if penalised")
    reward_from: str = field(
        "", "'' (this run's rm), another run's rm stage directory, or an exported RM directory"
    )
    grad_accum: int = field(
        1, "micro-batches per optimiser step: memory follows the micro-batch", ge=1
    )

    def problems(self) -> list[tuple[str, str]]:
        out = _accum_problem(self.minibatch_size, self.grad_accum, "minibatch_size")
        if self.batch_size % self.minibatch_size:
            out.append(("minibatch_size", f"batch_size={self.batch_size} is not a multiple of it"))
        return out


@dataclasses.dataclass(unsafe_hash=True)
class DataConfig:
    """Where the stages' data comes from, and the fixed sequence lengths of every batch.

    ``source`` names a data source (``rlhf_jax.data.sources``): ``files`` imports the user's JSONL
    or Parquet files below (formats: ``rlhf_jax.data.formats``); ``instructlang`` is the built-in
    world (its settings are ``world.*``).
    """

    source: str = field("files", "data source: files (yours), or instructlang (the built-in world)")
    tokenizer: str = field("", "files: a local HF tokenizer directory (default: init_from)")
    demonstrations: str = field("", "files: SFT demonstrations (prompt/response or messages)")
    comparisons: str = field("", "files: RM comparisons (K-wise, pairwise or HH-RLHF)")
    prompts: str = field("", "files: PPO prompts (prompt or messages)")
    pretraining: str = field("", "files: pretraining text (pretrain, SFT mix, PPO-ptx, NLL)")
    demonstrations_val: str = field("", "files: held-out demonstrations (SFT validation loss)")
    comparisons_val: str = field("", "files: held-out comparisons (RM validation accuracy)")
    prompts_val: str = field("", "files: held-out prompts (evaluation)")
    pretraining_val: str = field("", "files: held-out text (pretraining NLL)")
    heldout_fraction: float = field(
        0.05, "files: share of a file held out when it has no *_val file", ge=0, lt=1
    )
    prompt_len: int = field(128, "P: prompts are left-padded to this many tokens", ge=1)
    response_len: int = field(128, "R: responses, EOS included", ge=1)
    text_len: int = field(256, "T: pretraining sequences (longer text is split into pieces)", ge=1)
    too_long: str = field(
        "error",
        "files: a prompt or response over prompt_len/response_len: error (naming it), or drop it",
        choices=TOO_LONG,
    )


@dataclasses.dataclass(unsafe_hash=True)
class EvalConfig:
    """Evaluation of the trained policies on held-out prompts."""

    test_prompts: int = field(1000, "held-out prompts per model", ge=1)
    samples_per_prompt: int = field(
        1, "T = 1 answers per prompt (a prompt's score is the mean)", ge=1
    )
    batch_size: int = field(250, "prompts per forward pass", ge=1)
    samples_per_model: int = field(200, "decoded samples written to samples.jsonl", ge=0)
    best_of_n: int = field(
        16, "n of the best_of_n method: SFT samples per answer, the RM keeps its best", ge=2
    )


@dataclasses.dataclass(unsafe_hash=True)
class Config:
    """Everything one run needs; ``configs/<preset>.py:get_config(arg)`` returns one."""

    name: str = field("default", "run name: the default work directory is runs/<name>")
    seed: int = field(0, "seed of every initialisation, shuffle and sample")
    model: ModelConfig = field(model_config("S"), "the policy's architecture")
    mesh: MeshConfig = field(MeshConfig(), "device mesh")
    data: DataConfig = field(DataConfig(), "data")
    pretrain: PretrainConfig = field(PretrainConfig(), "pretraining")
    sft: SFTConfig = field(SFTConfig(), "supervised fine-tuning")
    rm: RMConfig = field(RMConfig(), "reward model")
    ppo: PPOConfig = field(PPOConfig(), "PPO / PPO-ptx")
    dpo: DPOConfig = field(DPOConfig(), "DPO and its IPO and hinge variants")
    grpo: GRPOConfig = field(GRPOConfig(), "GRPO and RLOO")
    eval: EvalConfig = field(EvalConfig(), "evaluation")
    init_from: str = field(
        "", "a local HF checkpoint directory to start from instead of pretraining"
    )
    keep_checkpoints: int = field(2, "checkpoints kept per stage", ge=1)
    checkpoint_minutes: float = field(
        10.0, "minutes between checkpoints (also every checkpoint_every steps); 0: off", ge=0
    )
    checkpoint_every: int = field(
        0, "steps (PPO: iterations) between checkpoints; 0: at the end", ge=0
    )
    log_every: int = field(10, "steps between metric rows", ge=1)
    methods: str = field(
        "",
        "methods the pipeline runs after PPO and PPO-ptx and compares in its report, "
        "comma-separated: any of " + ", ".join(stage_table.methods()),
    )

    def problems(self) -> list[tuple[str, str]]:
        out = []
        known = stage_table.methods()
        unknown = [m for m in methods(self) if m not in known]
        if unknown:
            out.append(("methods", f"unknown {', '.join(unknown)}; expected any of {known}"))
        if self.model.family == "gpt2":  # learned positions: none past max_len
            d, n = self.data, self.model.max_len
            if d.prompt_len + d.response_len > n:
                out.append((
                    "data.response_len",
                    f"prompt_len + response_len = {d.prompt_len + d.response_len} is over "
                    f"model.max_len={n}, the positions the model has embeddings for",
                ))  # fmt: skip
            text = d.source != "files" or d.pretraining  # (text_len means nothing without it)
            if text and d.text_len > n:
                out.append(("data.text_len", f"over model.max_len={n}"))
        return out

    def validate(self) -> Config:
        """This config, checked (``validate``); raises ``ConfigError`` naming each bad field."""
        return validate(self)


def methods(config: Config) -> tuple[str, ...]:
    """``config.methods`` as a tuple of names (empty when unset)."""
    return tuple(m.strip() for m in config.methods.split(",") if m.strip())


def rm_config(config: Config) -> ModelConfig:
    """The reward/value architecture: the policy's, or the named size ``rm.init_from`` (with the
    policy's vocabulary and context), with a scalar head and no dropout. (An ``rm.init_from``
    directory brings its own architecture: ``stages.lineage.rm_architecture``.)"""
    scalar = dict(head="scalar", dropout=0.0)
    if config.rm.init_from in MODEL_SIZES:
        keep = dict(vocab_size=config.model.vocab_size, max_len=config.model.max_len)
        return model_config(config.rm.init_from, dtype=config.model.dtype, **keep, **scalar)
    return dataclasses.replace(config.model, **scalar)
