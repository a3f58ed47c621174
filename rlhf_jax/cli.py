"""The ``rlhf-jax`` command: one sub-command per stage, the whole pipeline, eval and generate.

    rlhf-jax pipeline                                   # default preset, built-in world
    rlhf-jax sft --config=configs/tiny.py --workdir=runs/tiny --config.sft.epochs=2
    rlhf-jax seeds --seeds=0,1,2                        # the pipeline per seed, mean ± sd
    rlhf-jax eval --workdir=runs/default --stage=ppo
    rlhf-jax generate --workdir=runs/default --stage=ppo --prompt="<bos> REV c3 c9 c1 <sep>"

``--config=<file>.py[:arg]`` picks a preset (default: the package's ``configs/default.py``) and
``--config.<field>=<value>`` overrides any field; unknown fields and bad values are rejected.
The work directory defaults to ``runs/<config name>`` (``seeds``: ``runs/<config name>-seeds``,
one ``seed<k>/`` run directory per seed and ``seeds.md`` beside them).
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

COMMANDS = ("pretrain", "sft", "rm", "ppo", "pipeline", "seeds", "eval", "generate")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Preset file, e.g. configs/default.py[:arg].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config name>).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "seeds: the seeds to run, comma-separated.")
_STAGE = flags.DEFINE_string("stage", "ppo", "eval/generate: whose exported policy to use.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "generate: prompt text (repeatable).")
_MAX_TOKENS = flags.DEFINE_integer("max_new_tokens", 0, "generate: tokens (0: data.response_len).")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "generate: sampling temperature.")


def default_config_path() -> str:
    return str(resources.files("rlhf_jax.configs") / "default.py")


def _run(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)  # Orbax and tfds log every file operation at INFO
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"expected one command out of {', '.join(COMMANDS)}; got {argv[1:]}")
    command, config = argv[1], _CONFIG.value
    workdir = Path(_WORKDIR.value or Path("runs") / config.name)

    if command in ("pretrain", "sft"):
        from rlhf_jax.stages.lm import run_lm_stage

        run_lm_stage(config, workdir, command)
    elif command == "rm":
        from rlhf_jax.pipeline import ensure_comparisons
        from rlhf_jax.stages.rm import run_rm

        ensure_comparisons(config, workdir)
        run_rm(config, workdir)
    elif command == "ppo":
        from rlhf_jax.stages.ppo import run_ppo

        run_ppo(config, workdir, "ppo_ptx" if config.ppo.ptx_coef > 0 else "ppo")
    elif command == "pipeline":
        from rlhf_jax.pipeline import run_pipeline

        run_pipeline(config, workdir)
    elif command == "seeds":
        from rlhf_jax.pipeline import run_seeds

        seeds_dir = Path(_WORKDIR.value or Path("runs") / f"{config.name}-seeds")
        print(run_seeds(config, seeds_dir, _seeds()))
    elif command == "eval":
        from rlhf_jax.pipeline import evaluate_stage

        print(json.dumps(evaluate_stage(config, workdir, _STAGE.value), indent=2))
    else:
        from rlhf_jax.pipeline import generate_text

        for prompt in _PROMPT.value or ["<bos> REV c3 c9 c1 <sep>"]:
            response = generate_text(
                config,
                workdir,
                _STAGE.value,
                prompt,
                max_new_tokens=_MAX_TOKENS.value,
                temperature=_TEMPERATURE.value,
            )
            print(f"{prompt} -> {response}")


def _seeds() -> list[int]:
    try:
        return [int(s) for s in _SEEDS.value]
    except ValueError:
        raise app.UsageError(
            f"--seeds: expected comma-separated integers, got {_SEEDS.value}"
        ) from None


def main() -> None:
    argv = list(sys.argv)
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv.insert(1, f"--config={default_config_path()}")
    app.run(_run, argv=argv)


if __name__ == "__main__":
    main()
