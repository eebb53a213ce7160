#!/usr/bin/env python
"""Translation study: AdamW vs SAM vs XSAM (and named configurations) on little Multi30k De->En data, over seeds.

Every run is one call of ``scripts/translate.py``: a Marian model and a tokenizer built from scratch, trained on
the first ``--max_train_samples`` pairs of ``train.de-en.jsonl``, evaluated every epoch on ``val.de-en.jsonl``
(loss, BLEU, chrF with greedy decoding) and keeping the checkpoint of the best validation BLEU. After training it
translates ``test_2016_flickr.de-en.jsonl`` twice: with the final weights ("final") and with the best
checkpoint's (a second call of the script, "best": early stopping on the validation BLEU). Per run it keeps both
test scores, the validation curves, the training loss and XSAM's alpha per epoch and the wall time
(``study_run.json`` in the run's folder). Finished runs are skipped, so an interrupted study continues where it
stopped. After each run the summary is rewritten: ``NAME.json`` (all runs), ``NAME.md`` (mean ± std over seeds,
differences on the same seed, alpha) and ``NAME.png`` (validation BLEU and loss per epoch, mean and band).

Configurations: ``none``, ``sam`` and ``xsam`` (the ``--sam_method`` of the script), and any named with
``--config NAME="FLAGS"``: the flags are passed to the script after everything else. A configuration with
``--sam_method none`` does not depend on rho and runs once per seed.

The data folder comes from ``--data_dir`` or the environment variable ``MULTI30K_DIR``; it holds the three files
named in ``FILES`` (the Multi30k release as JSON lines: ``{"translation": {"de": ..., "en": ...}}``).

Example:
    python benchmarks/translation_study.py --data_dir /data/multi30k --rho 0.05 --seeds 0 1 2 \\
        --config cheap="--sam_method xsam --sam_start_ratio 0.5 --sam_interval 2 --sam_reuse true" \\
        --output_dir runs/multi30k --name multi30k

Produces: docs/study.md ("Translation: Multi30k with little data").
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from matplotlib.figure import Figure

from study import _mean_std, grid_top

__all__ = [
    "FILES",
    "STUDY_DEFAULTS",
    "parse_configs",
    "run_name",
    "summarize_run",
    "run_one",
    "table",
    "paired_table",
    "alpha_table",
    "plot_curves",
    "write_summary",
    "main",
]

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "translate.py"
FILES = {"train": "train.de-en.jsonl", "validation": "val.de-en.jsonl", "test": "test_2016_flickr.de-en.jsonl"}
BUILT_IN = {method: ["--sam_method", method] for method in ("none", "sam", "xsam")}
# the sizing probed on one core (docs/study.md); flags after `--` override them
STUDY_DEFAULTS = [
    "--source_lang",
    "de",
    "--target_lang",
    "en",
    "--max_train_samples",
    "2000",
    "--max_eval_samples",
    "300",
    "--vocab_size",
    "4000",
    "--max_source_length",
    "64",
    "--max_target_length",
    "64",
    "--per_device_train_batch_size",
    "32",
    "--per_device_eval_batch_size",
    "100",
    "--learning_rate",
    "1e-3",
    "--lr_scheduler_type",
    "cosine",
    "--warmup_steps",
    "0.05",
    "--weight_decay",
    "0.01",
    "--num_train_epochs",
    "20",
]
# what every run needs for the curves and the best checkpoint, after the defaults and the user's flags
STUDY_FLAGS = [
    "--overwrite_output_dir",  # each run trains afresh into its folder, which holds its log.txt
    "true",
    "--do_train",
    "--do_eval",
    "--do_predict",
    "--predict_with_generate",
    "--eval_strategy",
    "epoch",
    "--logging_strategy",
    "epoch",
    "--save_strategy",
    "best",
    "--metric_for_best_model",
    "bleu",
    "--save_total_limit",
    "1",
    "--save_only_model",
    "true",
    "--report_to",
    "none",
    "--disable_tqdm",
    "true",
]
# the flags of the training run that the translation of the test set with the best checkpoint must repeat
PREDICT_FLAGS = ("--source_lang", "--target_lang", "--max_source_length", "--max_target_length", "--num_beams")


def parse_configs(specs: list[str]) -> dict[str, list[str]]:
    """The built-in configurations and those given as ``NAME=FLAGS``.

    Example:
        >>> parse_configs(["cheap=--sam_method xsam --sam_interval 2"])["cheap"]
        ['--sam_method', 'xsam', '--sam_interval', '2']
        >>> list(parse_configs([]))
        ['none', 'sam', 'xsam']
    """
    configs = dict(BUILT_IN)
    for spec in specs:
        name, sep, flags = spec.partition("=")
        if not sep or not name.isidentifier() or name in configs or not flags.strip().startswith("--"):
            raise ValueError(
                f"Invalid --config {spec!r}: it must be NAME=FLAGS with a new name (letters, digits, _; not "
                f'{", ".join(configs)}) and flags of scripts/translate.py, e.g. cheap="--sam_method xsam '
                '--sam_interval 2"'
            )
        configs[name] = shlex.split(flags)
    return configs


def rho_free(flags: list[str]) -> bool:
    """Whether a configuration trains without sharpness-aware steps (its runs do not depend on rho)."""
    return any(a == "--sam_method" and b == "none" for a, b in itertools.pairwise(flags))


def run_name(config: str, rho: float | None, seed: int) -> str:
    """The folder of one run inside the study's output folder (no rho for a configuration without it)."""
    return f"{config}-seed{seed}" if rho is None else f"rho{rho:g}-{config}-seed{seed}"


def summarize_run(log_history: list[dict]) -> dict:
    """Validation curves, their best epoch, training loss and alpha from a run's epoch-wise log history."""
    evals = sorted((log for log in log_history if "eval_bleu" in log), key=lambda log: log["epoch"])
    train_logs = sorted((log for log in log_history if "loss" in log), key=lambda log: log["epoch"])
    bleu = [log["eval_bleu"] for log in evals]
    loss = [log["eval_loss"] for log in evals]
    best = max(range(len(bleu)), key=bleu.__getitem__)
    lowest = min(range(len(loss)), key=loss.__getitem__)
    return {
        "val_bleu": bleu,
        "val_chrf": [log["eval_chrf"] for log in evals],
        "val_loss": loss,
        "best_val_bleu": bleu[best],
        "best_epoch": round(evals[best]["epoch"]),
        "lowest_val_loss_epoch": round(evals[lowest]["epoch"]),
        "train_loss": [log["loss"] for log in train_logs],
        "alpha": [log["xsam/alpha"] for log in train_logs if "xsam/alpha" in log],
    }


def _script(arguments: list[str], out: Path, log_name: str) -> None:
    with open(out / log_name, "w") as log:
        subprocess.run(
            [sys.executable, str(SCRIPT), *arguments],
            stdout=log,
            stderr=subprocess.STDOUT,
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
        )


def run_one(data_dir: Path, setting: dict, flags: list[str], out: Path) -> dict:
    """Train, evaluate and translate the test set once (or read the recorded result).

    ``setting`` holds config, rho (None for a configuration without it) and seed; ``flags`` are the defaults, the
    user's flags and the configuration's, in that order.
    """
    result_file = out / "study_run.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    out.mkdir(parents=True, exist_ok=True)
    files = [f"--{flag}" for flag in ("train_file", "validation_file", "test_file")]
    data = [arg for flag, name in zip(files, FILES.values()) for arg in (flag, str(data_dir / name))]
    rho = [] if setting["rho"] is None else ["--rho", str(setting["rho"])]
    start = time.perf_counter()
    seed = ["--seed", str(setting["seed"])]
    _script([*data, *flags, *STUDY_FLAGS, *rho, *seed, "--output_dir", str(out)], out, "log.txt")
    wall_s = time.perf_counter() - start
    state = json.loads((out / "trainer_state.json").read_text())
    final = json.loads((out / "predict_results.json").read_text())
    # the last value of a repeated flag is the one the script used
    repeated = [arg for a, b in itertools.pairwise(flags) if a in PREDICT_FLAGS for arg in (a, b)]
    _script(
        [
            "--model_name_or_path",
            state["best_model_checkpoint"],
            "--test_file",
            str(data_dir / FILES["test"]),
            *repeated,
            "--do_predict",
            "--predict_with_generate",
            "--per_device_eval_batch_size",
            "100",
            "--report_to",
            "none",
            "--output_dir",
            str(out / "best"),
        ],
        out,
        "log_best.txt",
    )
    best = json.loads((out / "best" / "predict_results.json").read_text())
    result = {
        **setting,
        "wall_s": wall_s,
        "test_bleu": final["predict_bleu"],
        "test_chrf": final["predict_chrf"],
        "best_test_bleu": best["predict_bleu"],
        "best_test_chrf": best["predict_chrf"],
        **summarize_run(state["log_history"]),
    }
    result_file.write_text(json.dumps(result, indent=1))
    return result


def _groups(results: list[dict], configs: list[str]) -> dict[tuple, list[dict]]:
    """Runs by (rho, configuration), in the order of the rhos and of ``configs``; a configuration without rho
    comes first under rho "-"."""
    groups: dict[tuple, list[dict]] = {}
    for run in sorted(results, key=lambda r: (r["rho"] or 0.0, configs.index(r["config"]), r["seed"])):
        groups.setdefault((run["rho"], run["config"]), []).append(run)
    return groups


def _rho(rho: float | None) -> str:
    return "-" if rho is None else f"{rho:g}"


def table(results: list[dict], configs: list[str]) -> str:
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
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for (rho, config), runs in _groups(results, configs).items():
        cells = [
            _rho(rho),
            config,
            _mean_std([r["test_bleu"] for r in runs], 2),
            _mean_std([r["test_chrf"] for r in runs], 2),
            _mean_std([r["best_test_bleu"] for r in runs], 2),
            _mean_std([r["best_test_chrf"] for r in runs], 2),
            _mean_std([r["best_epoch"] for r in runs], 1),
            _mean_std([r["lowest_val_loss_epoch"] for r in runs], 1),
            _mean_std([r["val_loss"][-1] - min(r["val_loss"]) for r in runs], 3),
            _mean_std([r["wall_s"] for r in runs], 0),
            str(len(runs)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _comparisons(configs: list[str]) -> list[tuple[str, str]]:
    """Every sharpness-aware configuration against AdamW, and every other one against SAM."""
    pairs = [(c, "none") for c in configs if c != "none"]
    return pairs + [(c, "sam") for c in configs if c not in ("none", "sam")]


def paired_table(results: list[dict], configs: list[str]) -> str:
    """Markdown: differences in test BLEU (final and best epoch) between two configurations run with the same seed
    (same initial weights and batches), mean ± std over seeds, and on how many seeds the first was ahead."""
    header = ["rho", "comparison", "BLEU (final)", "ahead (final)", "BLEU (best epoch)", "ahead (best)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    runs = {(r["rho"], r["config"], r["seed"]): r for r in results}
    for rho, (first, second) in itertools.product(sorted({r["rho"] for r in results} - {None}), _comparisons(configs)):
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
            cells += [_mean_std(differences, 2), f"{sum(d > 0 for d in differences)} of {len(pairs)}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def alpha_table(results: list[dict], configs: list[str], alpha_max: float) -> str:
    """Markdown: the searched alpha per (rho, configuration), epochs pooled over seeds."""
    header = ["rho", "configuration", "mean alpha", "first 3 epochs", "last 3 epochs", "range", "at the grid end"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for (rho, config), runs in _groups(results, configs).items():
        every = [a for r in runs for a in r["alpha"]]
        if not every:
            continue
        cells = [
            _rho(rho),
            config,
            f"{statistics.mean(every):.2f}",
            f"{statistics.mean(a for r in runs for a in r['alpha'][:3]):.2f}",
            f"{statistics.mean(a for r in runs for a in r['alpha'][-3:]):.2f}",
            f"{min(every):.1f} to {max(every):.1f}",
            f"{sum(a >= alpha_max - 1e-6 for a in every) / len(every):.0%} ({alpha_max:g})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(results: list[dict], configs: list[str], path: Path) -> None:
    """One column per rho: validation BLEU (top) and loss (bottom) per epoch, mean and ± std band per
    configuration; the configurations without rho are drawn in every column. The loss axis shows the last
    two thirds of the epochs, where the overfitting turns it up; one legend names every configuration."""
    rhos = sorted({r["rho"] for r in results} - {None}) or [None]
    figure = Figure(figsize=(4.2 * len(rhos), 6.8), layout="constrained")
    axes = figure.subplots(2, len(rhos), squeeze=False, sharex=True)
    groups = _groups(results, configs)
    lines = {}
    for column, rho in enumerate(rhos):
        late_losses = []
        for index, config in enumerate(configs):
            runs = groups.get((rho, config)) or groups.get((None, config))
            if not runs:
                continue
            for row, key in enumerate(("val_bleu", "val_loss")):
                length = min(len(r[key]) for r in runs)
                columns = list(zip(*(r[key][:length] for r in runs)))
                mean = [statistics.mean(c) for c in columns]
                spread = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in columns]
                epochs = range(1, length + 1)
                ax = axes[row, column]
                (lines[config],) = ax.plot(epochs, mean, color=f"C{index}")
                low, high = [m - s for m, s in zip(mean, spread)], [m + s for m, s in zip(mean, spread)]
                ax.fill_between(epochs, low, high, color=f"C{index}", alpha=0.2)
                if key == "val_loss":
                    late_losses += [*low[length // 3 :], *high[length // 3 :]]
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


def write_summary(command: str, results: list[dict], configs: list[str], alpha_max: float, stem: Path) -> str:
    """Write the finished runs (``stem``.json), their tables (.md, returned) and curves (.png)."""
    text = f"`{command}`\n\n{table(results, configs)}\n"
    if len({r["config"] for r in results}) > 1:
        text += f"\nDifferences in test BLEU on the same seed:\n\n{paired_table(results, configs)}\n"
    if any(r["alpha"] for r in results):
        text += f"\nSearched alpha (once per epoch):\n\n{alpha_table(results, configs, alpha_max)}\n"
    stem.with_suffix(".json").write_text(json.dumps({"command": command, "runs": results}))
    stem.with_suffix(".md").write_text(text)
    plot_curves(results, configs, stem.with_suffix(".png"))
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default=os.environ.get("MULTI30K_DIR"), help="default $MULTI30K_DIR")
    parser.add_argument("--methods", nargs="+", default=list(BUILT_IN), help="configurations to run, in order")
    parser.add_argument("--config", action="append", default=[], metavar="NAME=FLAGS", help="a named configuration")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rho", type=float, nargs="+", default=[0.05])
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at the same time")
    parser.add_argument("--output_dir", default="runs/translation-study")
    parser.add_argument("--name", default="results", help="file name of the summary (json, md, png)")
    parser.add_argument("--report_only", action="store_true", help="summarise the recorded runs, train none")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: flags passed on to the script")
    options = parser.parse_args(argv)
    configs = parse_configs(options.config)
    names = options.methods + [name for name in configs if name not in BUILT_IN and name not in options.methods]
    unknown = [name for name in names if name not in configs]
    if unknown:
        raise ValueError(f"Invalid --methods {' '.join(unknown)}: not one of {', '.join(configs)}")
    if options.data_dir is None:
        raise ValueError("No data: pass --data_dir or set MULTI30K_DIR to the folder of the Multi30k JSON lines")
    data_dir = Path(options.data_dir)
    missing = [name for name in FILES.values() if not (data_dir / name).is_file()]
    if missing:
        raise ValueError(f"Invalid --data_dir {str(data_dir)!r}: {', '.join(missing)} not found there")
    extra = [arg for arg in options.extra if arg != "--"]
    alpha_max = grid_top(extra)
    output_dir = Path(options.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "benchmarks/translation_study.py", *(argv if argv is not None else sys.argv[1:])])
    # seed by seed, every rho and configuration in turn: an interrupted study has fewer seeds, not fewer cells
    settings: dict[str, dict] = {}
    for seed, rho, config in itertools.product(options.seeds, options.rho, names):
        setting = {"config": config, "rho": None if rho_free(configs[config]) else rho, "seed": seed}
        settings.setdefault(run_name(**setting), setting)
    if options.report_only:
        settings = {name: s for name, s in settings.items() if (output_dir / name / "study_run.json").exists()}
    recorded = {name for name in settings if (output_dir / name / "study_run.json").exists()}
    results = []
    with ThreadPoolExecutor(options.jobs) as pool:
        futures = {
            pool.submit(
                run_one, data_dir, setting, [*STUDY_DEFAULTS, *extra, *configs[setting["config"]]], output_dir / name
            ): setting
            for name, setting in settings.items()
        }
        for future in as_completed(futures):
            name = run_name(**futures[future])
            try:
                results.append(future.result())
            except subprocess.CalledProcessError as err:
                print(f"failed: {name} ({err}); see its log.txt", flush=True)
                continue
            print(json.dumps({k: v for k, v in results[-1].items() if not isinstance(v, list)}), flush=True)
            if name not in recorded:
                write_summary(command, results, names, alpha_max, output_dir / options.name)
    if results:
        print(write_summary(command, results, names, alpha_max, output_dir / options.name))


if __name__ == "__main__":
    main()
