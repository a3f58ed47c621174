"""The README's "Will it fit?" table: `rlhf-jax plan` of SFT, RM and PPO for real model shapes
on Colab's TPU and TPU slices, one plan per process, as a markdown table.

    python bench/make_checkpoint.py gpt2 /tmp/ckpt/gpt2     # and the other shapes
    python bench/plan_table.py /tmp/ckpt > /tmp/fit.md

Each plan is `rlhf-jax plan --config=hf:<checkpoint> --topology=<t> --stages=sft,rm,ppo
--config.mesh.data=1 --config.mesh.fsdp=-1 --config.model.dtype=bfloat16 --json`: the `hf`
preset's sizes (192-token prompts, 64-token answers; SFT batches of 32, RM 16 pairs, PPO 64
episodes in minibatches of 16), weights and optimiser state sharded over every chip, bfloat16
matmuls as on a TPU (`accelerator.suit`). Cells: per-chip GiB (of the chip's HBM) and the
roofline time of one step (one PPO iteration); "no" where it does not fit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SHAPES = ("gpt2", "smollm2-360m", "qwen2.5-0.5b", "llama-3.2-1b")
TOPOLOGIES = ("v5e-1", "v2-8", "v5e-8", "v6e-8")
STAGES = ("sft", "rm", "ppo")
GIB = 1024**3


def plan(checkpoint: Path, topology: str, timeout: int) -> tuple[dict | None, float, str]:
    command = [
        "rlhf-jax", "plan", f"--config=hf:{checkpoint}", f"--topology={topology}",
        f"--stages={','.join(STAGES)}", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
        "--config.model.dtype=bfloat16", "--json",
    ]  # fmt: skip
    t0 = time.perf_counter()
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - t0, f"not compiled in {timeout} s"
    seconds = time.perf_counter() - t0
    try:
        return json.loads(out.stdout), seconds, ""
    except json.JSONDecodeError:
        return None, seconds, out.stderr.strip().splitlines()[-1][:200]


def cell(row: dict) -> str:
    gib = row["total"] / GIB
    if not row["fits"]:
        return f"no ({gib:.1f} GiB)"
    seconds = row["roofline_s"]
    t = f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"
    return f"{gib:.1f} GiB, {t}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", type=Path, help="directory with one checkpoint per shape")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per plan")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated")
    p.add_argument("--topologies", default=",".join(TOPOLOGIES), help="comma-separated")
    args = p.parse_args()
    lines = [
        "| model | topology | SFT step | RM step | PPO iteration | plan took |",
        "|---|---|---|---|---|---|",
    ]
    for shape in args.shapes.split(","):
        for topology in args.topologies.split(","):
            result, seconds, error = plan(args.checkpoints / shape, topology, args.timeout)
            if result is None:
                cells = [error] * len(STAGES)
            else:
                by_stage = {r["stage"]: r for r in result["rows"]}
                cells = [cell(by_stage[s]) for s in STAGES]
            lines.append(f"| {shape} | {topology} | {' | '.join(cells)} | {seconds:.0f} s |")
            print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
