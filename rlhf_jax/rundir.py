"""A run directory: where each stage, its checkpoints, settings and metrics, and the run's data and
report live, read without the training loop.

::

    <workdir>/
      data/                       the datasets (``rlhf_jax.data.sources``), the tokenizer
      <stage>/                    one per stage of ``rlhf_jax.stage_table``
        <step>/                   committed Orbax checkpoints (``rlhf_jax.checkpoint``)
        config.json               the resolved config it was started with, data fingerprints
        model.json                the architecture of what it hands on
        metrics.jsonl             one row per logged step (TensorBoard files beside it)
      export/policy, export/rm    Hugging Face directories (``rlhf_jax.export``)
      summary.json  samples.jsonl  report.md  (PNGs)   the evaluation and its report

``RunDir`` is a path (``os.PathLike``): every function that takes a work directory takes one.
Evaluation, export, the report, the pipelines and the built-in world read a run through it;
only the stages write checkpoints. ``barrier`` is where the processes of a multi-host run wait
for the one that writes a shared file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
from jax.experimental import multihost_utils

from rlhf_jax.config import ModelConfig
from rlhf_jax.stage_table import section_of

MODEL_FILE = "model.json"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"

# Besides its own config section (``Stage.section``), the settings that bind every stage's
# checkpoints: a stage refuses to continue under other values of these. The mesh, logging and
# checkpointing may change, and so may FREE_SETTINGS.
SHARED_SETTINGS = ("seed", "init_from", "model.", "data.prompt_len", "data.response_len",
                   "data.text_len")  # fmt: skip
FREE_SETTINGS = ("model.remat",)  # recomputation changes no number
LORA_SETTINGS = ("model.lora.", "model.frozen_dtype")
# ModelConfig fields of how a model is trained, not of what a stage hands on (model.json).
TRAINING_FIELDS = ("lora", "frozen_dtype")


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (nothing to wait for on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def flat_settings(config: dict) -> dict[str, Any]:
    """A nested config dict as ``{dotted.path: value}``."""
    flat: dict[str, Any] = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[prefix + k] = v

    walk(config, "")
    return flat


def stage_settings(config: dict, stage: str) -> dict[str, Any]:
    """The settings of a config dict (a saved ``config.json``, or ``dataclasses.asdict`` with
    ``data_fingerprints``) that bind a stage's checkpoints: its own section, the shared ones
    (``SHARED_SETTINGS``) and its data fingerprints."""
    flat = flat_settings({k: v for k, v in config.items() if k != "data_fingerprints"})
    lora = config.get("model", {}).get("lora", {})
    if stage not in {s.strip() for s in lora.get("stages", "").split(",")}:
        # The adapter settings bind only the stages that train adapters.
        flat = {k: v for k, v in flat.items() if not k.startswith(LORA_SETTINGS)}
    own = section_of(stage) + "."
    keep = {
        k: v
        for k, v in flat.items()
        if (k.startswith(own) or any(k == s or (s.endswith(".") and k.startswith(s))
                                     for s in SHARED_SETTINGS)) and k not in FREE_SETTINGS
    }  # fmt: skip
    keep.update({f"data[{u}]": fp for u, fp in config.get("data_fingerprints", {}).items()})
    return keep


class RunDir(os.PathLike):
    """The work directory of one run (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(os.fspath(path))

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __truediv__(self, other: str | os.PathLike) -> Path:
        return self.path / other

    def __repr__(self) -> str:
        return f"RunDir({os.fspath(self.path)!r})"

    def __str__(self) -> str:
        return os.fspath(self.path)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and self.path == other.path

    def __hash__(self) -> int:
        return hash(self.path)

    # ---------------------------------------------------------------------------------------------
    # Stages

    def stage(self, name: str) -> Path:
        return self.path / name

    def has(self, stage: str) -> bool:
        """Whether ``stage`` has run (or is running) here."""
        return self.stage(stage).is_dir()

    def committed_steps(self, stage: str) -> list[int]:
        """The committed checkpoint steps of a stage, ascending (without opening it)."""
        directory = self.stage(stage)
        if not directory.is_dir():
            return []
        return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())

    def finished(self, stage: str) -> bool:
        """Whether the stage's last committed step holds the params it hands on."""
        steps = self.committed_steps(stage)
        return bool(steps) and (self.stage(stage) / str(steps[-1]) / "params").exists()

    def saved_config(self, stage: str) -> dict | None:
        """The config (and data fingerprints) a stage was last started with, or None."""
        path = self.stage(stage) / CONFIG_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def settings(self, stage: str) -> dict[str, Any]:
        """The settings that bind the stage's checkpoints, as it saved them (``stage_settings``)."""
        saved = self.saved_config(stage)
        return {} if saved is None else stage_settings(saved, stage)

    def write_model(self, stage: str, model: ModelConfig) -> None:
        """Record the architecture a stage hands on (process 0)."""
        if jax.process_index() == 0:
            directory = self.stage(stage)
            directory.mkdir(parents=True, exist_ok=True)
            tmp = directory / (MODEL_FILE + ".tmp")
            # The architecture alone: what a stage hands on has no adapters (they are folded in).
            fields = dataclasses.asdict(model)
            fields = {k: v for k, v in fields.items() if k not in TRAINING_FIELDS}
            tmp.write_text(json.dumps(fields, indent=2, sort_keys=True))
            tmp.replace(directory / MODEL_FILE)

    def model(self, stage: str) -> ModelConfig | None:
        """The architecture a stage recorded (None for runs older than model.json)."""
        return stage_model(self.stage(stage))

    # ---------------------------------------------------------------------------------------------
    # Metrics, data, the evaluation

    def metrics_file(self, stage: str) -> Path:
        return self.stage(stage) / METRICS_FILE

    def metrics(self, stage: str) -> list[dict]:
        """The rows a stage logged (none if it never ran)."""
        path = self.metrics_file(stage)
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    @property
    def data(self) -> Path:
        """Where the run's datasets and tokenizer live."""
        return self.path / "data"

    @property
    def summary_file(self) -> Path:
        return self.path / SUMMARY_FILE

    def summary(self) -> dict | None:
        """The evaluation's ``summary.json``, or None when there is none (or it is unreadable)."""
        try:
            out = json.loads(self.summary_file.read_text())
        except (OSError, ValueError):
            return None
        return out if isinstance(out, dict) else None


def stage_model(stage_dir: str | os.PathLike) -> ModelConfig | None:
    """The architecture a stage directory (of this run or another) recorded, or None."""
    path = Path(stage_dir) / MODEL_FILE
    if not path.is_file():
        return None
    fields = json.loads(path.read_text())
    known = set(ModelConfig.__dataclass_fields__) - set(TRAINING_FIELDS)
    return ModelConfig(**{k: v for k, v in fields.items() if k in known})


def is_stage_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a stage directory (it recorded its architecture)."""
    return (Path(path) / MODEL_FILE).is_file()
