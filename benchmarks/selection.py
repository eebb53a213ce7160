"""What the study tools share: running a script, means, grouping runs by setting, the cost of a step read from a
run's logs, and the transfer studies' run names, their choice made on validation and their records under today's
configuration names.

A transfer run record holds ``size``, ``config``, ``lr``, ``rho`` (None for AdamW), ``seed``, ``val_final`` (the
final validation metric), ``passes_per_step`` and ``search_forwards_per_step``, and since benchmarks/configs.py
``flags`` (its configuration's).

Example:
    >>> runs = [{"size": 50, "config": "sam", "lr": 1e-3, "rho": rho, "seed": 0, "val_final": v}
    ...         for rho, v in ((0.01, 0.6), (0.1, 0.5))]
    >>> choose(runs, 50, "sam"), run_name(50, "sam", 1e-3, 0.01, 0)
    ((0.001, 0.01), 'n50-sam-lr0.001-rho0.01-seed0')
    >>> step_cost(passes=2.0, search_forwards=1.5)
    2.5
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from configs import TRANSFER_RENAMED

__all__ = [
    "PASS_COST",
    "SEARCH_FORWARD_COST",
    "run_script",
    "mean",
    "mean_std",
    "group_by",
    "step_cost",
    "logged_cost",
    "run_name",
    "run_flags",
    "run_folder",
    "current_names",
    "groups",
    "choose",
    "chosen",
    "baseline",
    "lr_settings",
    "rho_settings",
    "relative_cost",
    "versus_adamw",
    "cost_versus_adamw",
]

# cost units of one optimizer step: a forward-backward pass counts 3 (a forward and a backward of twice its cost),
# a forward pass of the alpha search 1
PASS_COST, SEARCH_FORWARD_COST = 3.0, 1.0


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


def mean(values: list[float]) -> float:
    """The exact mean (``statistics.mean``, not ``fmean``): a recorded table's last digit comes out the same."""
    return statistics.mean(values)


def mean_std(values: list[float], digits: int = 3) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean(values):.{digits}f} ± {std:.{digits}f}"


def group_by(runs: list[dict], key: Callable[[dict], tuple], order: Callable[[dict], object]) -> dict[tuple, list]:
    """Runs by ``key``, the groups and the runs in each in the order of ``order``."""
    grouped: dict[tuple, list[dict]] = {}
    for run in sorted(runs, key=order):
        grouped.setdefault(key(run), []).append(run)
    return grouped


def step_cost(passes: float, search_forwards: float) -> float:
    """Cost of an optimizer step with these forward-backward passes and search forwards, as a multiple of the base
    optimizer's step (one pass)."""
    return (PASS_COST * passes + SEARCH_FORWARD_COST * search_forwards) / PASS_COST


def logged_cost(train_logs: list[dict]) -> tuple[float, float] | None:
    """Forward-backward passes and search forwards per optimizer step over a run, from its training logs
    (``xsam/passes`` and ``xsam/search_forwards``, each log weighted by the steps it covers); None for a run that
    logged none."""
    steps, passes, forwards, previous = 0, 0.0, 0.0, 0
    for log in train_logs:
        if "xsam/passes" in log:
            covered = log["step"] - previous
            steps += covered
            passes += covered * log["xsam/passes"]
            forwards += covered * log.get("xsam/search_forwards", 0.0)
        previous = log["step"]
    return (passes / steps, forwards / steps) if steps else None


def run_name(size: int, config: str, lr: float, rho: float | None, seed: int) -> str:
    rho_part = "" if rho is None else f"-rho{rho:g}"
    return f"n{size}-{config}-lr{lr:g}{rho_part}-seed{seed}"


def run_flags(
    setting: dict,
    configs: dict[str, list[str]],
    model: str,
    splits: dict[str, Path],
    fixed: list[str],
    output_dir: Path,
) -> list[str]:
    """The script's flags for one transfer run: the model, the split files, the study's ``fixed`` flags, then the
    setting's (its configuration's flags, learning rate, rho when set, seed) and the output folder."""
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


def current_names(record: dict) -> dict:
    """A transfer run's record with its configuration under today's name: a record without ``flags`` was written
    before benchmarks/configs.py, under the names ``TRANSFER_RENAMED`` maps."""
    if "flags" in record:
        return record
    return {**record, "config": TRANSFER_RENAMED.get(record["config"], record["config"])}


def run_folder(output_dir: Path, setting: dict) -> Path:
    """The folder of a transfer run: its own, or the folder of the same run recorded under its configuration's old
    name. Refuses a folder that holds a run recorded under the same name with another meaning."""
    folder = output_dir / run_name(**setting)
    if (folder / "study_run.json").exists():
        recorded = current_names(json.loads((folder / "study_run.json").read_text()))["config"]
        if recorded != setting["config"]:
            raise ValueError(
                f"Invalid --output_dir {str(output_dir)!r}: {folder.name} holds a run recorded as "
                f"{setting['config']} before benchmarks/configs.py, which is {recorded} now; run "
                f"{setting['config']} in another --output_dir"
            )
        return folder
    for old, new in TRANSFER_RENAMED.items():
        record = output_dir / run_name(**{**setting, "config": old}) / "study_run.json"
        if new == setting["config"] and record.exists() and "flags" not in json.loads(record.read_text()):
            return record.parent
    return folder


def groups(runs: list[dict]) -> dict[tuple, list[dict]]:
    """Transfer runs by (size, configuration, learning rate, rho)."""
    return group_by(
        runs,
        key=lambda r: (r["size"], r["config"], r["lr"], r["rho"]),
        order=lambda r: (r["size"], r["config"], r["lr"], r["rho"] or 0, r["seed"]),
    )


def choose(runs: list[dict], size: int, config: str) -> tuple[float, float | None] | None:
    """The (lr, rho) of ``config`` at ``size`` with the highest mean final validation accuracy, or None."""
    candidates = {(lr, rho): group for (s, c, lr, rho), group in groups(runs).items() if s == size and c == config}
    if not candidates:
        return None
    return max(candidates, key=lambda key: mean([run["val_final"] for run in candidates[key]]))


def chosen(runs: list[dict], size: int, configs: list[str]) -> list[tuple[str, tuple[float, float | None], list]]:
    """(configuration, its chosen (lr, rho), the runs of that setting) at ``size``, in the order of ``configs``, for
    those that ran."""
    by_setting = groups(runs)
    keys = {config: choose(runs, size, config) for config in configs}
    return [(config, key, by_setting[(size, config, *key)]) for config, key in keys.items() if key is not None]


def baseline(runs: list[dict], size: int) -> dict[int, dict]:
    """AdamW's runs at ``size`` at its chosen learning rate, by seed (empty before AdamW ran)."""
    return {run["seed"]: run for _, _, group in chosen(runs, size, ["adamw"]) for run in group}


def relative_cost(run: dict) -> float:
    """A transfer run's cost per step, as a multiple of a base optimizer step's."""
    return step_cost(run["passes_per_step"], run["search_forwards_per_step"])


def versus_adamw(group: list[dict], adamw: dict[int, dict], key: str, digits: int) -> str:
    """The same-seed difference in ``key`` of a chosen setting's runs against AdamW's (``baseline``): its mean and
    on how many seeds it was ahead; empty for AdamW itself and without AdamW's runs."""
    diffs = [run[key] - adamw[run["seed"]][key] for run in group if run["seed"] in adamw]
    if not diffs or group[0]["config"] == "adamw":
        return ""
    return f"{mean(diffs):+.{digits}f} ({sum(d > 0 for d in diffs)} of {len(diffs)})"


def cost_versus_adamw(group: list[dict], adamw: dict[int, dict]) -> str:
    """A chosen setting's cost per step over AdamW's, as ``1.42x`` (``nanx`` without AdamW's runs)."""
    base = mean([relative_cost(run) for run in adamw.values()]) if adamw else None
    return f"{mean([relative_cost(run) for run in group]) / base if base else float('nan'):.2f}x"


def lr_settings(sizes: list[int], lrs: list[float], seeds: list[int]) -> list[dict]:
    """AdamW's runs of a transfer study, the first it makes: every learning rate, to choose one on validation."""
    return [
        {"size": size, "config": "adamw", "lr": lr, "rho": None, "seed": seed}
        for size in sizes
        for lr in lrs
        for seed in seeds
    ]


def rho_settings(runs: list[dict], sizes: list[int], configs: list[str], rhos: list[float], seeds: list[int]) -> list:
    """The sharpness-aware runs of a transfer study: every rho of every configuration at AdamW's chosen learning
    rate."""
    return [
        {"size": size, "config": config, "lr": choose(runs, size, "adamw")[0], "rho": rho, "seed": seed}
        for size in sizes
        for rho in rhos
        for config in configs
        for seed in seeds
    ]
