#!/usr/bin/env python
"""Generalization study: base optimizer vs SAM vs XSAM over seeds, label noise and rho, with curves.

Every run is one call of ``scripts/classify_images.py`` with the same flags but the configuration's (``--methods``
names entries of ``CONFIGS``: none, sam, xsam and the cheap schedules), ``--seed``, ``--label_noise`` and ``--rho``.
It evaluates every epoch, on the evaluation split and on some training images as trained on (noisy labels), and
keeps per run: final accuracy, best accuracy and its epoch, both curves, the training loss per epoch, XSAM's alpha
per epoch, the passes and search forwards per step and the wall time (``study_run.json`` in the run's folder).
Finished runs are skipped, so an interrupted study continues where it stopped, and runs shared by two studies
in the same ``--output_dir`` are trained once. After each run the summary is rewritten: ``NAME.json`` (all runs),
``NAME.md`` (mean ± std over seeds, paired differences, alpha), ``NAME.png`` (test-accuracy curves, mean and band
per configuration) and ``NAME-cost.png`` (final accuracy against cost per step). docs/study.md quotes these tables.

Examples:
    python benchmarks/study.py --task digits --label_noise 0 0.2 0.4 --seeds 0 1 2 3 4 --jobs 2 \\
        --output_dir runs/study-digits --name digits -- --num_train_epochs 30
    python benchmarks/study.py --task digits --methods none xsam xsam-late50-i2-reuse --label_noise 0.4 \\
        --seeds 0 1 2 3 4 --output_dir runs/digits100 --name cost -- --num_train_epochs 100 \\
        --per_device_train_batch_size 64
    python benchmarks/study.py --task cifar10 --data_dir /data/cifar10 --label_noise 0 0.4 \\
        --output_dir runs/study-cifar10 -- --max_train_samples 10000 --image_size 16 --num_train_epochs 6
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from matplotlib.figure import Figure

__all__ = [
    "TASKS",
    "run_name",
    "run_one",
    "summarize_run",
    "table",
    "paired_table",
    "alpha_table",
    "grid_top",
    "plot_curves",
    "main",
]

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "classify_images.py"
# the configurations a study compares, by name: the script's flags for each (after the task's and the user's);
# XSAM with the paper's rule (grid 0..2 with any optimizer, extrapolate_after_drop 0), as the recorded studies ran it
_PAPER = ["--sam_method", "xsam", "--extrapolate_after_drop", "0"]
_XSAM = [*_PAPER, "--alpha_max", "2"]
_CHEAP = [*_XSAM, "--alpha_search", "coarse_to_fine"]
CONFIGS = {
    "none": ["--sam_method", "none"],
    "sam": ["--sam_method", "sam"],
    "xsam": _XSAM,
    # the package's defaults (alpha_max None: 1 with SGD; extrapolate_after_drop 0.05)
    "xsam-default": ["--sam_method", "xsam"],
    # accuracy per cost (docs/study.md, "Accuracy per cost"): the cheap search, late starts, intervals with reuse
    "xsam-c2f": _CHEAP,
    "xsam-late50": [*_CHEAP, "--sam_start_ratio", "0.5"],
    "xsam-late75": [*_CHEAP, "--sam_start_ratio", "0.75"],
    "xsam-late50-i2": [*_CHEAP, "--sam_start_ratio", "0.5", "--sam_interval", "2"],
    "xsam-late50-i2-reuse": [*_CHEAP, "--sam_start_ratio", "0.5", "--sam_interval", "2", "--sam_reuse", "true"],
    "xsam-i2-reuse": [*_CHEAP, "--sam_interval", "2", "--sam_reuse", "true"],
    "xsam-i4-reuse": [*_CHEAP, "--sam_interval", "4", "--sam_reuse", "true"],
    "xsam-amax1": [*_PAPER, "--alpha_max", "1"],
    "xsam-amax3": [*_PAPER, "--alpha_max", "3"],
    "xsam-amax4": [*_PAPER, "--alpha_max", "4"],
    # the adaptive ascent (docs/method.md, "The adaptive ascent"): ASAM, and XSAM climbing as ASAM does
    "asam": ["--sam_method", "sam", "--sam_adaptive", "true"],
    "xsam-asam": [*_XSAM, "--sam_adaptive", "true"],
}
METHODS = list(CONFIGS)
# cost units of one optimizer step: a forward-backward pass counts 3 (a forward and a backward of twice its cost),
# a forward pass of the alpha search 1
PASS_COST, SEARCH_FORWARD_COST = 3.0, 1.0

TASKS = {
    # the script's embedded digits and ViT; no augmentation or dropout, so that AdamW can memorise the noise
    "digits": {
        "data": lambda data_dir: [],
        "defaults": ["--min_crop_scale", "1", "--dropout", "0", "--eval_train_samples", "500"],
    },
    "cifar10": {
        "data": lambda data_dir: [
            "--train_file",
            f"{data_dir}/train.parquet",
            "--validation_file",
            f"{data_dir}/test.parquet",
            "--image_column_name",
            "img",
        ],
        "defaults": [
            "--do_train",
            "--do_eval",
            "--image_size",
            "32",
            "--patch_size",
            "4",
            "--hidden_size",
            "96",
            "--num_hidden_layers",
            "4",
            "--intermediate_size",
            "192",
            "--learning_rate",
            "1e-3",
            "--weight_decay",
            "0.05",
            "--lr_scheduler_type",
            "cosine",
            "--warmup_steps",
            "0.05",
            "--per_device_train_batch_size",
            "64",
            "--per_device_eval_batch_size",
            "256",
            "--min_crop_scale",
            "0.8",
            "--eval_train_samples",
            "1000",
        ],
    },
}
# what every run needs for the curves, after the task's and the user's flags
STUDY_FLAGS = [
    "--overwrite_output_dir",  # each run trains afresh into its folder, which holds its log.txt
    "true",
    "--eval_strategy",
    "epoch",
    "--logging_strategy",
    "epoch",
    "--save_strategy",
    "no",
    "--report_to",
    "none",
    "--disable_tqdm",
    "true",
]


def run_name(label_noise: float, rho: float, method: str, seed: int) -> str:
    """The folder of one run inside the study's output folder."""
    return f"noise{label_noise:g}-rho{rho:g}-{method}-seed{seed}"


def summarize_run(log_history: list[dict], final_accuracy: float) -> dict:
    """Curves and their summary from a run's ``trainer_state.json`` log history (epoch-wise logs)."""

    def by_epoch(key: str) -> list[dict]:
        return sorted((log for log in log_history if key in log), key=lambda log: log["epoch"])

    evals = by_epoch("eval_validation_accuracy")
    curve = [log["eval_validation_accuracy"] for log in evals]
    best = max(range(len(curve)), key=curve.__getitem__)
    train_logs = [log for log in log_history if "loss" in log]
    return {
        "final_accuracy": final_accuracy,
        "best_accuracy": curve[best],
        "best_epoch": round(evals[best]["epoch"]),
        "curve": curve,
        "train_curve": [log["eval_train_accuracy"] for log in by_epoch("eval_train_accuracy")],
        "train_loss": [log["loss"] for log in train_logs],
        "alpha": [log["xsam/alpha"] for log in train_logs if "xsam/alpha" in log],
        **_logged_cost(train_logs),
    }


def _logged_cost(train_logs: list[dict]) -> dict:
    """Forward-backward passes and search forwards per optimizer step over the run (``xsam/passes`` and
    ``xsam/search_forwards``, each log weighted by the steps it covers); empty for a run that logged none."""
    steps, passes, forwards, previous = 0, 0.0, 0.0, 0
    for log in train_logs:
        if "xsam/passes" in log:
            covered = log["step"] - previous
            steps, passes, forwards = (
                steps + covered,
                passes + covered * log["xsam/passes"],
                forwards + covered * log["xsam/search_forwards"],
            )
        previous = log["step"]
    return {"passes": passes / steps, "search_forwards": forwards / steps} if steps else {}


def relative_cost(run: dict) -> float:
    """Cost per optimizer step as a multiple of the base optimizer's (``PASS_COST`` units a pass).

    Runs recorded before the cost logs existed (``none``, ``sam`` and ``xsam`` of the first 100-epoch runs) get
    their schedule's known cost: one pass (none), two (sam), two and one grid search of 21 forwards per epoch
    (xsam).
    """
    if "passes" in run:
        passes, forwards = run["passes"], run["search_forwards"]
    else:
        passes = 1.0 if run["method"] == "none" else 2.0
        forwards = 21.0 * len(run["curve"]) / run["steps"] if run["method"] == "xsam" else 0.0
    return (PASS_COST * passes + SEARCH_FORWARD_COST * forwards) / PASS_COST


def run_one(task: str, data_dir: str | None, setting: dict, extra: list[str], out: Path) -> dict:
    """Train and evaluate once (or read the recorded result); ``setting`` holds method, seed, label_noise, rho."""
    result_file = out / "study_run.json"
    if result_file.exists():
        result = json.loads(result_file.read_text())
        if "steps" not in result:  # recorded before the step count was: the run's trainer state has it
            result["steps"] = json.loads((out / "trainer_state.json").read_text())["global_step"]
        return result
    command = [
        sys.executable,
        str(SCRIPT),
        *TASKS[task]["data"](data_dir),
        *TASKS[task]["defaults"],
        *extra,
        *STUDY_FLAGS,
        *CONFIGS[setting["method"]],
        "--seed",
        str(setting["seed"]),
        "--label_noise",
        str(setting["label_noise"]),
        "--rho",
        str(setting["rho"]),
        "--output_dir",
        str(out),
    ]
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        subprocess.run(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
        )
    wall_s = time.perf_counter() - start
    state = json.loads((out / "trainer_state.json").read_text())
    final = json.loads((out / "eval_results.json").read_text())["eval_accuracy"]
    result = {
        "task": task,
        **setting,
        "wall_s": wall_s,
        "steps": state["global_step"],
        **summarize_run(state["log_history"], final),
    }
    result_file.write_text(json.dumps(result, indent=1))
    return result


def _mean_std(values: list[float], digits: int) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def _groups(results: list[dict]) -> dict[tuple, list[dict]]:
    """Runs by (label noise, rho, method), in the order of the study's settings and methods."""
    groups: dict[tuple, list[dict]] = {}
    for run in sorted(results, key=lambda r: (r["label_noise"], r["rho"], METHODS.index(r["method"]))):
        groups.setdefault((run["label_noise"], run["rho"], run["method"]), []).append(run)
    return groups


def table(results: list[dict]) -> str:
    """Markdown: one row per (label noise, rho, method), mean ± standard deviation over seeds."""
    header = [
        "label noise",
        "rho",
        "method",
        "final accuracy",
        "best accuracy",
        "epoch of best",
        "train accuracy (noisy labels)",
        "cost per step (× base)",
        "wall time (s)",
        "seeds",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for (noise, rho, method), runs in _groups(results).items():
        cells = [
            f"{noise:g}",
            "-" if method == "none" else f"{rho:g}",
            method,
            _mean_std([r["final_accuracy"] for r in runs], 3),
            _mean_std([r["best_accuracy"] for r in runs], 3),
            _mean_std([r["best_epoch"] for r in runs], 1),
            _mean_std([r["train_curve"][-1] for r in runs], 3),
            f"{statistics.mean(relative_cost(r) for r in runs):.2f}",
            _mean_std([r["wall_s"] for r in runs], 0),
            str(len(runs)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(results: list[dict]) -> str:
    """Markdown: differences in final and best accuracy between two methods run with the same seed and setting
    (same split, same noisy labels), mean ± std over seeds, and on how many seeds the first method was ahead."""
    header = ["label noise", "rho", "comparison", "final accuracy", "ahead (final)", "best accuracy", "ahead (best)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    # rho does not change the base optimizer: its runs pair with every rho
    runs = {
        (r["label_noise"], None if r["method"] == "none" else r["rho"], r["method"], r["seed"]): r for r in results
    }
    settings = sorted({(r["label_noise"], r["rho"]) for r in results if r["method"] != "none"})
    others = [(config, reference) for config in METHODS[3:] for reference in ("none", "xsam")]
    for (noise, rho), (first, second) in itertools.product(
        settings, [("sam", "none"), ("xsam", "none"), ("xsam", "sam"), *others]
    ):
        second_rho = None if second == "none" else rho
        pairs = [
            (run, runs[noise, second_rho, second, seed])
            for (n, r, m, seed), run in runs.items()
            if (n, r, m) == (noise, rho, first) and (noise, second_rho, second, seed) in runs
        ]
        if not pairs:
            continue
        cells = [f"{noise:g}", f"{rho:g}", f"{first} − {second}"]
        for key in ("final_accuracy", "best_accuracy"):
            differences = [a[key] - b[key] for a, b in pairs]
            cells += [_mean_std(differences, 3), f"{sum(d > 0 for d in differences)} of {len(pairs)}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_top(flags: list[str]) -> float:
    """The top of the alpha grid that the script's flags give (the last ``--alpha_max``; else 1 with SGD, else 2).

    >>> grid_top(["--optim", "sgd"]), grid_top(["--optim", "sgd", "--alpha_max", "2"]), grid_top([])
    (1.0, 2.0, 2.0)
    """
    values = [value for flag, value in itertools.pairwise(flags) if flag == "--alpha_max"]
    if values:
        return float(values[-1])
    return 1.0 if ("--optim", "sgd") in itertools.pairwise(flags) else 2.0


def alpha_table(results: list[dict], alpha_max: float) -> str:
    """Markdown: XSAM's searched alpha per setting (epochs pooled over seeds)."""
    header = [
        "label noise",
        "rho",
        "configuration",
        "mean alpha",
        "first 5 epochs",
        "last 5 epochs",
        "range",
        "epochs at the grid end",
        "epoch-to-epoch change",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for (noise, rho, method), runs in _groups(results).items():
        if not method.startswith("xsam"):
            continue
        flags = CONFIGS[method]
        end = grid_top(flags) if "--alpha_max" in flags else alpha_max
        every = [a for r in runs for a in r["alpha"]]
        changes = [abs(b - a) for r in runs for a, b in itertools.pairwise(r["alpha"])]
        cells = [
            f"{noise:g}",
            f"{rho:g}",
            method,
            f"{statistics.mean(every):.2f}",
            f"{statistics.mean(a for r in runs for a in r['alpha'][:5]):.2f}",
            f"{statistics.mean(a for r in runs for a in r['alpha'][-5:]):.2f}",
            f"{min(every):.1f} to {max(every):.1f}",
            f"{sum(a >= end - 1e-6 for a in every) / len(every):.0%} (alpha {end:g})",
            f"{statistics.mean(changes):.2f}" if changes else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _panels(results: list[dict], size: tuple[float, float], sharey: bool = False) -> tuple[Figure, list, list]:
    """A figure with one panel of ``size`` (inches) per (label noise, rho) of ``results``, and those settings."""
    settings = sorted({(r["label_noise"], r["rho"]) for r in results})
    figure = Figure(figsize=(size[0] * len(settings), size[1]), layout="constrained")
    axes = figure.subplots(1, len(settings), squeeze=False, sharey=sharey)[0]
    return figure, axes, settings


def _color(method: str) -> str:
    """The colour of a configuration in every plot (matplotlib's cycle of ten)."""
    return f"C{METHODS.index(method) % 10}"


def plot_curves(results: list[dict], path: Path) -> None:
    """One panel per (label noise, rho): test accuracy per epoch, mean and ± std band per method; dashed, the
    accuracy on the (noisy) training labels."""
    figure, axes, settings = _panels(results, (4.2, 3.6), sharey=True)
    groups = _groups(results)
    for ax, (noise, rho) in zip(axes, settings):
        for method in METHODS:
            runs = groups.get((noise, rho, method))
            if not runs:
                continue
            color = _color(method)
            for key, style in (("curve", "-"), ("train_curve", "--")):
                length = min(len(r[key]) for r in runs)
                columns = list(zip(*(r[key][:length] for r in runs)))
                mean = [statistics.mean(c) for c in columns]
                spread = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in columns]
                epochs = range(1, length + 1)
                label = f"{method} (test)" if key == "curve" else f"{method} (train, noisy labels)"
                ax.plot(epochs, mean, style, color=color, label=label)
                if key == "curve":
                    ax.fill_between(
                        epochs,
                        [m - s for m, s in zip(mean, spread)],
                        [m + s for m, s in zip(mean, spread)],
                        color=color,
                        alpha=0.2,
                    )
        ax.set_title(f"label noise {noise:.0%}, rho {rho:g}")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[-1].legend(fontsize="small")
    figure.savefig(path, dpi=110)


def plot_cost(results: list[dict], path: Path) -> None:
    """One panel per (label noise, rho): final test accuracy (mean ± std over seeds) against the cost per step as a
    multiple of the base optimizer's, one point per configuration; the best accuracy at each cost is joined."""
    figure, axes, settings = _panels(results, (5.2, 4.0))
    groups = _groups(results)
    for ax, (noise, rho) in zip(axes, settings):
        points = []
        for method in METHODS:
            runs = groups.get((noise, rho, method))
            if not runs:
                continue
            finals = [r["final_accuracy"] for r in runs]
            cost = statistics.mean(relative_cost(r) for r in runs)
            spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
            points.append((cost, statistics.mean(finals)))
            ax.errorbar(cost, points[-1][1], yerr=spread, fmt="o", color=_color(method), capsize=3)
            ax.annotate(f"{method} ({len(runs)})", points[-1], textcoords="offset points", xytext=(4, 4), fontsize=7)
        front, best = [], -1.0
        for cost, accuracy in sorted(points):
            if accuracy > best:
                front.append((cost, accuracy))
                best = accuracy
        ax.plot(*zip(*front), "--", color="gray", alpha=0.6, label="best at its cost")
        ax.set_title(f"label noise {noise:.0%}, rho {rho:g}")
        ax.set_xlabel("cost per optimizer step (× base optimizer)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final test accuracy (seeds in brackets)")
    axes[-1].legend(fontsize="small")
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=list(TASKS), required=True)
    parser.add_argument("--data_dir", default=None, help="folder with the task's files (cifar10)")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--label_noise", type=float, nargs="+", default=[0.0])
    parser.add_argument("--rho", type=float, nargs="+", default=[0.05])
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at the same time")
    parser.add_argument("--output_dir", default="runs/study")
    parser.add_argument("--name", default="results", help="file name of the summary (json, md, png)")
    parser.add_argument("--report_only", action="store_true", help="summarise the recorded runs, train none")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: flags passed on to the script")
    options = parser.parse_args(argv)
    if options.task != "digits" and options.data_dir is None:
        parser.error(f"--task {options.task} needs --data_dir")
    extra = [arg for arg in options.extra if arg != "--"]
    alpha_max = grid_top(extra)
    output_dir = Path(options.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", "benchmarks/study.py", *(argv if argv is not None else sys.argv[1:])])
    # seed by seed, every setting and method in turn: an interrupted study has fewer seeds, not fewer settings
    settings = [
        {"method": method, "seed": seed, "label_noise": noise, "rho": rho}
        for seed, noise, rho, method in itertools.product(
            options.seeds, options.label_noise, options.rho, options.methods
        )
        if not (method == "none" and rho != options.rho[0])
    ]  # rho does not change the base optimizer
    if options.report_only:
        settings = [s for s in settings if (output_dir / run_name(**s) / "study_run.json").exists()]
    results, summary = [], "no run finished"
    with ThreadPoolExecutor(options.jobs) as pool:
        futures = {
            pool.submit(
                run_one, options.task, options.data_dir, setting, extra, output_dir / run_name(**setting)
            ): setting
            for setting in settings
        }
        for future in as_completed(futures):
            try:
                result = future.result()
            except subprocess.CalledProcessError as err:
                print(f"failed: {futures[future]} ({err}); see its log.txt", flush=True)
                continue
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}), flush=True)
            summary = f"`{command}`\n\n{table(results)}\n"
            if len({r["method"] for r in results}) > 1:
                summary += f"\nDifferences on the same seed:\n\n{paired_table(results)}\n"
            if any(r["method"] == "xsam" for r in results):
                summary += f"\nXSAM's alpha (searched once per epoch):\n\n{alpha_table(results, alpha_max)}\n"
            (output_dir / f"{options.name}.json").write_text(json.dumps({"command": command, "runs": results}))
            (output_dir / f"{options.name}.md").write_text(summary)
            plot_curves(results, output_dir / f"{options.name}.png")
            plot_cost(results, output_dir / f"{options.name}-cost.png")
    print(summary)


if __name__ == "__main__":
    main()
