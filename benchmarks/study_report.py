"""The tables and figures of a study's summary (``NAME.md``, ``NAME.png``), one set per metric.

- accuracy (the image tasks): one row per (label noise, rho, configuration) with the final and best accuracy, the
  epoch of the best, the accuracy on the (noisy) training labels and the cost per step; same-seed differences
  against ``none`` and ``xsam``; XSAM's searched alpha; test-accuracy curves and accuracy against cost.
- BLEU (the translation task): one row per (rho, configuration) with the test BLEU and chrF of the final weights
  and of the best epoch's and the validation loss's turn; same-seed differences against ``none`` and ``sam``;
  the searched alpha; validation BLEU and loss curves.

Every function takes the finished runs' records and ``order``, the configurations in the order of the rows.
``grid_end`` gives each configuration's top of the alpha grid, ``configs`` its flags.
"""

from __future__ import annotations

import itertools
import statistics
from pathlib import Path

from matplotlib.figure import Figure

from configs import CONFIGS
from selection import group_by, mean_std, step_cost

__all__ = [
    "cost",
    "accuracy_table",
    "accuracy_paired_table",
    "accuracy_alpha_table",
    "accuracy_summary",
    "plot_accuracy",
    "plot_cost",
    "bleu_table",
    "bleu_paired_table",
    "bleu_alpha_table",
    "bleu_summary",
    "plot_bleu",
]


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def _band(runs: list[dict], key: str) -> tuple[range, list[float], list[float]]:
    """Epochs, mean and standard deviation over ``runs`` of the per-epoch list ``key`` (as long as the shortest)."""
    length = min(len(r[key]) for r in runs)
    columns = list(zip(*(r[key][:length] for r in runs)))
    spread = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in columns]
    return range(1, length + 1), [statistics.mean(c) for c in columns], spread


def _colors(order: list[str]) -> dict[str, str]:
    """A configuration's colour, the same in every figure: its place in the table (matplotlib's cycle of ten), a
    study's own configurations after the table's."""
    places = [*CONFIGS, *(name for name in order if name not in CONFIGS)]
    return {name: f"C{places.index(name) % 10}" for name in order}


def _alpha_cells(runs: list[dict], epochs: int, end: float) -> list[str]:
    """The searched alpha of ``runs``, epochs pooled: mean, mean of the first and of the last ``epochs``, range,
    share at the grid's ``end``."""
    every = [a for r in runs for a in r["alpha"]]
    return [
        f"{statistics.mean(every):.2f}",
        f"{statistics.mean(a for r in runs for a in r['alpha'][:epochs]):.2f}",
        f"{statistics.mean(a for r in runs for a in r['alpha'][-epochs:]):.2f}",
        f"{min(every):.1f} to {max(every):.1f}",
        f"{sum(a >= end - 1e-6 for a in every) / len(every):.0%}",
    ]


def _searches(flags: list[str]) -> bool:
    return ("--sam_method", "xsam") in itertools.pairwise(flags)


# accuracy: benchmarks/study.py --task digits / cifar10


def cost(run: dict) -> float:
    """An image run's cost per optimizer step as a multiple of the base optimizer's, from what it logged.

    Runs recorded before the cost logs existed (``none``, ``sam`` and ``xsam`` of the first 100-epoch runs) get
    their schedule's known cost: one pass (none), two (sam), two and one grid search of 21 forwards per epoch
    (xsam).
    """
    if "passes" in run:
        return step_cost(run["passes"], run["search_forwards"])
    passes = 1.0 if run["method"] == "none" else 2.0
    return step_cost(passes, 21.0 * len(run["curve"]) / run["steps"] if run["method"] == "xsam" else 0.0)


def _accuracy_groups(results: list[dict], order: list[str]) -> dict[tuple, list[dict]]:
    """Runs by (label noise, rho, configuration), in the order of the settings and of ``order``."""
    return group_by(
        results,
        key=lambda r: (r["label_noise"], r["rho"], r["method"]),
        order=lambda r: (r["label_noise"], r["rho"], order.index(r["method"])),
    )


def accuracy_table(results: list[dict], order: list[str]) -> str:
    """Markdown: one row per (label noise, rho, configuration), mean ± standard deviation over seeds."""
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
    rows = [
        [
            f"{noise:g}",
            "-" if method == "none" else f"{rho:g}",
            method,
            mean_std([r["final_accuracy"] for r in runs], 3),
            mean_std([r["best_accuracy"] for r in runs], 3),
            mean_std([r["best_epoch"] for r in runs], 1),
            mean_std([r["train_curve"][-1] for r in runs], 3),
            f"{statistics.mean(cost(r) for r in runs):.2f}",
            mean_std([r["wall_s"] for r in runs], 0),
            str(len(runs)),
        ]
        for (noise, rho, method), runs in _accuracy_groups(results, order).items()
    ]
    return _markdown(header, rows)


def accuracy_paired_table(results: list[dict], order: list[str]) -> str:
    """Markdown: differences in final and best accuracy between two configurations run with the same seed and
    setting (same split, same noisy labels), mean ± std over seeds, and on how many seeds the first was ahead:
    sam and xsam against none, xsam against sam, every other configuration against none and xsam."""
    header = ["label noise", "rho", "comparison", "final accuracy", "ahead (final)", "best accuracy", "ahead (best)"]
    # rho does not change the base optimizer: its runs pair with every rho
    runs = {
        (r["label_noise"], None if r["method"] == "none" else r["rho"], r["method"], r["seed"]): r for r in results
    }
    settings = sorted({(r["label_noise"], r["rho"]) for r in results if r["method"] != "none"})
    others = [(c, reference) for c in order if c not in ("none", "sam", "xsam") for reference in ("none", "xsam")]
    rows = []
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
            cells += [mean_std(differences, 3), f"{sum(d > 0 for d in differences)} of {len(pairs)}"]
        rows.append(cells)
    return _markdown(header, rows)


def accuracy_alpha_table(
    results: list[dict], order: list[str], configs: dict[str, list[str]], grid_end: dict[str, float]
) -> str:
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
    rows = []
    for (noise, rho, method), runs in _accuracy_groups(results, order).items():
        if not _searches(configs[method]):
            continue
        *alpha, at_end = _alpha_cells(runs, 5, grid_end[method])
        changes = [abs(b - a) for r in runs for a, b in itertools.pairwise(r["alpha"])]
        change = f"{statistics.mean(changes):.2f}" if changes else "-"
        rows.append([f"{noise:g}", f"{rho:g}", method, *alpha, f"{at_end} (alpha {grid_end[method]:g})", change])
    return _markdown(header, rows)


def accuracy_summary(
    results: list[dict], order: list[str], configs: dict[str, list[str]], grid_end: dict[str, float]
) -> str:
    text = f"{accuracy_table(results, order)}\n"
    if len({r["method"] for r in results}) > 1:
        text += f"\nDifferences on the same seed:\n\n{accuracy_paired_table(results, order)}\n"
    if any(r["method"] == "xsam" for r in results):
        alpha = accuracy_alpha_table(results, order, configs, grid_end)
        text += f"\nXSAM's alpha (searched once per epoch):\n\n{alpha}\n"
    return text


def _panels(results: list[dict], size: tuple[float, float], sharey: bool = False) -> tuple[Figure, list, list]:
    """A figure with one panel of ``size`` (inches) per (label noise, rho) of ``results``, and those settings."""
    settings = sorted({(r["label_noise"], r["rho"]) for r in results})
    figure = Figure(figsize=(size[0] * len(settings), size[1]), layout="constrained")
    axes = figure.subplots(1, len(settings), squeeze=False, sharey=sharey)[0]
    return figure, axes, settings


def plot_accuracy(results: list[dict], order: list[str], path: Path) -> None:
    """One panel per (label noise, rho): test accuracy per epoch, mean and ± std band per configuration; dashed,
    the accuracy on the (noisy) training labels."""
    figure, axes, settings = _panels(results, (4.2, 3.6), sharey=True)
    colors = _colors(order)
    groups = _accuracy_groups(results, order)
    for ax, (noise, rho) in zip(axes, settings):
        for method in order:
            runs = groups.get((noise, rho, method))
            if not runs:
                continue
            for key, style in (("curve", "-"), ("train_curve", "--")):
                epochs, mean, spread = _band(runs, key)
                label = f"{method} (test)" if key == "curve" else f"{method} (train, noisy labels)"
                ax.plot(epochs, mean, style, color=colors[method], label=label)
                if key == "curve":
                    low, high = [m - s for m, s in zip(mean, spread)], [m + s for m, s in zip(mean, spread)]
                    ax.fill_between(epochs, low, high, color=colors[method], alpha=0.2)
        ax.set_title(f"label noise {noise:.0%}, rho {rho:g}")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[-1].legend(fontsize="small")
    figure.savefig(path, dpi=110)


def plot_cost(results: list[dict], order: list[str], path: Path) -> None:
    """One panel per (label noise, rho): final test accuracy (mean ± std over seeds) against the cost per step as a
    multiple of the base optimizer's, one point per configuration; the best accuracy at each cost is joined."""
    figure, axes, settings = _panels(results, (5.2, 4.0))
    colors = _colors(order)
    groups = _accuracy_groups(results, order)
    for ax, (noise, rho) in zip(axes, settings):
        points = []
        for method in order:
            runs = groups.get((noise, rho, method))
            if not runs:
                continue
            finals = [r["final_accuracy"] for r in runs]
            spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
            points.append((statistics.mean(cost(r) for r in runs), statistics.mean(finals)))
            ax.errorbar(*points[-1], yerr=spread, fmt="o", color=colors[method], capsize=3)
            ax.annotate(f"{method} ({len(runs)})", points[-1], textcoords="offset points", xytext=(4, 4), fontsize=7)
        front, best = [], -1.0
        for point_cost, accuracy in sorted(points):
            if accuracy > best:
                front.append((point_cost, accuracy))
                best = accuracy
        ax.plot(*zip(*front), "--", color="gray", alpha=0.6, label="best at its cost")
        ax.set_title(f"label noise {noise:.0%}, rho {rho:g}")
        ax.set_xlabel("cost per optimizer step (× base optimizer)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final test accuracy (seeds in brackets)")
    axes[-1].legend(fontsize="small")
    figure.savefig(path, dpi=110)


# BLEU: benchmarks/study.py --task multi30k (benchmarks/translation_study.py)


def _bleu_groups(results: list[dict], order: list[str]) -> dict[tuple, list[dict]]:
    """Runs by (rho, configuration), in the order of the rhos and of ``order``; a configuration without rho comes
    first under rho "-"."""
    return group_by(
        results,
        key=lambda r: (r["rho"], r["config"]),
        order=lambda r: (r["rho"] or 0.0, order.index(r["config"]), r["seed"]),
    )


def _rho(rho: float | None) -> str:
    return "-" if rho is None else f"{rho:g}"


def bleu_table(results: list[dict], order: list[str]) -> str:
    """Markdown: one row per (rho, configuration), mean ± standard deviation over seeds."""
    header = [
        "rho",
        "configuration",
        "test BLEU (final)",
        "test chrF (final)",
        "test BLEU (best epoch)",
        "test chrF (best epoch)",
        "best epoch (val BLEU)",
        "lowest val loss at epoch",
        "val loss final − lowest",
        "wall time (s)",
        "seeds",
    ]
    rows = [
        [
            _rho(rho),
            config,
            mean_std([r["test_bleu"] for r in runs], 2),
            mean_std([r["test_chrf"] for r in runs], 2),
            mean_std([r["best_test_bleu"] for r in runs], 2),
            mean_std([r["best_test_chrf"] for r in runs], 2),
            mean_std([r["best_epoch"] for r in runs], 1),
            mean_std([r["lowest_val_loss_epoch"] for r in runs], 1),
            mean_std([r["val_loss"][-1] - min(r["val_loss"]) for r in runs], 3),
            mean_std([r["wall_s"] for r in runs], 0),
            str(len(runs)),
        ]
        for (rho, config), runs in _bleu_groups(results, order).items()
    ]
    return _markdown(header, rows)


def bleu_paired_table(results: list[dict], order: list[str]) -> str:
    """Markdown: differences in test BLEU (final and best epoch) between two configurations run with the same seed
    (same initial weights and batches), mean ± std over seeds, and on how many seeds the first was ahead: every
    sharpness-aware configuration against none, every other one against sam."""
    header = ["rho", "comparison", "BLEU (final)", "ahead (final)", "BLEU (best epoch)", "ahead (best)"]
    comparisons = [(c, "none") for c in order if c != "none"] + [(c, "sam") for c in order if c not in ("none", "sam")]
    runs = {(r["rho"], r["config"], r["seed"]): r for r in results}
    rows = []
    for rho, (first, second) in itertools.product(sorted({r["rho"] for r in results} - {None}), comparisons):
        pairs = []
        for seed in sorted({r["seed"] for r in results}):
            a = runs.get((rho, first, seed)) or runs.get((None, first, seed))
            b = runs.get((rho, second, seed)) or runs.get((None, second, seed))
            if a and b:
                pairs.append((a, b))
        if not pairs or pairs[0][0]["rho"] is None:
            continue
        cells = [f"{rho:g}", f"{first} − {second}"]
        for key in ("test_bleu", "best_test_bleu"):
            differences = [a[key] - b[key] for a, b in pairs]
            cells += [mean_std(differences, 2), f"{sum(d > 0 for d in differences)} of {len(pairs)}"]
        rows.append(cells)
    return _markdown(header, rows)


def bleu_alpha_table(results: list[dict], order: list[str], grid_end: dict[str, float]) -> str:
    """Markdown: the searched alpha per (rho, configuration), epochs pooled over seeds."""
    header = ["rho", "configuration", "mean alpha", "first 3 epochs", "last 3 epochs", "range", "at the grid end"]
    rows = []
    for (rho, config), runs in _bleu_groups(results, order).items():
        if any(r["alpha"] for r in runs):
            *alpha, at_end = _alpha_cells(runs, 3, grid_end[config])
            rows.append([_rho(rho), config, *alpha, f"{at_end} ({grid_end[config]:g})"])
    return _markdown(header, rows)


def bleu_summary(
    results: list[dict], order: list[str], configs: dict[str, list[str]], grid_end: dict[str, float]
) -> str:
    text = f"{bleu_table(results, order)}\n"
    if len({r["config"] for r in results}) > 1:
        text += f"\nDifferences in test BLEU on the same seed:\n\n{bleu_paired_table(results, order)}\n"
    if any(r["alpha"] for r in results):
        text += f"\nSearched alpha (once per epoch):\n\n{bleu_alpha_table(results, order, grid_end)}\n"
    return text


def plot_bleu(results: list[dict], order: list[str], path: Path) -> None:
    """One column per rho: validation BLEU (top) and loss (bottom) per epoch, mean and ± std band per
    configuration; the configurations without rho are drawn in every column. The loss axis shows the last
    two thirds of the epochs, where the overfitting turns it up; one legend names every configuration."""
    rhos = sorted({r["rho"] for r in results} - {None}) or [None]
    figure = Figure(figsize=(4.2 * len(rhos), 6.8), layout="constrained")
    axes = figure.subplots(2, len(rhos), squeeze=False, sharex=True)
    groups, colors = _bleu_groups(results, order), _colors(order)
    lines = {}
    for column, rho in enumerate(rhos):
        late_losses = []
        for config in order:
            runs = groups.get((rho, config)) or groups.get((None, config))
            if not runs:
                continue
            for row, key in enumerate(("val_bleu", "val_loss")):
                epochs, mean, spread = _band(runs, key)
                ax = axes[row, column]
                (lines[config],) = ax.plot(epochs, mean, color=colors[config])
                low, high = [m - s for m, s in zip(mean, spread)], [m + s for m, s in zip(mean, spread)]
                ax.fill_between(epochs, low, high, color=colors[config], alpha=0.2)
                if key == "val_loss":
                    late_losses += [*low[len(mean) // 3 :], *high[len(mean) // 3 :]]
        if late_losses:
            margin = 0.1 * (max(late_losses) - min(late_losses)) or 0.01
            axes[1, column].set_ylim(min(late_losses) - margin, max(late_losses) + margin)
        axes[0, column].set_title(f"rho {_rho(rho)}")
        axes[1, column].set_xlabel("epoch")
        for ax in axes[:, column]:
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("validation BLEU")
    axes[1, 0].set_ylabel("validation loss")
    figure.legend(list(lines.values()), list(lines), loc="outside upper center", ncols=len(lines))
    figure.savefig(path, dpi=110)
