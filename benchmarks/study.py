#!/usr/bin/env python
"""Generalization study: the base optimizer vs SAM vs XSAM (and named configurations), over seeds, rho and label noise.

Every run is one call of the task's script (``--task``: ``digits`` and ``cifar10`` run
``scripts/classify_images.py``, ``multi30k`` runs ``scripts/translate.py``; benchmarks/tasks.py says what each
runs and records) with the same flags but the configuration's, the seed's and the setting's. ``--methods`` names
configurations of benchmarks/configs.py (docs/study.md, "Configuration names", says what each means), and
``--config NAME="FLAGS"`` adds one of the study's own, run after the named ones. A configuration without
sharpness-aware steps (``--sam_method none``) does not depend on rho and runs at the first rho only.

Each finished run leaves ``study_run.json`` in its folder; finished runs are skipped, so an interrupted study
continues where it stopped, and runs shared by two studies in the same ``--output_dir`` are trained once. After each
run the summary is rewritten: ``NAME.json`` (all runs), ``NAME.md`` (mean ± std over seeds, differences on the same
seed, XSAM's alpha) and the task's figures (``NAME.png``, curves with a band per configuration; for the image tasks
also ``NAME-cost.png``, final accuracy against cost per step). ``--report_only`` rebuilds them from the recorded
runs without training. docs/study.md quotes these tables.

Examples:
    python benchmarks/study.py --task digits --label_noise 0 0.2 0.4 --seeds 0 1 2 3 4 --jobs 2 \\
        --output_dir runs/study-digits --name digits -- --num_train_epochs 30
    python benchmarks/study.py --task digits --methods none xsam xsam-late50-i2-reuse --label_noise 0.4 \\
        --seeds 0 1 2 3 4 --output_dir runs/digits100 --name cost -- --num_train_epochs 100 \\
        --per_device_train_batch_size 64
    python benchmarks/study.py --task cifar10 --data_dir /data/cifar10 --label_noise 0 0.4 \\
        --output_dir runs/study-cifar10 -- --max_train_samples 10000 --image_size 16 --num_train_epochs 6
    python benchmarks/study.py --task multi30k --data_dir /data/multi30k --rho 0.05 --seeds 0 1 2 \\
        --config cheap="--sam_method xsam --sam_start_ratio 0.5 --sam_interval 2 --sam_reuse true" \\
        --output_dir runs/multi30k --name multi30k

Produces: docs/study.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from configs import CONFIGS, grid_top, parse_configs, rho_free
from tasks import TASKS, Task

__all__ = ["study_settings", "script_flags", "run_one", "write_summary", "main"]


def study_settings(
    task: Task, names: list[str], configs: dict, seeds: list[int], label_noise: list, rhos: list
) -> dict:
    """Every run of a study, by its folder name: seed by seed, every setting and configuration in turn, so that an
    interrupted study has fewer seeds, not fewer settings."""
    settings: dict[str, dict] = {}
    for seed, noise, rho, name in itertools.product(seeds, label_noise, rhos, names):
        free = rho_free(configs[name])
        if not (free and rho != rhos[0]):  # rho does not change the base optimizer
            setting = task.setting(name, seed, rho, free, noise)
            settings.setdefault(task.run_name(setting), setting)
    return settings


def script_flags(task: Task, setting: dict, configs: dict, data: list[str], extra: list[str], out: Path) -> list[str]:
    """The script's flags for one run: the data, the task's defaults, the user's flags, what the report needs, the
    configuration's flags, the setting's (seed, rho unless the configuration has none, label noise) and the folder."""
    values = [
        arg
        for key, value in setting.items()
        if key != task.config_key and value is not None
        for arg in (f"--{key}", str(value))
    ]
    config = configs[setting[task.config_key]]
    return [*data, *task.defaults, *extra, *task.study_flags, *config, *values, "--output_dir", str(out)]


def run_one(task: Task, setting: dict, flags: list[str], out: Path) -> dict:
    """Train and evaluate once, or read the recorded result."""
    if (out / "study_run.json").exists():
        return task.recorded(out)
    out.mkdir(parents=True, exist_ok=True)
    return task.train(flags, setting, out)


def write_summary(
    task: Task, command: str, results: list[dict], order: list[str], configs: dict, grid_end: dict, stem: Path
) -> str:
    """Write the finished runs (``stem``.json), their tables (.md, returned) and the task's figures."""
    text = f"`{command}`\n\n{task.summary(results, order, configs, grid_end)}"
    Path(f"{stem}.json").write_text(json.dumps({"command": command, "runs": results}))
    Path(f"{stem}.md").write_text(text)
    task.plot(results, order, stem)
    return text


def _parse(argv: list[str], task: str | None, program: str, description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=program, description=description)
    if task is None:
        parser.add_argument("--task", choices=list(TASKS), required=True)
    parser.add_argument(
        "--data_dir", default=None, help="folder with the task's files (cifar10; multi30k: or $MULTI30K_DIR)"
    )
    parser.add_argument(
        "--methods", nargs="+", default=["none", "sam", "xsam"], help="configurations to run, in order"
    )
    parser.add_argument(
        "--config", action="append", default=[], metavar="NAME=FLAGS", help="a configuration of its own"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    if task is None or TASKS[task].label_noise:
        parser.add_argument("--label_noise", type=float, nargs="+", default=None, help="image tasks (default 0)")
    parser.add_argument("--rho", type=float, nargs="+", default=[0.05])
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at the same time")
    parser.add_argument("--output_dir", default=None, help="default runs/study (multi30k: runs/translation-study)")
    parser.add_argument("--name", default="results", help="file name of the summary (json, md, png)")
    parser.add_argument("--report_only", action="store_true", help="summarise the recorded runs, train none")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: flags passed on to the script")
    options = parser.parse_args(argv)
    if task is not None:
        options.task, options.label_noise = task, None
    return options


def main(
    argv: list[str] | None = None,
    fixed_task: str | None = None,
    program: str = "benchmarks/study.py",
    description: str = __doc__.split("\n")[0],
) -> None:
    """Run a study; ``fixed_task`` fixes ``--task`` (then not a flag), ``program`` is the tool named in the summaries
    and ``description`` its help's."""
    argv = sys.argv[1:] if argv is None else list(argv)
    options = _parse(argv, fixed_task, program, description)
    task = TASKS[options.task]
    configs = {**CONFIGS, **parse_configs(options.config)}
    names = options.methods + [name for name in configs if name not in CONFIGS and name not in options.methods]
    unknown = [name for name in names if name not in configs]
    if unknown:
        raise ValueError(f"Invalid --methods {' '.join(unknown)}: not one of {', '.join(configs)}")
    if options.label_noise is not None and not task.label_noise:
        raise ValueError(f"Invalid --label_noise for --task {options.task}: {task.script.name} has no label noise")
    label_noise = (options.label_noise or [0.0]) if task.label_noise else [None]
    data_dir = options.data_dir or (task.data_env and os.environ.get(task.data_env))
    data = [] if options.report_only else task.data_flags(data_dir)  # only training reads the data
    extra = [arg for arg in options.extra if arg != "--"]
    output_dir = Path(options.output_dir or task.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", program, *argv])
    settings = study_settings(task, names, configs, options.seeds, label_noise, options.rho)
    recorded = {name for name in settings if (output_dir / name / "study_run.json").exists()}
    if options.report_only:
        settings = {name: setting for name, setting in settings.items() if name in recorded}
    order = sorted(names, key=[*CONFIGS, *names].index) if task.rows == "table" else names
    # the top of each configuration's alpha grid: its own --alpha_max, else the user's, else the optimizer's
    grid_end = {name: grid_top([*task.defaults, *extra, *configs[name]]) for name in names}
    results: list[dict] = []

    def summary() -> str:
        return write_summary(task, command, results, order, configs, grid_end, output_dir / options.name)

    with ThreadPoolExecutor(options.jobs) as pool:
        futures = {
            pool.submit(
                run_one,
                task,
                setting,
                script_flags(task, setting, configs, data, extra, output_dir / name),
                output_dir / name,
            ): name
            for name, setting in settings.items()
        }
        for future in as_completed(futures):
            try:
                results.append(future.result())
            except subprocess.CalledProcessError as err:
                print(f"failed: {futures[future]} ({err}); see its log.txt", flush=True)
                continue
            print(json.dumps({k: v for k, v in results[-1].items() if not isinstance(v, list)}), flush=True)
            if futures[future] not in recorded:
                summary()
    print(summary() if results else "no run finished")


if __name__ == "__main__":
    main()
