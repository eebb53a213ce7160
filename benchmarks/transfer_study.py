#!/usr/bin/env python
"""Transfer study: fine-tune a pretrained ViT on a new task with AdamW, SAM, XSAM and a cheap schedule.

The target task is CIFAR-10's last five classes (dog, frog, horse, ship, truck), which the checkpoint given with
``--model`` never saw. For each training-set size (``--sizes``, images per class) and seed, the seed draws the
training images and, disjoint from them, a validation part (``--val_per_class``), both from CIFAR-10's *training*
images; the test set is all 5,000 test images of the five classes. Every run is one call of
``scripts/classify_images.py`` as a user runs it: ``--model_name_or_path MODEL --ignore_mismatched_sizes`` (a new
head), validation accuracy every epoch, test accuracy once at the end (``--do_predict``).

Choices are made on the validation part only: first AdamW's learning rate (``--lrs``), then, at that learning rate,
rho for each sharpness-aware configuration (``--rhos``); each configuration's choice is the one with the highest
mean final validation accuracy over the seeds. The report gives every run's validation accuracy, then the test
accuracy of the chosen settings with their cost and the same-seed differences against AdamW. Finished runs are
skipped, so an interrupted study continues where it stopped. Results: ``NAME.json`` (all runs) and ``NAME.md``.

``--configs`` names configurations of benchmarks/configs.py; by default ``adamw``, ``sam``, ``xsam-default`` (XSAM as
a user gets it, the package's defaults) and ``xsam-late50-i2-reuse`` (the README's cheap schedule). Runs recorded
before that table under the names ``xsam`` and ``cheap`` are read, and found again, as these two.

Example (docs/transfer.md):
    python benchmarks/transfer_study.py --data_dir CIFAR10_DIR --model VIT_CIFAR5 \\
        --sizes 50 --seeds 0 1 2 --jobs 2 --output_dir runs/transfer --name transfer -- --num_train_epochs 20
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from configs import CONFIGS, TRANSFER_CHOICES, TRANSFER_DEFAULTS
from selection import (
    baseline,
    chosen,
    cost_versus_adamw,
    current_names,
    groups,
    logged_cost,
    lr_settings,
    mean,
    mean_std,
    rho_settings,
    run_flags,
    run_folder,
    run_script,
    versus_adamw,
)

__all__ = [
    "TARGET_CLASSES",
    "draw_splits",
    "summarize_run",
    "read_record",
    "report",
    "main",
]

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "classify_images.py"
# CIFAR-10's labels 5..9, the classes a checkpoint pretrained on labels 0..4 has not seen
TARGET_CLASSES = {5: "dog", 6: "frog", 7: "horse", 8: "ship", 9: "truck"}
FINE_TUNE_FLAGS = [
    "--ignore_mismatched_sizes",
    "--do_train",
    "--do_eval",
    "--do_predict",
    "--image_column_name",
    "img",
    "--num_train_epochs",
    "20",
    "--per_device_train_batch_size",
    "32",
    "--per_device_eval_batch_size",
    "250",
    "--weight_decay",
    "0.05",
    "--lr_scheduler_type",
    "cosine",
    "--warmup_steps",
    "0.1",
    "--min_crop_scale",
    "0.7",
    "--eval_strategy",
    "epoch",
    "--save_strategy",
    "no",
    "--logging_strategy",
    "epoch",
    "--report_to",
    "none",
    "--overwrite_output_dir",  # a run cut short is run again from the start
]


def draw_splits(data_dir: Path, per_class: int, val_per_class: int, seed: int, folder: Path) -> dict[str, Path]:
    """Write the seed's training and validation draws of the target classes, and their whole test set, as parquet
    files in the Hub's layout (``img``, ``label`` with the five class names); returns the three paths."""
    import numpy as np
    from datasets import ClassLabel, concatenate_datasets, load_dataset

    folder.mkdir(parents=True, exist_ok=True)
    paths = {split: folder / f"{split}.parquet" for split in ("train", "validation", "test")}
    if all(path.exists() for path in paths.values()):
        return paths
    source = load_dataset(
        "parquet", data_files={"train": str(data_dir / "train.parquet"), "test": str(data_dir / "test.parquet")}
    )
    relabel = {old: new for new, old in enumerate(TARGET_CLASSES)}
    label = ClassLabel(names=list(TARGET_CLASSES.values()))

    def target(split) -> object:
        kept = split.filter(lambda labels: [x in relabel for x in labels], input_columns="label", batched=True)
        kept = kept.cast_column("label", ClassLabel(num_classes=10))
        kept = kept.map(lambda labels: {"label": [relabel[x] for x in labels]}, input_columns="label", batched=True)
        return kept.cast_column("label", label)

    train = target(source["train"])
    labels = np.array(train["label"])
    rng = np.random.default_rng(seed)
    picks = {"train": [], "validation": []}
    for cls in range(len(TARGET_CLASSES)):
        order = rng.permutation(np.flatnonzero(labels == cls))
        picks["train"].extend(order[:per_class].tolist())
        picks["validation"].extend(order[per_class : per_class + val_per_class].tolist())
    for split, rows in picks.items():
        drawn = concatenate_datasets([train.select(sorted(rows))]).shuffle(seed=seed)
        drawn.to_parquet(str(paths[split]))
    target(source["test"]).to_parquet(str(paths["test"]))
    return paths


def summarize_run(log_history: list[dict], results: dict) -> dict:
    """Curves and costs of one run from its ``trainer_state.json`` log and ``all_results.json``."""
    evals = [entry for entry in log_history if "eval_accuracy" in entry]
    trains = [entry for entry in log_history if "loss" in entry]
    val = [entry["eval_accuracy"] for entry in evals]
    best = max(range(len(val)), key=val.__getitem__) if val else None
    passes, searches = logged_cost(trains) or (1.0, 0.0)
    sharpness = [entry["xsam/sharpness"] for entry in trains if "xsam/sharpness" in entry]
    alphas = [entry["xsam/alpha"] for entry in trains if "xsam/alpha" in entry]
    return {
        "val_curve": val,
        "val_final": val[-1] if val else None,
        "val_best": val[best] if val else None,
        "val_best_epoch": best + 1 if val else None,
        "train_loss": [entry["loss"] for entry in trains],
        "alpha": alphas,
        "sharpness": sharpness,
        "passes_per_step": passes,
        "search_forwards_per_step": searches,
        "test_accuracy": results["predict_accuracy"],
        "train_runtime": results.get("train_runtime"),
    }


def run_one(setting: dict, splits: dict[str, Path], model: str, extra: list[str], out: Path) -> dict:
    """Fine-tune once, unless the run is recorded, and return its record: the setting and the wall time (what the
    tool measures itself) with what :func:`summarize_run` reads from the run's files."""
    record_path = out / "study_run.json"
    if not record_path.exists():
        wall = _fine_tune(setting, splits, model, extra, out)
        record_path.write_text(json.dumps({**setting, "flags": CONFIGS[setting["config"]], "wall_s": wall}, indent=1))
    return read_record(out)


def read_record(out: Path) -> dict:
    """The record of the finished run in ``out``, its configuration under today's name."""
    record_path, model_dir = out / "study_run.json", out / "model"
    state = json.loads((model_dir / "trainer_state.json").read_text())
    results = json.loads((model_dir / "all_results.json").read_text())
    record = {**current_names(json.loads(record_path.read_text())), **summarize_run(state["log_history"], results)}
    return {**record, "steps": state["global_step"]}


def _fine_tune(setting: dict, splits: dict[str, Path], model: str, extra: list[str], out: Path) -> float:
    """Run the script for ``setting`` into ``out/model`` (the weights are deleted after); returns the wall time."""
    out.mkdir(parents=True, exist_ok=True)
    flags = run_flags(setting, CONFIGS, model, splits, FINE_TUNE_FLAGS, out / "model")
    wall = run_script(SCRIPT, [*flags, *extra], out / "log.txt")
    for heavy in (out / "model").glob("*.safetensors"):
        heavy.unlink()  # the study keeps the numbers, not the weights
    return wall


def report(runs: list[dict], sizes: list[int], configs: list[str]) -> str:
    """The markdown report: every setting's validation accuracy, then the chosen settings on the test set."""
    lines = ["## Validation accuracy of every setting (the choices are made here)", ""]
    lines += ["| images per class | configuration | lr | rho | seeds | final val acc | best val acc (epoch) |"]
    lines += ["| --- | --- | --- | --- | --- | --- | --- |"]
    for (size, config, lr, rho), group in groups(runs).items():
        epochs = ", ".join(str(run["val_best_epoch"]) for run in group)
        lines.append(
            f"| {size} | {config} | {lr:g} | {'' if rho is None else f'{rho:g}'} | {len(group)} | "
            f"{mean_std([run['val_final'] for run in group])} | "
            f"{mean_std([run['val_best'] for run in group])} ({epochs}) |"
        )
    lines += ["", "## Test accuracy of the chosen settings", ""]
    lines += [
        "| images per class | configuration | lr | rho | seeds | test acc | − AdamW, same seed (ahead) | "
        "passes/step | cost vs AdamW | wall s |"
    ]
    lines += ["| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for size in sizes:
        adamw = baseline(runs, size)
        for config, (lr, rho), group in chosen(runs, size, configs):
            lines.append(
                f"| {size} | {config} | {lr:g} | {'' if rho is None else f'{rho:g}'} | {len(group)} | "
                f"{mean_std([run['test_accuracy'] for run in group])} | "
                f"{versus_adamw(group, adamw, 'test_accuracy', 3)} | "
                f"{mean([run['passes_per_step'] for run in group]):.2f} | {cost_versus_adamw(group, adamw)} | "
                f"{mean([run['wall_s'] for run in group]):.0f} |"
            )
    lines += ["", "## What the chosen settings did in training (means over the seeds)", ""]
    lines += ["| images per class | configuration | final train loss | best − final val acc | sharpness, first → "
              "last epoch | alpha, mean (range) |"]  # fmt: skip
    lines += ["| --- | --- | --- | --- | --- | --- |"]
    for size in sizes:
        for config, _, group in chosen(runs, size, configs):
            gap = mean([run["val_best"] - run["val_final"] for run in group])
            sharp = [run["sharpness"] for run in group if run.get("sharpness")]
            sharpness = f"{mean([s[0] for s in sharp]):.3f} → {mean([s[-1] for s in sharp]):.3f}" if sharp else ""
            alphas = [alpha for run in group for alpha in run.get("alpha", [])]
            alpha = f"{mean(alphas):.2f} ({min(alphas):g} to {max(alphas):g})" if alphas else ""
            lines.append(
                f"| {size} | {config} | {mean([run['train_loss'][-1] for run in group]):.3f} | {gap:.3f} | "
                f"{sharpness} | {alpha} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, required=True, help="CIFAR-10 parquet files (train, test)")
    parser.add_argument("--model", required=True, help="the pretrained checkpoint (Hub id or folder)")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--name", default="transfer", help="file stem of the report in --output_dir")
    parser.add_argument("--sizes", type=int, nargs="+", default=[50], help="training images per class")
    parser.add_argument("--val_per_class", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--configs", nargs="+", default=TRANSFER_DEFAULTS, choices=TRANSFER_CHOICES, help="AdamW and others"
    )
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3], help="AdamW's learning rates")
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1, 0.2])
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (one thread each)")
    parser.add_argument("--report_only", action="store_true", help="write the report of the finished runs, train none")
    args, extra = parser.parse_known_args(argv)
    extra = [flag for flag in extra if flag != "--"]
    configs = ["adamw", *(c for c in args.configs if c != "adamw")]

    # runs of earlier invocations in the same --output_dir count too (another size, more rhos)
    runs = {path.parent.name: read_record(path.parent) for path in sorted(args.output_dir.glob("*/study_run.json"))}

    def execute(settings: list[dict]) -> None:
        folders = [run_folder(args.output_dir, setting) for setting in settings]
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = [
                pool.submit(run_one, setting, splits[(setting["size"], setting["seed"])], args.model, extra, folder)
                for setting, folder in zip(settings, folders)
            ]
            for folder, future in zip(folders, futures):
                runs[folder.name] = future.result()
                write()

    def write() -> None:
        (args.output_dir / f"{args.name}.json").write_text(json.dumps(list(runs.values()), indent=1))
        (args.output_dir / f"{args.name}.md").write_text(
            f"`{' '.join(['python', 'benchmarks/transfer_study.py', *(argv or sys.argv[1:])])}`\n\n"
            + report(list(runs.values()), sorted({run["size"] for run in runs.values()}), configs)
        )

    if args.report_only:
        write()
        print((args.output_dir / f"{args.name}.md").read_text())
        return
    splits = {
        (size, seed): draw_splits(
            args.data_dir, size, args.val_per_class, seed, args.output_dir / "data" / f"n{size}-seed{seed}"
        )
        for size in args.sizes
        for seed in args.seeds
    }
    # AdamW's learning rate first, then rho at that learning rate for each sharpness-aware configuration
    execute(lr_settings(args.sizes, args.lrs, args.seeds))
    execute(rho_settings(list(runs.values()), args.sizes, configs[1:], args.rhos, args.seeds))
    write()
    print((args.output_dir / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
