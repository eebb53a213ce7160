"""What the transfer studies share: run names, a run's script flags and its process, grouping runs by setting, the
choice made on validation, means and the cost of a step.

A run record holds ``size``, ``config``, ``lr``, ``rho`` (None for AdamW), ``seed``, ``val_final`` (the final
validation metric), ``passes_per_step`` and ``search_forwards_per_step``.

Example:
    >>> runs = [{"size": 50, "config": "sam", "lr": 1e-3, "rho": rho, "seed": 0, "val_final": v}
    ...         for rho, v in ((0.01, 0.6), (0.1, 0.5))]
    >>> choose(runs, 50, "sam"), run_name(50, "sam", 1e-3, 0.01, 0)
    ((0.001, 0.01), 'n50-sam-lr0.001-rho0.01-seed0')
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["run_name", "run_flags", "run_script", "mean", "mean_std", "groups", "choose", "relative_cost"]


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


def run_flags(
    setting: dict,
    configs: dict[str, list[str]],
    model: str,
    splits: dict[str, Path],
    fixed: list[str],
    output_dir: Path,
) -> list[str]:
    """The script's flags for one run: the model, the split files, the study's ``fixed`` flags, then the setting's
    (its configuration's flags, learning rate, rho when set, seed) and the output folder."""
    rho = [] if setting["rho"] is None else ["--rho", str(setting["rho"])]
    files = [value for split in ("train", "validation", "test") for value in (f"--{split}_file", str(splits[split]))]
    return [
        *("--model_name_or_path", str(model), *files, *fixed, *configs[setting["config"]]),
        *(
            "--learning_rate",
            str(setting["lr"]),
            *rho,
            "--seed",
            str(setting["seed"]),
            "--output_dir",
            str(output_dir),
        ),
    ]


def run_script(script: Path, flags: list[str], log_path: Path) -> float:
    """Run ``script`` with ``flags`` (one thread unless the caller set more), its output into ``log_path``; returns
    the wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.time()
    with open(log_path, "w") as log:
        subprocess.run(
            [sys.executable, str(script), *flags], check=True, stdout=log, stderr=subprocess.STDOUT, env=env
        )
    return time.time() - start
