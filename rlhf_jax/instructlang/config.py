"""The built-in world's config: ``WorldConfig`` (its seed, corpus and split sizes, labelers) and
``InstructLangConfig``, a run ``Config`` on the world (``data.source = "instructlang"``).

The presets ``configs/default.py``, ``tiny.py`` and ``paper.py`` return an ``InstructLangConfig``;
on the command line the world's fields are ``--config.world.<field>``.
"""

from __future__ import annotations

import dataclasses

from rlhf_jax import config as C
from rlhf_jax.errors import ConfigError
from rlhf_jax.fields import field
from rlhf_jax.instructlang import lang

SOURCE = "instructlang"  # the data source name (``data.source``) the world registers


@dataclasses.dataclass(unsafe_hash=True)
class SplitSizes:
    """Prompts per split; the defaults are the paper-scale sizes (docs/instructlang.md section 2).

    Splits are disjoint by content sequence, the world's analogue of splitting by customer.
    """

    sft_train: int = field(4000, "SFT demonstrations", ge=1)
    sft_val: int = field(500, "SFT validation demonstrations", ge=1)
    rm_train: int = field(6000, "RM prompts (each with K ranked completions)", ge=1)
    rm_val: int = field(1000, "RM validation prompts", ge=1)
    ppo_train: int = field(10000, "PPO prompts", ge=1)
    ppo_val: int = field(1000, "PPO validation prompts", ge=1)
    test: int = field(1000, "held-out test prompts of the evaluation", ge=1)


@dataclasses.dataclass(unsafe_hash=True)
class WorldConfig:
    """The InstructLang world and the data drawn from it (docs/instructlang.md section 2)."""

    seed: int = field(0, "the world (knowledge base, text model) and its data; not the run seed")
    pretrain_docs: int = field(200_000, "pretraining documents", ge=1)
    heldout_docs: int = field(5_000, "held-out documents (pretraining NLL)", ge=1)
    splits: SplitSizes = field(SplitSizes(), "prompts per split")
    rm_k_min: int = field(4, "fewest completions ranked per RM prompt", ge=2)
    rm_k_max: int = field(9, "most completions ranked per RM prompt", ge=2)
    base_share: float = field(
        0.3, "share of RM completions sampled from the base model, not SFT", ge=0, le=1
    )
    labeler_tau: float = field(0.25, "labeler noise: P(i > j) = sigmoid((g_i - g_j) / tau)", gt=0)
    deterministic_labels: bool = field(False, "rank by gold exactly (Gao et al.), no noise")

    def problems(self) -> list[tuple[str, str]]:
        if self.rm_k_max < self.rm_k_min:
            return [("rm_k_max", f"below rm_k_min={self.rm_k_min}")]
        return []


@dataclasses.dataclass(unsafe_hash=True)
class StudyConfig:
    """``rlhf-jax study``: the experiments beyond the main job (docs/instructlang.md section 5).

    Lists are comma-separated strings, as on the command line."""

    experiments: str = field(
        "all",
        "which to run: all, or comma-separated names (c3 ... oracle: rlhf_jax.instructlang."
        "experiments, docs/instructlang.md section 5)",
    )
    c3_policy_size: str = field("XS", "C3: the small model trained with PPO-ptx")
    c3_base_size: str = field(
        "", "C3: the larger base model's size ('': the main run's own base, model.*)"
    )
    c6_kl_coefs: str = field("2.0,8.0", "C6: larger PPO betas (plain PPO) than ppo.kl_coef")
    c8_epochs: int = field(0, "C8: SFT epochs to follow (0: sft.epochs, the main run's SFT)", ge=0)
    c8_prompts: int = field(500, "C8: test prompts answered after every SFT epoch", ge=1)
    c9_comparisons: str = field(
        "250,1000,4000", "C9: proxy RMs' rankings: N of rm_train's, each set inside the next"
    )
    c9_best_of: int = field(64, "C9: the largest best-of-n (n = 1, 2, 4, ... up to it)", ge=1)
    c9_prompts: int = field(250, "C9: test prompts of the best-of-n curves", ge=1)
    c9_lr: float = field(
        0.0, "C9: PPO's policy learning rate at beta = 0 (0: ppo.policy_optimizer.lr)", ge=0
    )
    oracle_kl_coefs: str = field(
        "0.1,0.02", "oracle: other PPO betas, each run on the gold and on the RM ('': none)"
    )

    def problems(self) -> list[tuple[str, str]]:
        out = []
        for f in ("c3_policy_size", "c3_base_size"):
            size = getattr(self, f)
            if size and size not in C.MODEL_SIZES:
                out.append((f, f"unknown size {size!r}; known: {', '.join(C.MODEL_SIZES)}"))
        for f, kind, least in (
            ("c6_kl_coefs", float, 1),
            ("c9_comparisons", int, 1),
            ("oracle_kl_coefs", float, 0),
        ):
            try:
                values = [kind(x) for x in names(getattr(self, f))]
            except ValueError:
                values = None
            if values is None or len(values) < least or min(values, default=1) <= 0:
                what = "positive numbers" if least else "positive numbers, or ''"
                out.append((f, f"expected comma-separated {what}, got {getattr(self, f)!r}"))
        return out


def names(text: str) -> list[str]:
    """The items of a comma-separated config string."""
    return [x.strip() for x in text.split(",") if x.strip()]


@dataclasses.dataclass(unsafe_hash=True)
class InstructLangConfig(C.Config):
    """A run on the built-in world: the library's ``Config`` plus ``world``."""

    data: C.DataConfig = field(
        C.DataConfig(
            source=SOURCE,
            prompt_len=lang.PROMPT_LEN,
            response_len=lang.RESPONSE_LEN,
            text_len=lang.DOC_LEN,
        ),
        "data",
    )
    world: WorldConfig = field(WorldConfig(), "the built-in world")
    study: StudyConfig = field(StudyConfig(), "rlhf-jax study")


def require_world(config: C.Config) -> InstructLangConfig:
    """``config`` if it runs on the built-in world, else a ``ConfigError`` saying why."""
    if not isinstance(config, InstructLangConfig) or config.data.source != SOURCE:
        raise ConfigError(
            "the gold evaluation and the world pipeline need the built-in world "
            f"(data.source='{SOURCE}' with a preset of configs/), not "
            f"data.source={config.data.source!r}"
        )
    return config
