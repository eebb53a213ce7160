#!/usr/bin/env python
"""Translation transfer study: fine-tune a pretrained translation model on a new target language with AdamW, SAM,
XSAM and a cheap schedule.

The pretrained model is the embedded run of ``scripts/translate.py`` (English to French number words, its
defaults but with AdamW), trained once into ``OUTPUT_DIR/pretrained``: with the Hub out of reach it stands in for a Hub
checkpoint. The target task is English to *Spanish* number words (num2words ``lang="es"``): the same source, a
target language the model and its tokenizer (trained on English and French) have never seen. Numbers are drawn as
``scripts/translate.py`` draws its corpus (log-uniformly below one million, distinct). The test set is fixed
(``--test_pairs`` numbers, ``TEST_SEED``); for each training-set size (``--sizes``, pairs) and seed, the seed draws
the training pairs and, disjoint from them, ``--val_pairs`` validation pairs, both disjoint from the test numbers.

Every run is one call of ``scripts/translate.py`` as a user runs it: ``--model_name_or_path PRETRAINED`` (its own
tokenizer) ``--source_lang en --target_lang es``, validation BLEU and chrF at the end (``--do_eval``), test BLEU and
chrF once (``--do_predict``), greedy decoding. The pretrained model before fine-tuning is scored on the test set
too, so that the report shows what fine-tuning adds.

Choices are made on the validation pairs only, as in ``benchmarks/transfer_study.py``: first AdamW's learning rate
(``--lrs``), then, at that learning rate, rho for each sharpness-aware configuration (``--rhos``); each
configuration's choice is the one with the highest mean final validation BLEU over the seeds. The report gives
every run's validation BLEU, then the test BLEU and chrF of the chosen settings with their cost and the same-seed
differences against AdamW. Finished runs are skipped, so an interrupted study continues where it stopped.
Results: ``NAME.json`` (all runs) and ``NAME.md``.

Example (docs/study/translation-transfer.md):
    python benchmarks/translation_transfer.py --output_dir runs/mt-transfer --sizes 300 --seeds 0 1 2 \\
        --lrs 7e-4 1e-3 1.4e-3 --rhos 0.01 0.05 --name translation-transfer -- --num_train_epochs 25
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from num2words import num2words

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

__all__ = ["TEST_SEED", "draw_numbers", "draw_splits", "summarize_run", "report", "main"]

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "translate.py"
SOURCE, TARGET = "en", "es"
TEST_SEED = 1_000_003  # the test numbers are the same for every seed and size
# the common flags of every fine-tuning run; the flags after ``--`` come last and override them
FINE_TUNE_FLAGS = [
    "--source_lang",
    SOURCE,
    "--target_lang",
    TARGET,
    "--do_train",
    "--do_eval",
    "--do_predict",
    "--predict_with_generate",
    "--num_train_epochs",
    "25",  # 475 steps over 300 pairs: AdamW's test BLEU near 0 at 10 epochs, about 20 at 20, 85 at 30 (lr 1e-3)
    "--per_device_train_batch_size",
    "16",
    "--per_device_eval_batch_size",
    "128",
    "--weight_decay",
    "0.01",
    "--lr_scheduler_type",
    "cosine",
    "--warmup_steps",
    "0.05",
    "--num_beams",
    "1",
    "--generation_max_length",
    "64",  # the longest Spanish number is 47 pieces of the English-French tokenizer
    "--eval_strategy",
    "no",
    "--save_strategy",
    "no",
    "--logging_strategy",
    "epoch",
    "--report_to",
    "none",
]


def draw_numbers(count: int, seed: int, exclude: set[int] = frozenset()) -> list[int]:
    """``count`` distinct numbers below one million, log-uniform, none in ``exclude``: the draw of
    ``scripts/translate.py``'s ``number_corpus``."""
    rng = random.Random(seed)
    numbers: dict[int, None] = {}  # insertion-ordered set: the draw is reproducible
    while len(numbers) < count:
        number = int(10 ** rng.uniform(0, 6))
        if number not in exclude:
            numbers[number] = None
    return list(numbers)


def _write_pairs(numbers: list[int], path: Path) -> None:
    with open(path, "w") as f:
        for n in numbers:
            pair = {SOURCE: num2words(n, lang=SOURCE), TARGET: num2words(n, lang=TARGET)}
            f.write(json.dumps({"translation": pair}, ensure_ascii=False) + "\n")


def draw_splits(size: int, val_pairs: int, test_pairs: int, seed: int, folder: Path) -> dict[str, Path]:
    """Write the seed's training and validation pairs and the fixed test pairs as JSON lines
    (``{"translation": {"en": ..., "es": ...}}``); returns the three paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {split: folder / f"{split}.json" for split in ("train", "validation", "test")}
    if all(path.exists() for path in paths.values()):
        return paths
    test = draw_numbers(test_pairs, TEST_SEED)
    drawn = draw_numbers(size + val_pairs, seed, exclude=set(test))
    for split, numbers in (("train", drawn[:size]), ("validation", drawn[size:]), ("test", test)):
        _write_pairs(numbers, paths[split])
    return paths


def pretrain(folder: Path) -> Path:
    """The embedded run of ``scripts/translate.py`` (English to French numbers, its data, model and schedule) with
    AdamW into ``folder``, unless a model is there already. AdamW, like the image side's checkpoint and most Hub
    models: a checkpoint pretrained with XSAM could start the fine-tuning in a flatter region."""
    if not (folder / "config.json").exists():
        run_script(SCRIPT, ["--sam_method", "none", "--output_dir", str(folder)], folder.parent / "pretrain.log")
    return folder


def score_pretrained(model: Path, test_file: Path, out: Path, extra: list[str]) -> dict:
    """Test BLEU and chrF of the pretrained model before any fine-tuning (its French-trained decoder on Spanish)."""
    record_path = out / "study_run.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    common = [flag for flag in FINE_TUNE_FLAGS if flag not in ("--do_train", "--do_eval")]
    flags = ["--model_name_or_path", str(model), "--test_file", str(test_file), *common]
    run_script(SCRIPT, [*flags, "--output_dir", str(out / "model"), *extra], out / "log.txt")
    results = json.loads((out / "model" / "all_results.json").read_text())
    record = {"test_bleu": results["predict_bleu"], "test_chrf": results["predict_chrf"]}
    record_path.write_text(json.dumps(record, indent=1))
    return record


def summarize_run(log_history: list[dict], results: dict) -> dict:
    """Scores and costs of one run from its ``trainer_state.json`` log and ``all_results.json``."""
    trains = [entry for entry in log_history if "loss" in entry]
    passes, searches = logged_cost(trains) or (1.0, 0.0)
    return {
        "val_curve": [entry["eval_bleu"] for entry in log_history if "eval_bleu" in entry],
        "val_final": results["eval_bleu"],
        "val_chrf": results["eval_chrf"],
        "train_loss": [entry["loss"] for entry in trains],
        "alpha": [entry["xsam/alpha"] for entry in trains if "xsam/alpha" in entry],
        "passes_per_step": passes,
        "search_forwards_per_step": searches,
        "test_bleu": results["predict_bleu"],
        "test_chrf": results["predict_chrf"],
        "train_runtime": results.get("train_runtime"),
    }


def run_one(setting: dict, splits: dict[str, Path], model: Path, extra: list[str], out: Path) -> dict:
    """Fine-tune once (or read the finished run's record, its configuration under today's name) and return the
    run's record."""
    record_path = out / "study_run.json"
    if record_path.exists():
        return current_names(json.loads(record_path.read_text()))
    model_dir = out / "model"
    shutil.rmtree(model_dir, ignore_errors=True)  # what an interrupted run left behind
    out.mkdir(parents=True, exist_ok=True)
    flags = run_flags(setting, CONFIGS, model, splits, FINE_TUNE_FLAGS, model_dir)
    wall = run_script(SCRIPT, [*flags, *extra], out / "log.txt")
    state = json.loads((model_dir / "trainer_state.json").read_text())
    results = json.loads((model_dir / "all_results.json").read_text())
    record = {**setting, "flags": CONFIGS[setting["config"]], **summarize_run(state["log_history"], results)}
    record |= {"wall_s": wall, "steps": state["global_step"]}
    for heavy in model_dir.glob("*.safetensors"):
        heavy.unlink()  # the study keeps the numbers, not the weights
    record_path.write_text(json.dumps(record, indent=1))
    return record


def report(runs: list[dict], sizes: list[int], configs: list[str], pretrained: dict | None = None) -> str:
    """The markdown report: every setting's validation BLEU, then the chosen settings on the test set."""
    lines = ["## Validation BLEU of every setting (the choices are made here)", ""]
    lines += ["| training pairs | configuration | lr | rho | seeds | val BLEU | val chrF |"]
    lines += ["| --- | --- | --- | --- | --- | --- | --- |"]
    for (size, config, lr, rho), group in groups(runs).items():
        lines.append(
            f"| {size} | {config} | {lr:g} | {'' if rho is None else f'{rho:g}'} | {len(group)} | "
            f"{mean_std([run['val_final'] for run in group], 2)} | {mean_std([run['val_chrf'] for run in group], 2)} |"
        )
    lines += ["", "## Test BLEU and chrF of the chosen settings", ""]
    if pretrained is not None:
        lines += [
            f"Before fine-tuning, the pretrained (English-French) model scores BLEU {pretrained['test_bleu']:.2f} "
            f"and chrF {pretrained['test_chrf']:.2f} on the same test pairs.",
            "",
        ]
    lines += [
        "| training pairs | configuration | lr | rho | seeds | test BLEU | − AdamW, same seed (ahead) | test chrF | "
        "− AdamW, same seed (ahead) | passes/step | cost vs AdamW | wall s |"
    ]
    lines += ["| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for size in sizes:
        adamw = baseline(runs, size)
        for config, (lr, rho), group in chosen(runs, size, configs):
            cells = [
                cell
                for metric in ("test_bleu", "test_chrf")
                for cell in (mean_std([run[metric] for run in group], 2), versus_adamw(group, adamw, metric, 2))
            ]
            lines.append(
                f"| {size} | {config} | {lr:g} | {'' if rho is None else f'{rho:g}'} | {len(group)} | "
                f"{' | '.join(cells)} | {mean([run['passes_per_step'] for run in group]):.2f} | "
                f"{cost_versus_adamw(group, adamw)} | {mean([run['wall_s'] for run in group]):.0f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument(
        "--model", type=Path, help="the pretrained checkpoint; default OUTPUT_DIR/pretrained, trained there if absent"
    )
    parser.add_argument("--name", default="translation-transfer", help="file stem of the report in --output_dir")
    parser.add_argument("--sizes", type=int, nargs="+", default=[300], help="training pairs")
    parser.add_argument("--val_pairs", type=int, default=100)
    parser.add_argument("--test_pairs", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--configs", nargs="+", default=TRANSFER_DEFAULTS, choices=TRANSFER_CHOICES, help="AdamW and others"
    )
    parser.add_argument("--lrs", type=float, nargs="+", default=[7e-4, 1e-3, 1.4e-3], help="AdamW's learning rates")
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.01, 0.05])
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (one thread each)")
    args, extra = parser.parse_known_args(argv)
    extra = [flag for flag in extra if flag != "--"]
    configs = ["adamw", *(c for c in args.configs if c != "adamw")]

    args.output_dir.mkdir(parents=True, exist_ok=True)
    model = args.model or pretrain(args.output_dir / "pretrained")
    splits = {
        (size, seed): draw_splits(
            size, args.val_pairs, args.test_pairs, seed, args.output_dir / "data" / f"n{size}-seed{seed}"
        )
        for size in args.sizes
        for seed in args.seeds
    }
    test_file = next(iter(splits.values()))["test"]
    pretrained = score_pretrained(model, test_file, args.output_dir / "before-fine-tuning", extra)
    # runs of earlier invocations in the same --output_dir count too (another size, more rhos)
    runs = [current_names(json.loads(path.read_text())) for path in sorted(args.output_dir.glob("n*/study_run.json"))]

    def write() -> None:
        (args.output_dir / f"{args.name}.json").write_text(json.dumps({"not_fine_tuned": pretrained, "runs": runs}))
        (args.output_dir / f"{args.name}.md").write_text(
            f"`{' '.join(['python', 'benchmarks/translation_transfer.py', *(argv or sys.argv[1:])])}`\n\n"
            + report(runs, sorted({run["size"] for run in runs}), configs, pretrained)
        )

    def execute(settings: list[dict]) -> None:
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = [
                pool.submit(
                    run_one,
                    setting,
                    splits[(setting["size"], setting["seed"])],
                    model,
                    extra,
                    run_folder(args.output_dir, setting),
                )
                for setting in settings
            ]
            for future in futures:
                record = future.result()
                if record not in runs:
                    runs.append(record)
                write()

    # AdamW's learning rate first, then rho at that learning rate for each sharpness-aware configuration
    execute(lr_settings(args.sizes, args.lrs, args.seeds))
    execute(rho_settings(runs, args.sizes, configs[1:], args.rhos, args.seeds))
    write()
    print(report(runs, sorted({run["size"] for run in runs}), configs, pretrained))


if __name__ == "__main__":
    main()
