"""The machine a run is on (from ``jax.devices()``) and the compute settings that suit it.

Notebooks and scripts call ``detect()`` to say what they run on and ``suit(config)`` to take the
compute dtype from it: bfloat16 matmuls with float32 parameters on TPUs and on GPUs with bfloat16
tensor cores (compute capability 8.0 and up: A100, L4, H100), float32 elsewhere. A CPU runs
float32 matmuls faster than bfloat16 ones in XLA, and Colab's free T4 (compute capability 7.5)
has no bfloat16 tensor cores, so both keep float32. The mesh needs nothing here: the presets'
``MeshConfig`` already spreads the batch over every local device. ``enable_compilation_cache``
keeps compiled programs on disk for the next run (the command turns it on).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import jax

GIB = 1024**3
CACHE_MAX_BYTES = 4 * GIB


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """The local devices of this process, as JAX sees them."""

    platform: str  # "cpu", "gpu" or "tpu"
    kind: str  # the device kind, e.g. "Tesla T4", "TPU v5 lite", "cpu"
    count: int  # local devices
    memory_gib: float | None  # per device, as the runtime reports it (None on CPU)
    bfloat16: bool  # whether bfloat16 matmuls are the fast path

    @property
    def compute_dtype(self) -> str:
        return "bfloat16" if self.bfloat16 else "float32"

    def __str__(self) -> str:
        memory = f", {self.memory_gib:.1f} GiB each" if self.memory_gib else ""
        return f"{self.count} x {self.kind} ({self.platform}{memory}; {self.compute_dtype} compute)"


def _bfloat16_is_fast(device) -> bool:  # a jax.Device, or anything with its attributes
    if device.platform == "tpu":
        return True
    if device.platform == "gpu":
        capability = getattr(device, "compute_capability", "0")  # "7.5" for a T4
        return float(capability) >= 8.0
    return False


def _memory_gib(device: jax.Device) -> float | None:
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise rather than return None
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return stats["bytes_limit"] / GIB


def detect() -> Accelerator:
    """What this process computes on: the platform, kind and count of its local devices."""
    devices = jax.local_devices()
    first = devices[0]
    return Accelerator(
        platform=first.platform,
        kind=first.device_kind,
        count=len(devices),
        memory_gib=_memory_gib(first),
        bfloat16=_bfloat16_is_fast(first),
    )


def suit(config, accelerator: Accelerator | None = None):
    """``config`` with the compute dtype of ``accelerator`` (default: ``detect()``); parameters
    and optimiser state stay float32 (``model.param_dtype``). Works on any config with a
    ``model`` field (``Config``, ``InstructLangConfig``)."""
    accelerator = accelerator or detect()
    model = dataclasses.replace(config.model, dtype=accelerator.compute_dtype)
    return dataclasses.replace(config, model=model.validate())


def peak_memory_gib() -> float:
    """The most memory this process has held so far: the first device's peak on a GPU or TPU
    (``peak_bytes_in_use``), else the process's peak resident host memory. Notebooks print it
    at the end, so each run says what it needed where it ran."""
    device = jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:
        stats = {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / GIB
    import resource  # POSIX; ru_maxrss is in KiB on Linux

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> Path | None:
    """Keep compiled XLA programs on disk, so that a rerun of the same command starts its first
    step without compiling (JAX's persistent compilation cache: a hit runs the program a miss
    compiled, so the numbers are the same bit for bit). Call it after any
    ``jax.distributed.initialize``: it looks at the local devices.

    The directory is ``directory``, else ``$RLHF_JAX_COMPILATION_CACHE`` (``off`` turns it off),
    else JAX's own ``$JAX_COMPILATION_CACHE_DIR``, else ``~/.cache/rlhf_jax/xla``. Programs that
    compile in under 0.2 s are not kept, and beyond 4 GiB the least recently used are deleted.
    Returns the directory in use, or None when off.

    It stays off on a CPU with several devices (``--xla_force_host_platform_device_count``, the
    test session's fake mesh): there jaxlib 0.10.2 aborts (SIGABRT) while reading back the output
    of a sharded program loaded from the cache, measured on the tiny pipeline's PPO iteration.
    One CPU device, GPUs and TPUs use it."""
    setting = os.environ.get("RLHF_JAX_COMPILATION_CACHE", "")
    if directory is None and setting.lower() in ("off", "0", "false", "no"):
        return None
    devices = jax.local_devices()
    if devices[0].platform == "cpu" and len(devices) > 1:
        # Debug, not info: the command's progress lines share stdout with JSON answers (eval).
        logging.getLogger(__name__).debug(
            "compilation cache off: %d CPU devices (jaxlib aborts on cached sharded CPU programs)",
            len(devices),
        )
        return None
    chosen = directory or setting or os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if not chosen:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        chosen = Path(base) / "rlhf_jax" / "xla"
    path = Path(chosen).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    # Least recently used programs go first beyond this, so the cache never fills a disk.
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    return path
