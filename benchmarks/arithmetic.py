#!/usr/bin/env python
"""The XSAM engine's arithmetic alone: `XSAM.step` with stand-in passes, caches warm or swept between passes.

A stand-in pass writes a precomputed gradient into every parameter, so the step's time minus that of two
stand-in passes is what the engine adds to a SAM step (no search). Real passes leave the caches full of
activations; ``--between`` puts that back between the passes: ``nothing`` (the engine's tensors stay in the
caches), ``sweep`` (a pass over a 32 MB buffer) or ``forward`` (a forward pass of the model on a batch).

Usage:
    OMP_NUM_THREADS=1 python benchmarks/arithmetic.py --task vit --rounds 300

Produces: docs/benchmarks.md ("The step's arithmetic, trimmed").
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hf_xsam import XSAM
from toy_tasks import SIZES, TASKS, build_task

BETWEEN = ("nothing", "sweep", "forward")


def arithmetic_us(task_name: str, size: str, between: str, rounds: int, seed: int) -> float:
    """Median over rounds of (one engine step - two stand-in passes), in microseconds."""
    task = build_task(task_name, size, seed)
    model, batch = task.model, task.batch(32)
    params = [p for p in model.parameters() if p.requires_grad]
    gradients = [[torch.randn_like(p) for p in params] for _ in range(2)]
    sweep = torch.zeros(8 * 2**20)
    passes = 0

    def stand_in_pass() -> torch.Tensor:
        nonlocal passes
        if between == "sweep":
            sweep.add_(1.0)
        elif between == "forward":
            with torch.no_grad():
                model(**batch)
        for p, g in zip(params, gradients[passes % 2]):
            p.grad = g.clone()
        passes += 1
        return torch.zeros(())

    def two_passes() -> None:
        stand_in_pass()
        stand_in_pass()

    engine = XSAM(params, sam_method="sam", rho=0.05)
    steps, baselines = [], []
    for _ in range(rounds + 10):  # the first 10 warm up
        for measured, run in ((steps, lambda: engine.step(stand_in_pass)), (baselines, two_passes)):
            model.zero_grad()
            start = time.perf_counter()
            run()
            measured.append(time.perf_counter() - start)
    return 1e6 * (statistics.median(steps[10:]) - statistics.median(baselines[10:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=TASKS, default="vit")
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"| {args.task} ({args.size}): between the passes | engine arithmetic per SAM step, us |")
    print("| --- | ---: |")
    for between in BETWEEN:
        print(f"| {between} | {arithmetic_us(args.task, args.size, between, args.rounds, args.seed):.0f} |")


if __name__ == "__main__":
    main()
