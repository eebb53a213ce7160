#!/usr/bin/env python
"""Speed and float32 precision of ways to compute the dot product of two lists of tensors (``global_dot``).

The lists are the trainable parameters of the benchmark's models (``toy_tasks``) filled with random values; the
options run interleaved, in a fresh random order every round, and the figure is the median over rounds.
Precision: the error of each float32 result against the float64 dot product of the same float32 values,
relative to ``||x|| ||y||`` (the scale that matters for the angle theta), for unrelated and for correlated pairs.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/dot_product.py --rounds 200

Produces: docs/search.md ("The dot product of the step").
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from toy_tasks import build_task


def mm_reshape(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    """The former ``global_dot``: one batched 1xN @ Nx1 matmul per pair, three reshapes per tensor."""
    products = torch._foreach_mm([x.reshape(1, -1) for x in xs], [y.reshape(-1, 1) for y in ys])
    return torch.cat([p.reshape(1) for p in products]).sum()


def dot_loop(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    """``torch.dot`` per pair on flat views, the per-tensor results summed."""
    return torch.stack([torch.dot(x.view(-1), y.view(-1)) for x, y in zip(xs, ys)]).sum()


def dot_flatten(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    """``torch.dot`` per pair on ``flatten()`` (which returns a 1-D tensor itself, no new view): the chosen one."""
    return torch.stack([torch.dot(x.flatten(), y.flatten()) for x, y in zip(xs, ys)]).sum()


def tensordot_loop(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    """``torch.tensordot`` over all dimensions per pair (no reshape in Python)."""
    return torch.stack([torch.tensordot(x, y, dims=x.dim()) for x, y in zip(xs, ys)]).sum()


def foreach_mul_sum(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    """``torch._foreach_mul`` (one parameter-sized temporary) then a (pairwise) sum per tensor."""
    return torch.stack([p.sum() for p in torch._foreach_mul(xs, ys)]).sum()


def dot_loop_float64_sum(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    """``torch.dot`` per pair, the per-tensor results summed in float64."""
    return torch.stack([torch.dot(x.view(-1), y.view(-1)) for x, y in zip(xs, ys)]).double().sum()


OPTIONS: dict[str, Callable[[list[Tensor], list[Tensor]], Tensor]] = {
    "foreach_mm + reshapes (before)": mm_reshape,
    "torch.dot loop on view(-1)": dot_loop,
    "torch.dot loop on flatten() (chosen)": dot_flatten,
    "torch.tensordot loop": tensordot_loop,
    "_foreach_mul + sum": foreach_mul_sum,
    "torch.dot loop, float64 sum": dot_loop_float64_sum,
}


def parameter_shapes(task: str, size: str) -> list[torch.Size]:
    return [p.shape for p in build_task(task, size, 0).model.parameters() if p.requires_grad]


def pairs(shapes: list[torch.Size], correlated: bool, seed: int) -> tuple[list[Tensor], list[Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    xs = [torch.randn(s, generator=generator) for s in shapes]
    ys = [torch.randn(s, generator=generator) for s in shapes]
    if correlated:  # like v0 and v1, tens of degrees apart, plus an offset so that values are not centred
        ys = [x + 0.5 * y + 0.1 for x, y in zip(xs, ys)]
    return xs, ys


def measure(shapes: list[torch.Size], rounds: int, seed: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {name: {} for name in OPTIONS}
    for correlated in (False, True):
        errors: dict[str, list[float]] = {name: [] for name in OPTIONS}
        for trial in range(5):
            xs, ys = pairs(shapes, correlated, seed + trial)
            exact = sum(float(torch.dot(x.double().view(-1), y.double().view(-1))) for x, y in zip(xs, ys))
            scale = float(torch.cat([x.reshape(-1) for x in xs]).double().norm()) * float(
                torch.cat([y.reshape(-1) for y in ys]).double().norm()
            )
            for name, fn in OPTIONS.items():
                errors[name].append(abs(float(fn(xs, ys)) - exact) / scale)
        for name in OPTIONS:
            results[name]["correlated" if correlated else "unrelated"] = max(errors[name])
    xs, ys = pairs(shapes, True, seed)
    times: dict[str, list[float]] = {name: [] for name in OPTIONS}
    order = list(OPTIONS)
    shuffler = random.Random(seed)
    for name in order:  # warm-up
        OPTIONS[name](xs, ys)
    for _ in range(rounds):
        shuffler.shuffle(order)
        for name in order:
            start = time.perf_counter()
            OPTIONS[name](xs, ys)
            times[name].append(time.perf_counter() - start)
    for name in OPTIONS:
        results[name]["us"] = statistics.median(times[name]) * 1e6
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for task, size in (("vit", "small"), ("vit", "large"), ("marian", "small")):
        shapes = parameter_shapes(task, size)
        numel = sum(s.numel() for s in shapes)
        results = measure(shapes, args.rounds, args.seed)
        print(f"\n### {task} ({size}): {len(shapes)} tensors, {numel} values, {args.rounds} rounds, 1 thread\n")
        print("| option | median us | rel. error, unrelated | rel. error, correlated |")
        print("| --- | ---: | ---: | ---: |")
        for name, r in results.items():
            print(f"| {name} | {r['us']:.1f} | {r['unrelated']:.1e} | {r['correlated']:.1e} |")


if __name__ == "__main__":
    main()
