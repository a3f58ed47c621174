"""``rlhf-jax plan``: compile every stage for a TPU topology or a GPU, with none present, and say
what fits.

For every stage the config would run (``rlhf_jax.stage_table``: each stage's ``programs``), and
the evaluation's sampler, the very jitted function the stage runs is lowered on abstract, sharded
inputs (``jax.ShapeDtypeStruct``) and compiled ahead of time for the named topology, with no
chip present: libtpu (``pip install "rlhf_jax[tpu]"``) compiles for a TPU topology from any
machine (``jax.experimental.topologies.get_topology_desc``), as MaxText's ``train_compile.py``
does. Nothing is allocated, read or trained.

Each row gives, per chip (per JAX device: a core of v2/v3, a chip from v4 on), what the compiler
says the program holds: arguments (weights, optimiser state, batch), outputs not aliased to
donated arguments, and temporaries, against the chip's HBM; whether it fits and by how much; and
a roofline lower bound of the step's time: the larger of its FLOPs over the chip's matmul peak
at the compute dtype and the weight bytes it must read over the HBM bandwidth (``CHIPS`` and
``GPUS``, with the published source of each figure). NVIDIA GPUs (``t4``, ``a100``, ``h100``,
``h100-8``) compile the same way through jax's CUDA plugin, which needs no GPU and no CUDA when
it is given the GPU's description (``Gpu.target_config``); Triton's GEMMs are swapped for cuBLAS
calls there, as their tiles cannot be tuned without the GPU.

The FLOPs and bytes are counted from the program's passes
(``stage_table.Pass``: 2 FLOPs per multiply-add of every matmul and attention product, times 3
for a backward pass; every weight read once per pass, per decode position and per optimiser
step, plus Adam's reads and writes), not from the compiler's cost analysis, which counts a loop's
body once (a PPO iteration's minibatch scan and its decode loop); the compiler's figure is kept
in ``--json`` as ``compiler_flops``. A compile the TPU compiler refuses for want of HBM becomes
a "does not fit" row with the compiler's figures.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
from jax.experimental.topologies import get_topology_desc

from rlhf_jax import lora, sharding, stage_table
from rlhf_jax.config import Config, ModelConfig, methods
from rlhf_jax.errors import ConfigError
from rlhf_jax.evaluate import sampler_programs
from rlhf_jax.fields import get_value
from rlhf_jax.stage_table import Pass, PlanInputs, Program

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One JAX device: HBM, peak matmul FLOP/s in bfloat16 and in float32 (a TPU multiplies
    float32 in bfloat16 passes at JAX's default precision; an A100 or H100 in TF32; a T4 has no
    bfloat16 tensor cores, so its bfloat16 figure is its float16 one) and HBM bandwidth, per
    device (v2 and v3 show each of a chip's two cores as a device: half the chip's figures)."""

    name: str
    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float  # bytes/s
    source: str
    peak_f32: float = 0.0  # 0: as peak_flops

    def peak(self, dtype: str) -> float:
        return self.peak_f32 if dtype == "float32" and self.peak_f32 else self.peak_flops


GB = 1e9
CHIPS = {
    "v2": Chip("TPU v2 core", 8 * GIB, 45e12 / 2, 600 * GB / 2, "https://cloud.google.com/tpu/docs/v2"),
    "v3": Chip("TPU v3 core", 16 * GIB, 123e12 / 2, 900 * GB / 2, "https://cloud.google.com/tpu/docs/v3"),
    "v4": Chip("TPU v4", 32 * GIB, 275e12, 1200 * GB, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", 16 * GIB, 197e12, 819 * GB, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", 95 * GIB, 459e12, 2765 * GB, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e", 32 * GIB, 918e12, 1640 * GB, "https://cloud.google.com/tpu/docs/v6e"),
}  # fmt: skip


class Topology(NamedTuple):
    """A slice as users name it (``v5e-8``) and how libtpu names it."""

    chip: str
    libtpu_name: str  # get_topology_desc's topology_name
    chips_per_host: tuple[int, int, int]
    chip_config: str = "default"  # "megacore": one device per v4 chip


TOPOLOGIES = {
    "v2-8": Topology("v2", "v2:2x2", (2, 2, 1)),
    "v3-8": Topology("v3", "v3:2x2", (2, 2, 1)),
    "v4-8": Topology("v4", "v4:2x2x1", (2, 2, 1), "megacore"),
    "v5e-1": Topology("v5e", "v5e:1x1", (1, 1, 1)),
    "v5e-4": Topology("v5e", "v5e:2x2", (2, 2, 1)),
    "v5e-8": Topology("v5e", "v5e:2x4", (2, 4, 1)),
    "v5e-16": Topology("v5e", "v5e:4x4", (2, 2, 1)),  # 4 hosts of 4 chips
    "v5e-32": Topology("v5e", "v5e:4x8", (2, 2, 1)),  # 8 hosts of 4 chips
    "v5p-8": Topology("v5p", "v5p:2x2x1", (2, 2, 1)),
    "v6e-1": Topology("v6e", "v6e:1x1", (1, 1, 1)),
    "v6e-4": Topology("v6e", "v6e:2x2", (2, 2, 1)),
    "v6e-8": Topology("v6e", "v6e:2x4", (2, 4, 1)),
}
INSTALL_TPU = 'pip install "rlhf_jax[tpu]"  (libtpu: compiles for a TPU topology on any machine)'
INSTALL_GPU = (
    "pip install jax-cuda12-plugin  (jax's CUDA plugin, 180 MB: compiles for a GPU on any "
    'machine, no CUDA needed; or "rlhf_jax[cuda]" on the GPU machine)'
)


@dataclasses.dataclass(frozen=True)
class Gpu:
    """What XLA needs to compile for an NVIDIA GPU it cannot see (a ``GpuTargetConfigProto``),
    from the vendor's figures, and the ``Chip`` the plan measures against."""

    chip: Chip
    compute_capability: tuple[int, int]
    sms: int
    l2_bytes: int
    clock_ghz: float
    shared_per_sm: int
    shared_per_block_optin: int
    threads_per_sm: int
    fpus_per_sm: int

    def target_config(self) -> str:
        major, minor = self.compute_capability
        c = self.chip
        return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {self.shared_per_sm}
  threads_per_core_limit: {self.threads_per_sm}
  core_count: {self.sms}
  fpus_per_core: {self.fpus_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(c.hbm_bandwidth)}
  l2_cache_size: {self.l2_bytes}
  clock_rate_ghz: {self.clock_ghz}
  device_memory_size: {c.hbm_bytes}
  shared_memory_per_block_optin: {self.shared_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 1 }}
device_description_str: "{c.name}"
"""


# Data sheets: the memory a device reports (nvidia-smi), its bandwidth, its dense matmul peak.
GPUS = {
    "t4": Gpu(Chip("Tesla T4", 15360 * 1024**2, 65e12, 320 * GB,
                   "https://www.nvidia.com/en-us/data-center/tesla-t4/", 8.1e12),
              (7, 5), 40, 4 * 1024**2, 1.59, 65536, 65536, 1024, 64),
    "a100": Gpu(Chip("A100 80GB", 79_050_250_240, 312e12, 2039 * GB,
                     "https://www.nvidia.com/en-us/data-center/a100/", 156e12),
                (8, 0), 108, 40 * 1024**2, 1.41, 167936, 166912, 2048, 64),
    "h100": Gpu(Chip("H100 80GB HBM3", 84_942_979_072, 989e12, 3352 * GB,
                     "https://www.nvidia.com/en-us/data-center/h100/", 495e12),
                (9, 0), 132, 50 * 1024**2, 1.98, 233472, 232448, 2048, 128),
}  # fmt: skip


def topology_names() -> str:
    return ", ".join([*TOPOLOGIES, *(f"{g}[-N]" for g in GPUS), "cpu:N"])


def gpu_devices(topology: str, gpu: Gpu, count: str) -> tuple[list, Chip]:
    """``count`` GPUs of one host, described to jax's CUDA plugin by a target config: no GPU
    and no CUDA driver needed."""
    if not count.isdigit() or int(count) < 1:
        raise ConfigError(f"--topology={topology}: expected <gpu>-<number of GPUs>, e.g. h100-8")
    try:
        desc = get_topology_desc(
            platform="cuda",
            topology_name=topology,
            target_config=gpu.target_config(),
            topology=f"1x1x{count}",
        )
    except NotImplementedError:
        raise ConfigError(
            f"--topology={topology}: compiling for a GPU needs {INSTALL_GPU}"
        ) from None
    return list(desc.devices), gpu.chip


def devices_of(topology: str) -> tuple[list, Chip | None]:
    """The devices of ``topology`` (abstract TPU devices, or this machine's CPU devices) and the
    chip's figures (None for CPU devices)."""
    name = topology.lower()
    if name.startswith("cpu:"):
        try:
            n = int(name[4:])
        except ValueError:
            raise ConfigError(f"--topology={topology}: expected cpu:<number of devices>") from None
        cpus = jax.devices("cpu")
        if n < 1 or n > len(cpus):
            raise ConfigError(
                f"--topology={topology}: this process has {len(cpus)} CPU devices; start it with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={max(n, 1)} (rlhf-jax plan "
                "sets it when it starts JAX)"
            )
        return cpus[:n], None
    gpu, _, count = name.partition("-")
    if gpu in GPUS:
        return gpu_devices(topology, GPUS[gpu], count or "1")
    if name not in TOPOLOGIES:
        raise ConfigError(f"--topology={topology}: expected one of {topology_names()}")
    top = TOPOLOGIES[name]
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(f"--topology={topology}: compiling for a TPU needs libtpu: {INSTALL_TPU}")
    # Deviceless compilation: libtpu must not look for a TPU VM's metadata server or hosts, nor
    # hold its one-process lock (a plan runs beside another, or beside the tests).
    for key, value in (
        ("TPU_SKIP_MDS_QUERY", "1"),
        ("TPU_WORKER_HOSTNAMES", "localhost"),
        ("TPU_ACCELERATOR_TYPE", "v5litepod-4"),
        ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
    ):
        os.environ.setdefault(key, value)
    try:
        desc = get_topology_desc(
            platform="tpu",
            topology_name=top.libtpu_name,
            chip_config_name=top.chip_config,
            chips_per_host_bounds=top.chips_per_host,
            num_slices=1,
        )
    except Exception as e:  # noqa: BLE001  (libtpu refusing: one line)
        raise ConfigError(f"--topology={topology}: libtpu could not describe it: {e}") from None
    return list(desc.devices), CHIPS[top.chip]


# --------------------------------------------------------------------------------------------------
# FLOPs and bytes of a program's passes


def matmul_params(model: ModelConfig) -> int:
    """Weights that multiply every token: the blocks' projections and the output head."""
    D, H, G, E, F = (
        model.d_model,
        model.n_heads,
        model.n_kv_heads,
        model.resolved_head_dim,
        model.mlp_dim,
    )
    per_layer = D * E * (2 * H + 2 * G) + (3 if model.family == "llama" else 2) * D * F
    head = model.vocab_size * D if model.head == "lm" else D
    return model.n_layers * per_layer + head


def param_bytes(model: ModelConfig) -> int:
    """The bytes of a model's weights (a LoRA model's frozen base in its ``base_dtype``)."""
    parts = lora.abstract_split(model)
    leaves = jax.tree.leaves(nn.meta.unbox(parts.trainable))
    if parts.frozen is not None:
        leaves += jax.tree.leaves(nn.meta.unbox(parts.frozen))
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves)


def pass_flops(p: Pass) -> float:
    """2 FLOPs per multiply-add of the matmuls and of attention's two products (every context
    position, as the dense causal attention computes them), times 3 with the backward pass
    (times 2 for a LoRA model: no gradient of the frozen weights; the adapters' own matmuls are
    a rank-r sliver, left out)."""
    m = p.model
    attention = 2 * m.n_layers * m.n_heads * m.resolved_head_dim * p.context
    forward = 2 * p.tokens * (matmul_params(m) + attention)
    if p.kind != "train":
        return float(forward)
    return float((2 if m.adapted else 3) * forward)


def pass_bytes(p: Pass, tensor: int) -> float:
    """The weight bytes one chip reads: every weight once per step of a forward or decode pass
    (FSDP gathers them whole; tensor parallelism splits them), three times per training step
    (forward, backward, gradient) plus Adam's reads and writes of the float32 moments; a LoRA
    model's frozen weights twice (forward, backward), its adapters' moments left out."""
    weights = param_bytes(p.model) / tensor
    if p.kind != "train":
        per_step = weights
    elif p.model.adapted:
        per_step = 2 * weights
    else:  # read and write params, mu, nu (float32)
        per_step = 3 * weights + 6 * 4 * matmul_params(p.model) / tensor
    return float(p.steps * per_step)


# --------------------------------------------------------------------------------------------------
# The plan


class Row(NamedTuple):
    """One compiled program on one chip (bytes per chip; seconds and FLOPs per call)."""

    stage: str
    program: str
    arguments: int
    outputs: int
    temporaries: int
    total: int
    hbm: float | None
    fits: bool
    flops: float
    weight_bytes: float
    roofline_s: float | None
    tokens: int
    tokens_per_s: float | None
    compiler_flops: float | None
    batch: str
    error: str = ""

    @property
    def headroom(self) -> float | None:
        return None if self.hbm is None else self.hbm - self.total


class Plan(NamedTuple):
    topology: str
    device: str
    devices: int
    hosts: int
    mesh: dict[str, int]
    dtype: str
    rows: list[Row]
    source: str

    @property
    def fits(self) -> bool:
        return all(r.fits for r in self.rows)


OOM = re.compile(
    r"required for HLO temporaries \(([\d.]+)([KMGT]?)\) "
    r"exceeds available HBM \(([\d.]+)([KMGT]?)\)"
)
_UNIT = {"": 1, "K": 1024, "M": 1024**2, "G": GIB, "T": 1024 * GIB}


def argument_bytes(args: Any) -> int:
    """Bytes per device of the abstract arguments (each leaf's shard), as counted by hand."""
    total = 0
    for x in jax.tree.leaves(args):
        if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None:
            shard = x.sharding.shard_shape(x.shape)
            total += math.prod(shard) * np.dtype(x.dtype).itemsize
    return total


def compile_row(
    stage: str,
    program: Program,
    chip: Chip | None,
    devices: int,
    tensor: int,
    dtype: str,
    inputs: PlanInputs,
) -> Row:
    """Compile ``program`` and read its per-chip memory and cost (matmuls at the peak of the
    compute ``dtype``); a refusal for want of HBM is a row that does not fit, with the
    compiler's figures."""
    flops = sum(pass_flops(p) for p in program.work) / devices
    weight_bytes = sum(pass_bytes(p, tensor) for p in program.work)
    roofline = None
    if chip is not None:
        roofline = max(flops / chip.peak(dtype), weight_bytes / chip.hbm_bandwidth)
    hbm = float(chip.hbm_bytes) if chip else None
    common = dict(
        stage=stage,
        program=program.name,
        hbm=hbm,
        flops=flops,
        weight_bytes=weight_bytes,
        roofline_s=roofline,
        tokens=program.tokens,
        tokens_per_s=program.tokens / roofline if roofline else None,
        batch=program.batch,
    )
    try:
        compiled = program.compiled or inputs.compile(program.fn.lower(*program.args))
    except Exception as e:  # noqa: BLE001  (the TPU compiler's out-of-memory refusal)
        found = OOM.search(str(e))
        if not found:
            raise
        need = float(found.group(1)) * _UNIT[found.group(2)]
        have = float(found.group(3)) * _UNIT[found.group(4)]
        args = argument_bytes(program.args)
        return Row(
            arguments=args, outputs=0, temporaries=int(need), total=args + int(need), fits=False,
            compiler_flops=None, error=f"the TPU compiler refuses it: {need / GIB:.2f} GiB of "
            f"temporaries beside {args / GIB:.2f} GiB of arguments, {have / GIB:.2f} GiB of HBM "
            "available", **{**common, "hbm": have},
        )  # fmt: skip
    mem = compiled.memory_analysis()
    args, out, alias, temp = (
        mem.argument_size_in_bytes,
        mem.output_size_in_bytes,
        mem.alias_size_in_bytes,
        mem.temp_size_in_bytes,
    )
    total = args + out - alias + temp + mem.generated_code_size_in_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return Row(
        arguments=args,
        outputs=out - alias,
        temporaries=temp,
        total=total,
        fits=hbm is None or total <= hbm,
        compiler_flops=(cost or {}).get("flops"),
        **common,
    )


def planned_stages(config: Config) -> list[stage_table.Stage]:
    """The stages the pipeline would train with this config (``pipeline.planned`` without a
    work directory: pretraining runs when the config has pretraining text or the built-in world)."""
    has_text = config.data.source != "files" or bool(config.data.pretraining)
    available = lambda use: has_text or use != "pretrain"  # noqa: E731
    stages = stage_table.to_train(config, methods(config), available)
    return [s for s in stages if s.programs is not None]


def plan_inputs(config: Config, completions: int | None) -> PlanInputs:
    """K ranked completions per comparison: ``completions``, else the world's most, else 2."""
    if completions is None:
        world = getattr(config, "world", None)
        completions = world.rm_k_max if world is not None else 2
    if completions < 2:
        raise ConfigError(f"--completions={completions}: a comparison ranks at least 2")
    return PlanInputs(completions=completions)


def make_plan(
    config: Config,
    topology: str,
    *,
    completions: int | None = None,
    stages: Sequence[str] | None = None,
    on_row=None,
) -> Plan:
    """Compile every planned stage (or ``stages``) and the evaluation sampler for ``topology``.
    ``on_row(row)`` is called as each row is done (compiles take minutes at real sizes)."""
    devices, chip = devices_of(topology)
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    inputs = plan_inputs(config, completions)
    if devices[0].platform in ("gpu", "cuda"):
        # No GPU to autotune Triton's GEMM tiles on: cuBLAS instead (it needs no tuning).
        inputs = inputs._replace(compiler_options=(("xla_gpu_enable_triton_gemm", False),))
    chosen = planned_stages(config)
    if stages:
        known = {s.name: s for s in stage_table.STAGES if s.programs is not None}
        unknown = [s for s in stages if s not in known and s != "eval"]
        if unknown:
            raise ConfigError(
                f"--stages={','.join(stages)}: no stage {unknown[0]!r}; stages: "
                f"{', '.join([*known, 'eval'])}"
            )
        chosen = [known[s] for s in stages if s in known]
    tensor, dtype = mesh.shape["tensor"], config.model.dtype
    rows = []
    for stage in chosen:
        for program in stage.plan(config, mesh, inputs):
            rows.append(compile_row(stage.name, program, chip, len(devices), tensor, dtype, inputs))
            if on_row:
                on_row(rows[-1])
    if not stages or "eval" in stages:
        for program in sampler_programs(config, mesh, inputs):
            rows.append(compile_row("eval", program, chip, len(devices), tensor, dtype, inputs))
            if on_row:
                on_row(rows[-1])
    return Plan(
        topology=topology,
        device=chip.name if chip else devices[0].device_kind,
        devices=len(devices),
        hosts=len({d.process_index for d in devices}),
        mesh=dict(mesh.shape),
        dtype=_dtypes(config),
        rows=rows,
        source=chip.source if chip else "",
    )


# --------------------------------------------------------------------------------------------------
# What it prints


def _gib(x: float | int | None) -> str:
    if x is None:
        return "-"
    return f"{x / GIB:.2f}" if abs(x) >= 0.1 * GIB else f"{x / GIB:.2g}"


def _time(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.3g} us"
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def header(plan: Plan) -> str:
    hosts = f" on {plan.hosts} hosts" if plan.hosts > 1 else ""
    mesh = " x ".join(f"{k} {v}" for k, v in plan.mesh.items())
    return (
        f"plan for {plan.topology}: {plan.devices} x {plan.device}{hosts}; mesh {mesh}; "
        f"{plan.dtype}"
    )


def table(plan: Plan) -> str:
    """One row per compiled program (GiB per chip)."""
    cols = ("stage", "program", "args", "temp", "out", "total", "HBM", "fits", "FLOPs",
            "roofline", "tokens/s")  # fmt: skip
    lines = [cols]
    for r in plan.rows:
        fits = "yes" if r.fits else "NO"
        if r.headroom is not None:
            fits += f" ({'+' if r.headroom >= 0 else '-'}{abs(r.headroom) / GIB:.2f})"
        lines.append((
            r.stage, r.program, _gib(r.arguments), _gib(r.temporaries), _gib(r.outputs),
            _gib(r.total), _gib(r.hbm), fits, f"{r.flops:.2e}", _time(r.roofline_s),
            "-" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f}",
        ))  # fmt: skip
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(cols))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    notes = [
        "GiB per chip: arguments (weights, optimiser state, batch), temporaries, outputs not "
        "aliased to donated arguments; fits: HBM left (+) or missing (-).",
        "FLOPs per call per chip; roofline: a lower bound per call, max(FLOPs / the chip's matmul "
        "peak at the compute dtype, weight bytes read / HBM bandwidth)"
        f"{'; chip figures: ' + plan.source if plan.source else ''}.",
    ]
    return "\n".join([header(plan), "", *out, "", *notes])


def _dtypes(config: Config) -> str:
    m = config.model
    out = f"{m.param_dtype} weights, {m.dtype} compute"
    if m.adapted:
        out += (f"; LoRA rank {m.lora.rank} ({m.lora.targets}) over {m.base_dtype} frozen "
                f"weights in {m.lora.stages}")  # fmt: skip
    return out


def _setting(config: Config, path: str):
    """The value of a dotted config field, or None where the config has no such field."""
    try:
        return get_value(config, path)
    except (ConfigError, AttributeError, KeyError):
        return None


def advice(plan: Plan, config: Config) -> list[str]:
    """One line per program that does not fit: the overflow and what would fit, in
    ``--config.*`` terms."""
    lines = []
    n = plan.devices
    mesh = plan.mesh
    for r in plan.rows:
        if r.fits:
            continue
        over = -(r.headroom or 0.0)
        what = r.error or (
            f"{_gib(r.total)} GiB per chip ({_gib(r.arguments)} arguments, "
            f"{_gib(r.temporaries)} temporaries) in {_gib(r.hbm)} GiB of HBM"
        )
        fixes = []
        sharded = mesh["fsdp"] * mesh["tensor"]
        if sharded < n:
            fixes.append("--config.mesh.data=1 --config.mesh.fsdp=-1 (shard weights and optimiser "
                         f"state over all {n} chips)")  # fmt: skip
        chips = math.ceil(r.arguments * sharded / (0.8 * r.hbm)) if r.hbm else 0
        trains = r.program.endswith(("step", "iteration"))
        if r.hbm and r.arguments > r.hbm and (chips > n or sharded == n):
            if trains and not config.model.lora.rank and r.stage != "pretrain":
                fixes.append("--config.model.lora.rank=16 --config.model.frozen_dtype=bfloat16 "
                             "(train low-rank adapters over a frozen bfloat16 base)")  # fmt: skip
            fixes.append(f"a topology of at least {chips} chips with --config.mesh.fsdp=-1 (the "
                         "weights and optimiser state alone overflow a chip)")  # fmt: skip
        elif r.hbm is None or r.arguments <= r.hbm:
            if not config.model.remat and trains:
                fixes.append("--config.model.remat=True (recompute activations in the backward "
                             "pass)")  # fmt: skip
            value = get_value(config, r.batch)
            accum_field = r.batch.split(".")[0] + ".grad_accum"
            accum = _setting(config, accum_field)
            if trains and isinstance(accum, int) and isinstance(value, int) and \
                    value % (2 * accum) == 0:  # fmt: skip
                fixes.append(f"--config.{accum_field}={2 * accum} (the same updates from "
                             "micro-batches half the size)")  # fmt: skip
            if isinstance(value, int) and value > 1:
                fixes.append(f"--config.{r.batch}={max(value // 2, 1)} (half the batch)")
        lines.append(
            f"{r.stage} ({r.program}) does not fit: {what}, {over / GIB:.2f} GiB over; try "
            + ", or ".join(fixes)
        )
    return lines


def to_json(plan: Plan) -> str:
    return json.dumps(
        {
            **{k: v for k, v in plan._asdict().items() if k != "rows"},
            "fits": plan.fits,
            "rows": [{**r._asdict(), "headroom": r.headroom} for r in plan.rows],
        },
        indent=2,
    )
