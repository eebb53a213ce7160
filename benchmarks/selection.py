"""What the transfer studies share: run names, grouping runs by setting, the choice made on validation, means
and the cost of a step.

A run record holds ``size``, ``config``, ``lr``, ``rho`` (None for AdamW), ``seed``, ``val_final`` (the final
validation metric), ``passes_per_step`` and ``search_forwards_per_step``.

Example:
    >>> runs = [{"size": 50, "config": "sam", "lr": 1e-3, "rho": rho, "seed": 0, "val_final": v}
    ...         for rho, v in ((0.01, 0.6), (0.1, 0.5))]
    >>> choose(runs, 50, "sam"), run_name(50, "sam", 1e-3, 0.01, 0)
    ((0.001, 0.01), 'n50-sam-lr0.001-rho0.01-seed0')
"""

from __future__ import annotations

import statistics

__all__ = ["run_name", "mean", "mean_std", "groups", "choose", "relative_cost"]


def run_name(size: int, config: str, lr: float, rho: float | None, seed: int) -> str:
    rho_part = "" if rho is None else f"-rho{rho:g}"
    return f"n{size}-{config}-lr{lr:g}{rho_part}-seed{seed}"


def mean(values: list[float]) -> float:
    return statistics.fmean(values)


def mean_std(values: list[float], digits: int = 3) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean(values):.{digits}f} ± {std:.{digits}f}"


def groups(runs: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for run in sorted(runs, key=lambda r: (r["size"], r["config"], r["lr"], r["rho"] or 0, r["seed"])):
        groups.setdefault((run["size"], run["config"], run["lr"], run["rho"]), []).append(run)
    return groups


def choose(runs: list[dict], size: int, config: str) -> tuple[float, float | None] | None:
    """The (lr, rho) of ``config`` at ``size`` with the highest mean final validation accuracy, or None."""
    candidates = {(lr, rho): group for (s, c, lr, rho), group in groups(runs).items() if s == size and c == config}
    if not candidates:
        return None
    return max(candidates, key=lambda key: mean([run["val_final"] for run in candidates[key]]))


def relative_cost(run: dict) -> float:
    # a forward-backward pass counts 3 (a forward and a backward of twice its cost), a search forward 1
    return (3 * run["passes_per_step"] + run["search_forwards_per_step"]) / 3
