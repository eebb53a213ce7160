#!/usr/bin/env python
"""Generalization study: base optimizer vs SAM vs XSAM, same budget, several seeds, through the project's scripts.

Every (seed, method) run is one call of ``classify_images.py`` or ``translate.py`` with the same flags but
``--sam_method`` and ``--seed``; runs go seed by seed, all methods in turn, so a machine that slows down
slows every method alike. Finished runs are kept, so an interrupted study continues where it stopped. The
result is a Markdown table (mean and standard deviation over seeds, wall time) and a JSON file.

Examples:
    python benchmarks/compare.py --task cifar10 --data_dir /data/cifar10 --output_dir runs/compare-cifar10 \\
        -- --max_train_samples 5000 --num_train_epochs 3
    python benchmarks/compare.py --task multi30k --data_dir /data/multi30k --seeds 0 1 2 -- --num_train_epochs 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"

TASKS = {
    "cifar10": {
        "script": "classify_images.py",
        "metrics": ["eval_accuracy"],
        "data": lambda d: ["--train_file", f"{d}/train.parquet", "--validation_file", f"{d}/test.parquet",
                           "--image_column_name", "img", "--label_column_name", "label"],
        "defaults": ["--do_train", "--do_eval", "--image_size", "32", "--patch_size", "4", "--hidden_size", "96",
                     "--num_hidden_layers", "4", "--intermediate_size", "192", "--learning_rate", "1e-3",
                     "--weight_decay", "0.05", "--lr_scheduler_type", "cosine", "--warmup_steps", "0.05",
                     "--per_device_train_batch_size", "64", "--per_device_eval_batch_size", "256",
                     "--min_crop_scale", "0.8", "--logging_steps", "50", "--save_strategy", "no", "--rho", "0.05"],
    },
    "multi30k": {
        "script": "translate.py",
        "metrics": ["eval_bleu", "eval_chrf"],
        "data": lambda d: ["--train_file", f"{d}/train.de-en.jsonl", "--validation_file",
                           f"{d}/test_2016_flickr.de-en.jsonl", "--source_lang", "de", "--target_lang", "en"],
        "defaults": ["--do_train", "--do_eval", "--predict_with_generate", "--vocab_size", "6000", "--d_model", "128",
                     "--num_layers", "2", "--ffn_dim", "512", "--learning_rate", "1e-3", "--weight_decay", "0.01",
                     "--lr_scheduler_type", "cosine", "--warmup_steps", "0.05", "--per_device_train_batch_size", "64",
                     "--per_device_eval_batch_size", "128", "--max_source_length", "48", "--max_target_length", "48",
                     "--logging_steps", "50", "--save_strategy", "no", "--rho", "0.05"],
    },
}


def run_one(task: dict, data_dir: str, method: str, seed: int, extra: list[str], out: Path) -> dict:
    """Train and evaluate once; returns the metrics and the wall time (seconds)."""
    result_file = out / "compare_result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    command = [sys.executable, str(SCRIPTS / task["script"]), *task["data"](data_dir), *task["defaults"], *extra,
               "--sam_method", method, "--seed", str(seed), "--output_dir", str(out), "--report_to", "none",
               "--disable_tqdm", "true"]
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)
    metrics = json.loads((out / "eval_results.json").read_text())
    result = {"method": method, "seed": seed, "wall_s": time.perf_counter() - start,
              **{name: metrics[name] for name in task["metrics"]}}
    result_file.write_text(json.dumps(result, indent=2))
    return result


def table(results: list[dict], metrics: list[str], methods: list[str]) -> str:
    """Markdown: one row per method, mean +- standard deviation over seeds."""
    header = ["method", *metrics, "wall time (s)", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for method in methods:
        runs = [r for r in results if r["method"] == method]
        cells = [method]
        for name in [*metrics, "wall_s"]:
            values = [r[name] for r in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.4g} ± {spread:.2g}")
        cells.append(str(len(runs)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=list(TASKS), required=True)
    parser.add_argument("--data_dir", required=True, help="folder with the task's files (see the README)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["none", "sam", "xsam"], choices=["none", "sam", "xsam"])
    parser.add_argument("--output_dir", default=None)
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: flags passed on to the script")
    options = parser.parse_args()
    task = TASKS[options.task]
    extra = [arg for arg in options.extra if arg != "--"]
    output_dir = Path(options.output_dir or f"runs/compare-{options.task}")
    command = " ".join(["python", "benchmarks/compare.py", *sys.argv[1:]])
    results = []
    for seed in options.seeds:
        for method in options.methods:
            result = run_one(task, options.data_dir, method, seed, extra, output_dir / f"{method}-seed{seed}")
            print(json.dumps(result), flush=True)
            results.append(result)
            # the summary so far, so that an interrupted study still has its table
            summary = table(results, task["metrics"], [m for m in options.methods if any(r["method"] == m for r in results)])
            (output_dir / "results.json").write_text(json.dumps({"command": command, "runs": results}, indent=2))
            (output_dir / "results.md").write_text(f"`{command}`\n\n{summary}\n")
    print(summary)


if __name__ == "__main__":
    main()
