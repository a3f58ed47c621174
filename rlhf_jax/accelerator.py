"""The machine a run is on (from ``jax.devices()``) and the compute settings that suit it.

Notebooks and scripts call ``detect()`` to say what they run on and ``suit(config)`` to take the
compute dtype from it: bfloat16 matmuls with float32 parameters on TPUs and on GPUs with bfloat16
tensor cores (compute capability 8.0 and up: A100, L4, H100), float32 elsewhere. A CPU runs
float32 matmuls faster than bfloat16 ones in XLA, and Colab's free T4 (compute capability 7.5)
has no bfloat16 tensor cores, so both keep float32. The mesh needs nothing here: the presets'
``MeshConfig`` already spreads the batch over every local device.
"""

from __future__ import annotations

import dataclasses

import jax

GIB = 1024**3


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
