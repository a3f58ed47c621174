"""Orbax checkpoints per stage: full-state save/restore, params handed between stages, load order.

Each stage owns one Orbax ``CheckpointManager`` rooted at ``<workdir>/<stage>/`` (``pretrain``,
``sft``, ``rm``, ``ppo``, ...). A step directory ``<workdir>/<stage>/<step>/`` holds up to four
items:

- ``state``: the full training state pytree (params, optimiser state, step, rng, KL controller);
- ``data``: the data-iterator state as JSON (absent when the stage has none);
- ``meta``: JSON metrics and bookkeeping (``<step>/meta/metadata``, human-readable);
- ``params``: only on steps saved with ``export_params``: what the next stage loads.

``<workdir>/<stage>/config.json`` records the resolved run config.

Atomicity comes from Orbax: a step is written under ``<step>.orbax-checkpoint-tmp`` and renamed
on commit (on object stores a ``commit_success.txt`` marks it instead), and only committed steps
are listed, so a save killed half way is never resumed from.

PRNG keys: typed keys (``jax.random.key``) are saved as they are; Orbax stores their raw
``key_data`` (uint32) and restores a typed key when the abstract leaf has a key dtype (as
``jax.eval_shape`` gives). Raw uint32 keys round-trip as ordinary arrays.

Load order (docs/design.md): ``resume_or_start`` resumes this stage's latest full state, else calls
the stage's ``start()``, which loads the previous stage's ``exported_params`` or initialises.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


def _jsonable(x: Any) -> Any:
    """Nested dicts/lists/dataclasses with numpy/jax scalars and arrays -> plain JSON values."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _jsonable(dataclasses.asdict(x))
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        return np.asarray(x).tolist()  # 0-d gives a Python int/float/bool
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    return x


class _QuietReadOnly(logging.Filter):
    """Drops Orbax's two warnings about a read-only manager, which is what ``read_only`` asks for
    (every stage that loads another stage's params opens one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("read_only=True" in message or "Given directory is read only" in message)


logging.getLogger("absl").addFilter(_QuietReadOnly())


def _manager(directory: epath.Path, *, keep: int | None, read_only: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        create=not read_only,
        read_only=read_only,
        preservation_policy=None if keep is None else ocp.checkpoint_managers.LatestN(n=keep),
        # Synchronous: when save() returns the step is committed, so a kill right after is safe.
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(directory, options=options)


def _check_abstract(tree: Any) -> None:
    # Without an explicit sharding Orbax falls back to the saved one, which names the devices of
    # the saving mesh and fails (or silently mis-places) on any other mesh.
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not (
            isinstance(leaf, jax.ShapeDtypeStruct)
            and isinstance(leaf.sharding, jax.sharding.Sharding)
        ):
            raise ValueError(
                f"restore target leaf {jax.tree_util.keystr(path)} is {leaf!r}: every leaf must be "
                "a jax.ShapeDtypeStruct with a sharding (use abstract_with_shardings)"
            )


class Restored(NamedTuple):
    """One committed step: the full state, the data-iterator state and the metadata (None when
    the step has none)."""

    state: Any
    data_state: dict | None
    metadata: dict | None


class StageCheckpointer:
    """The checkpoints of one stage under ``<workdir>/<stage>/``; keeps the last ``keep`` steps."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        stage: str,
        *,
        keep: int = 2,
        config: Any = None,
        read_only: bool = False,
    ):
        """``config``: the resolved run config (dict or dataclass), written to ``config.json``.

        ``read_only``: a view of another stage's checkpoints that never creates, deletes or writes
        anything, so it is safe to open while that stage is still running.
        """
        # Orbax needs absolute paths; a relative workdir (the CLI default runs/<name>) is resolved.
        self.directory = epath.Path(os.path.abspath(workdir)) / stage
        if read_only and not self.directory.exists():
            raise FileNotFoundError(f"no checkpoint directory {self.directory}")
        self._mngr = _manager(self.directory, keep=None if read_only else keep, read_only=read_only)
        if config is not None and not read_only and jax.process_index() == 0:
            # Temp file + rename so a reader never sees half a config.
            tmp = self.directory / "config.json.tmp"
            tmp.write_text(json.dumps(_jsonable(config), indent=2, sort_keys=True))
            tmp.replace(self.directory / "config.json")  # a resumed run rewrites it

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """Committed steps, ascending."""
        return sorted(self._mngr.all_steps())

    def save(
        self,
        step: int | np.integer | jax.Array,
        state: Any,
        *,
        data_state: dict | None = None,
        metadata: dict | None = None,
        export_params: Any = None,
        adapters: Any = None,
    ) -> None:
        """Write step ``step`` and return once it is committed; drops steps beyond ``keep``.

        Steps must increase: Orbax refuses to overwrite a step, and an older step saved after a
        newer one would make "latest" ambiguous.
        """
        step, latest = int(step), self.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(
                f"cannot save step {step}: {self.directory} already has step {latest}; "
                "steps must increase"
            )
        items = {
            "state": ocp.args.StandardSave(state),
            "meta": ocp.args.JsonSave(_jsonable(metadata or {})),
        }
        if data_state is not None:
            items["data"] = ocp.args.JsonSave(_jsonable(data_state))
        if export_params is not None:
            items["params"] = ocp.args.StandardSave(export_params)
        if adapters is not None:  # a LoRA stage's adapters, beside the merged params
            items["adapters"] = ocp.args.StandardSave(adapters)
        # force=True: the caller decides when to save; Orbax's save policy would skip silently.
        self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
        self._mngr.wait_until_finished()

    def has_item(self, step: int, item: str) -> bool:
        # Optional items ("data", "params") must not be requested from a step that lacks them:
        # Orbax raises KeyError. Step directories are named by the bare step number (no prefix).
        return (self.directory / str(step) / item).exists()

    def restore(self, abstract_state: Any, step: int | None = None) -> Restored:
        """The state, data-iterator state and metadata of ``step`` (default: the latest).

        ``abstract_state`` leaves are ``jax.ShapeDtypeStruct``s with shardings; the state is
        restored straight into those shardings, whatever mesh it was saved from.
        """
        step = self._require_step(step)
        _check_abstract(abstract_state)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        for name in ("data", "meta"):
            if self.has_item(step, name):
                items[name] = ocp.args.JsonRestore()
        out = self._mngr.restore(step, args=ocp.args.Composite(**items))
        return Restored(out["state"], out.get("data"), out.get("meta"))

    def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
        """The exported ``params`` item of ``step`` (default: the latest step that has one)."""
        if step is None:
            steps = [s for s in self.all_steps() if self.has_item(s, "params")]
            if not steps:
                raise FileNotFoundError(
                    f"no exported params under {self.directory}: the stage has not finished "
                    f"(steps present: {self.all_steps() or 'none'})"
                )
            step = max(steps)
        _check_abstract(abstract_params)
        args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
        return self._mngr.restore(step, args=args)["params"]

    def restore_adapters(self) -> Any:
        """The ``adapters`` item a LoRA stage saved with its final step, as host arrays."""
        steps = [s for s in self.all_steps() if self.has_item(s, "adapters")]
        if not steps:
            raise FileNotFoundError(f"no adapters under {self.directory}")
        args = ocp.args.Composite(adapters=ocp.args.StandardRestore())
        return self._mngr.restore(max(steps), args=args)["adapters"]

    def read_metadata(self, step: int | None = None) -> dict:
        step = self._require_step(step)
        return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def _require_step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no committed checkpoint under {self.directory}")
        return step

    def close(self) -> None:
        self._mngr.close()

    def __enter__(self) -> StageCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def exported_params(workdir: str | os.PathLike, stage: str, abstract_params: Any) -> Any:
    """The ``params`` a stage handed on (its latest step that has them), in the given shardings."""
    with StageCheckpointer(workdir, stage, read_only=True) as reader:
        return reader.restore_params(abstract_params)


def read_metadata(workdir: str | os.PathLike, stage: str, step: int | None = None) -> dict:
    """The ``meta`` JSON of ``step`` (default: the latest) of a stage."""
    with StageCheckpointer(workdir, stage, read_only=True) as reader:
        return reader.read_metadata(step)


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct(shape, dtype, sharding=...)`` per leaf: a restore target on any mesh.

    ``tree`` may hold arrays or abstract values, boxed (``nn.Partitioned``, from ``jax.eval_shape``
    of an init) or not; ``shardings`` matches the unboxed tree (``sharding.tree_shardings``).
    """
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.meta.unbox(tree),
        shardings,
    )


class Resumed(NamedTuple):
    """Where a stage begins: its state, its data-iterator state (None on a fresh start), and
    whether it resumed a checkpoint."""

    state: Any
    data_state: dict | None
    resumed: bool


def resume_or_start(
    ckpt: StageCheckpointer, abstract_state: Any, *, start: Callable[[], Any]
) -> Resumed:
    """The load order of docs/design.md.

    Resumes this stage's latest committed checkpoint (full state and data-iterator state) if there
    is one; otherwise returns ``start()``, the stage's own fresh start (the previous stage's
    ``exported_params``, or initialisation), with no data state.
    """
    if ckpt.latest_step() is None:
        return Resumed(start(), None, False)
    restored = ckpt.restore(abstract_state)
    return Resumed(restored.state, restored.data_state, True)
