#!/usr/bin/env python
"""Do the grid and the coarse_to_fine alpha search choose the same alpha on the curves of a real training run?

A tiny ViT learns sklearn's digits with symmetric label noise (a share of the training labels replaced by a
different class drawn uniformly), trained by ``XSAMTrainer`` (AdamW) with the grid search every few steps,
which records the loss at all grid points. The coarse_to_fine strategy (``hf_xsam.search.coarse_to_fine_search``) is then
run offline on each recorded curve, exactly as the engine would run it on those averaged losses, and compared
with the grid's choice: same alpha or how far apart, evaluations used, and how many curves were unimodal
(strictly rising to a top, flat only there, strictly falling after it: where coarse_to_fine is exact by design).

``--first-steps N`` also trains N fresh models (seeds 0..N-1) for one step each and compares the searches of those
first steps, where the curves often have two peaks (a high one near alpha 0.5, a lower one near 1.6).

Usage (docs/search.md, "Agreement"):
    OMP_NUM_THREADS=1 python benchmarks/search_agreement.py --epochs 30 --first-steps 24 \\
        --json outputs/search_agreement.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter

import torch
from transformers import PrinterCallback, TrainerCallback
from transformers.utils import logging as hf_logging

from hf_xsam import XSAMTrainer, XSAMTrainingArguments
from hf_xsam.search import coarse_to_fine_search, grid_search
from toy_tasks import build_task


def add_label_noise(examples: list[dict[str, torch.Tensor]], share: float, classes: int, seed: int) -> int:
    """Replace the label of ``share`` of the examples by another class, uniformly; returns how many changed."""
    generator = torch.Generator().manual_seed(seed)
    noisy = torch.randperm(len(examples), generator=generator)[: round(share * len(examples))].tolist()
    for i in noisy:
        label = int(examples[i]["labels"])
        shift = int(torch.randint(1, classes, (), generator=generator))
        examples[i] = {**examples[i], "labels": torch.tensor((label + shift) % classes)}
    return len(noisy)


def is_unimodal(curve: list[float]) -> bool:
    """Strictly rising to its largest value, flat only at that value, strictly falling after it."""
    top = max(curve)
    first, last = curve.index(top), len(curve) - 1 - curve[::-1].index(top)
    rising = all(a < b for a, b in zip(curve[:first], curve[1 : first + 1]))
    flat = all(v == top for v in curve[first : last + 1])
    falling = all(a > b for a, b in zip(curve[last:], curve[last + 1 :]))
    return rising and flat and falling


class EverySearch(TrainerCallback):
    """Keeps every search of the run (the engine keeps only the recent ones)."""

    def __init__(self, trainer: XSAMTrainer) -> None:
        self.trainer, self.searches = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        engine = self.trainer.xsam
        new = engine.search_count - len(self.searches)
        if new > 0:
            self.searches += list(engine.search_history)[-new:]


def train(args: argparse.Namespace, rho: float, seed: int | None = None, steps: int = -1) -> tuple[list[dict], dict]:
    seed = args.seed if seed is None else seed
    task = build_task("vit", "small", seed)
    changed = add_label_noise(task.train, args.noise, 10, seed)
    with tempfile.TemporaryDirectory() as tmp:
        training = XSAMTrainingArguments(
            output_dir=tmp,
            report_to="none",
            learning_rate=args.lr,
            num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch_size,
            weight_decay=0.01,
            warmup_steps=20,
            logging_steps=50,
            save_strategy="no",
            disable_tqdm=True,
            seed=seed,
            max_steps=steps,
            rho=rho,
            alpha_search="grid",
            alpha_search_interval=args.search_every,
        )
        trainer = XSAMTrainer(model=task.model, args=training, train_dataset=task.train, data_collator=task.collate)
        trainer.remove_callback(PrinterCallback)
        every_search = EverySearch(trainer)
        trainer.add_callback(every_search)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        trainer.model.eval()
        with torch.no_grad():
            batch = task.collate(task.test)  # clean labels
            accuracy = float((trainer.model(**batch).logits.argmax(-1) == batch["labels"]).float().mean())
    run = {
        "rho": rho,
        "noisy_labels": changed,
        "steps": trainer.state.global_step,
        "train_seconds": seconds,
        "test_accuracy": accuracy,
        "grid": trainer.xsam.alpha_grid,
    }
    return every_search.searches, run


def compare(history: list[dict], grid: list[float]) -> dict:
    rows = []
    for search in history:
        curve = search["losses"]
        if len(curve) != len(grid):
            continue  # a search skipped for a non-finite gradient

        def evaluate(indices: list[int], curve: list[float] = curve) -> list[float]:
            return [curve[i] for i in indices]

        grid_index, _ = grid_search(grid, evaluate)
        cheap_index, seen = coarse_to_fine_search(grid, evaluate)
        rows.append(
            {
                "step": search["step"],
                "grid_alpha": grid[grid_index],
                "recorded_alpha": search["alpha"],
                "cheap_alpha": grid[cheap_index],
                "evaluations": len(seen),
                "unimodal": is_unimodal(curve),
                "losses": curve,
            }
        )
    differences = [abs(r["grid_alpha"] - r["cheap_alpha"]) for r in rows]
    evaluations = [r["evaluations"] for r in rows]
    disagreements = [r for r in rows if r["grid_alpha"] != r["cheap_alpha"]]
    return {
        "searches": len(rows),
        "recorded_alpha_is_grid_choice": sum(r["grid_alpha"] == r["recorded_alpha"] for r in rows),
        "same_alpha": len(rows) - len(disagreements),
        "unimodal": sum(r["unimodal"] for r in rows),
        "same_alpha_on_unimodal": sum(r["unimodal"] and r["grid_alpha"] == r["cheap_alpha"] for r in rows),
        "differences": sorted(d for d in differences if d > 0),
        "disagreements": [
            {k: r[k] for k in ("step", "grid_alpha", "cheap_alpha", "unimodal", "losses")} for r in disagreements
        ],
        "evaluations_mean": statistics.mean(evaluations),
        "evaluations_max": max(evaluations),
        "grid_alphas": dict(sorted(Counter(r["grid_alpha"] for r in rows).items())),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.05, 0.2])
    parser.add_argument("--noise", type=float, default=0.4, help="share of training labels replaced")
    parser.add_argument("--epochs", type=float, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--search-every", type=int, default=5, help="optimizer steps between searches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first-steps", type=int, default=0, help="fresh models whose first search is compared")
    parser.add_argument("--first-steps-rho", type=float, default=0.2)
    parser.add_argument("--json", help="write the figures and every curve to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    results = {"settings": vars(args), "runs": []}
    print(
        "| rho | steps | searches | unimodal | same alpha | same on unimodal | apart when not "
        "| evaluations mean / max | train s | test acc |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for rho in args.rhos:
        history, run = train(args, rho)
        figures = compare(history, run["grid"])
        results["runs"].append({**run, **figures})
        apart = ", ".join(f"{d:.1f}" for d in figures["differences"]) or "-"
        print(
            f"| {rho:g} | {run['steps']} | {figures['searches']} | {figures['unimodal']} | {figures['same_alpha']} "
            f"| {figures['same_alpha_on_unimodal']} / {figures['unimodal']} | {apart} "
            f"| {figures['evaluations_mean']:.2f} / {figures['evaluations_max']} | {run['train_seconds']:.0f} "
            f"| {run['test_accuracy']:.3f} |",
            flush=True,
        )
    if args.first_steps:
        first = [train(args, args.first_steps_rho, seed=seed, steps=1) for seed in range(args.first_steps)]
        figures = compare([history[0] for history, _ in first], first[0][1]["grid"])
        results["first_steps"] = {"rho": args.first_steps_rho, **figures}
        print(
            f"\nFirst steps of {args.first_steps} fresh models at rho {args.first_steps_rho:g}: same alpha in "
            f"{figures['same_alpha']} of {figures['searches']} ({figures['unimodal']} unimodal), evaluations mean "
            f"{figures['evaluations_mean']:.2f} / max {figures['evaluations_max']}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
