#!/usr/bin/env python
"""Direction quality, the paper's central claim measured: how well do g0, SAM's g1, g_k and XSAM's u(alpha*)
point at the maximum of the batch loss in the rho-ball?

A real training run (XSAMTrainer, AdamW) of a tiny ViT on sklearn's digits and of a small Marian on English
to French number words keeps copies of the weights at a few checkpoints. At each checkpoint, on a few
training batches (model in eval mode, so the loss is a function of the weights alone):

- the ball maximum ``e*``: the largest loss found in ``||e|| <= rho`` by projected normalised gradient ascent
  from several starts (zero and random points);
- the directions: ``g0`` (the local gradient), ``g_k`` (k-step SAM's gradient, k = 1, 2, 5, 10) and XSAM's
  ``u_k(alpha*)`` (alpha searched on the batch at ``rho_max = 2 rho``; also at ``rho_max = rho`` for k = 1),
  all produced by the package's own engine;
- for each: its cosine with ``e*`` and the share of the ball's loss rise it reaches at radius rho,
  ``(L(w0 + rho d/||d||) - L0) / (L(w0 + e*) - L0)``.

The ball radius (and the XSAM engine's rho) is the training rho, or each of ``--radii``. With
``--landscape DIR`` it also draws the loss in the plane of ``v0 = g0/||g0||`` and ``v1 = g1/||g1||`` at
one checkpoint, with g0, g1, XSAM's direction and the projected ball maximum (the paper's Figure 1).

Usage (the README's tables and landscapes):
    python benchmarks/direction_quality.py --radii 0.05 0.2 --pga-steps 60 \\
        --json outputs/direction_quality.json --landscape outputs/pictures

Produces: docs/diagnostics.md and docs/benchmarks.md (the quality of the directions).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import tempfile

import torch
from transformers import PrinterCallback, TrainerCallback
from transformers.utils import logging as hf_logging

from diagnostics import (
    LossProbe,
    ball_maximum,
    cosine,
    engine_direction,
    plane_basis,
    plane_slice,
)
from hf_xsam import XSAMTrainer, XSAMTrainingArguments
from hf_xsam.plots import XSAMPlotCallback
from landscape import plot_landscape
from toy_tasks import TASKS, Task, build_task

TRAINING = {  # learning rate, epochs, batch size
    "vit": (2e-3, 15, 64),
    "marian": (1e-3, 8, 32),
}


class KeepWeights(TrainerCallback):
    """Keeps a copy of the model's weights at the given optimizer steps (0 = before the first step)."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = set(steps)
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def _keep(self, state, model) -> None:
        if state.global_step in self.steps and state.global_step not in self.weights:
            self.weights[state.global_step] = copy.deepcopy(model.state_dict())

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._keep(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._keep(state, model)


def train(task: Task, rho: float, checkpoints: int, seed: int, pictures: str | None) -> tuple[dict[int, dict], dict]:
    """Trains with XSAM and returns the kept weights by step and the run's figures.

    With ``pictures``, the run's alpha-search and alpha PNGs (:class:`~hf_xsam.plots.XSAMPlotCallback`) go to
    ``pictures/<task>/``.
    """
    lr, epochs, batch_size = TRAINING[task.name]
    total = epochs * math.ceil(len(task.train) / batch_size)
    keep = KeepWeights([round(i * total / (checkpoints - 1)) for i in range(checkpoints)])
    with tempfile.TemporaryDirectory() as tmp:
        args = XSAMTrainingArguments(
            output_dir=os.path.join(pictures, task.name) if pictures else tmp,
            report_to="none",
            learning_rate=lr,
            num_train_epochs=epochs,
            per_device_train_batch_size=batch_size,
            per_device_eval_batch_size=256,
            warmup_steps=total // 20,
            weight_decay=0.01,
            logging_steps=max(total // 20, 1),
            save_strategy="no",
            disable_tqdm=True,
            seed=seed,
            rho=rho,
        )
        trainer = XSAMTrainer(
            model=task.model,
            args=args,
            train_dataset=task.train,
            eval_dataset=task.test,
            data_collator=task.collate,
            callbacks=[keep],
        )
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(XSAMPlotCallback(trainer))
        trainer.train()
        figures = {
            "steps": trainer.state.global_step,
            "eval_loss": trainer.evaluate()["eval_loss"],
            "searched_alphas": [s["alpha"] for s in trainer.xsam.search_history],
        }
    return keep.weights, figures


def measure(probe: LossProbe, rho: float, ks: list[int], starts: int, pga_steps: int, seed: int) -> dict:
    """Cosines with the ball maximum and loss-rise shares at radius rho of every direction, on one batch."""
    loss0, g0 = probe.loss_and_grad()
    generator = torch.Generator().manual_seed(seed)
    random_starts = [torch.randn(probe.numel, generator=generator) for _ in range(starts - 1)]
    starts_list = [torch.zeros(probe.numel)] + [0.5 * rho * e / e.norm() for e in random_starts]
    maxima = [ball_maximum(probe.loss_and_grad, rho, [start], pga_steps) for start in starts_list]
    best = max(range(starts), key=lambda i: maxima[i][1])
    e_max, loss_max = maxima[best]
    directions = {"g0": g0}
    searched = {}
    for k in ks:
        directions[f"g{k}"], _, _ = engine_direction(probe, rho=rho, ascent_steps=k, sam_method="sam")
        directions[f"xsam{k}"], engine, stats = engine_direction(probe, rho=rho, ascent_steps=k)
        searched[f"xsam{k}"] = {"alpha": engine.alpha, "theta": math.degrees(float(stats.theta))}
    directions["xsam1@rho"], engine, _ = engine_direction(probe, rho=rho, rho_max=rho)
    searched["xsam1@rho"] = {"alpha": engine.alpha}
    rise = loss_max - loss0
    result = {
        "loss0": loss0,
        "loss_max": loss_max,
        "max_norm_over_rho": float(e_max.norm()) / rho,
        # which start found the maximum (0 = from w0), and how far the other starts' maxima are from it
        "best_start": best,
        "start_losses": [loss for _, loss in maxima],
        "start_cos_to_max": [cosine(e, e_max) for e, _ in maxima],
        "cos": {},
        "share": {},
    }
    for name, d in directions.items():
        result["cos"][name] = cosine(e_max, d)
        result["share"][name] = (probe.loss(rho * d / d.norm()) - loss0) / rise
    result["search"] = searched
    result["directions"] = directions
    result["e_max"] = e_max
    return result


def landscape(probe: LossProbe, point: dict, rho: float, points: int, path: str, title: str) -> dict:
    """Loss in the (v0, v1) plane with g0, g1, XSAM's direction and the projected ball maximum."""
    d = point["directions"]
    e0, e1 = plane_basis(d["g0"], d["g1"])

    def in_plane(v: torch.Tensor, length: float) -> tuple[float, float]:
        v = v.double() / v.double().norm() * length
        return float(v @ e0.double()), float(v @ e1.double())

    extent = 2.6 * rho
    grid = plane_slice(probe.loss, e0, e1, extent, points)
    e_max = point["e_max"]
    x, y = in_plane(e_max, float(e_max.norm()))
    in_plane_share = math.hypot(x, y) / float(e_max.norm())
    alpha = point["search"]["xsam1"]["alpha"]
    theta = math.radians(point["search"]["xsam1"]["theta"])
    alphas = [i / 10 for i in range(21)]  # the engine's default grid, at rho_max = 2 rho
    search = [(2 * rho * math.cos(a * theta), 2 * rho * math.sin(a * theta)) for a in alphas]
    plot_landscape(
        grid.tolist(),
        extent,
        arrows={
            "g0 (local gradient)": in_plane(d["g0"], rho),
            "g1 (SAM)": in_plane(d["g1"], rho),
            f"XSAM u(alpha*={alpha:g})": in_plane(d["xsam1"], rho),
        },
        circles={"rho": rho, "rho_max = 2 rho (alpha search)": 2 * rho},
        points={f"ball maximum, projected ({in_plane_share:.0%} in plane)": (x, y)},
        paths={"alpha search points, alpha = 0..2": search},
        path=path,
        title=title,
    )
    return {"path": path, "in_plane_share_of_max": in_plane_share, "alpha": alpha}


def summarise(rows: list[tuple[int, list[dict]]], ks: list[int]) -> dict:
    """Means over the checkpoints after the first (the initial weights are a case apart) and their batches,
    and the fraction of those (checkpoint, batch) pairs where each claim holds, judged by the cosine."""
    points = [p for step, batch_points in rows[1:] for p in batch_points]
    names = list(points[0]["cos"])
    mean = {kind: {n: statistics.fmean(p[kind][n] for p in points) for n in names} for kind in ("cos", "share")}
    last = ks[-1]

    def share_of(claim) -> float:
        return statistics.fmean(bool(claim(p["cos"])) for p in points)

    claims = {
        "g1 beats g0": share_of(lambda c: c["g1"] > c["g0"]),
        "xsam1 beats g1": share_of(lambda c: c["xsam1"] > c["g1"]),
        "xsam1@rho beats g1": share_of(lambda c: c["xsam1@rho"] > c["g1"]),
        f"g_k improves with k = {', '.join(map(str, ks))}": share_of(
            lambda c: all(c[f"g{a}"] <= c[f"g{b}"] for a, b in zip(ks, ks[1:]))
        ),
        f"g{last} worse than g1": share_of(lambda c: c[f"g{last}"] < c["g1"]),
        f"xsam{last} beats g{last}": share_of(lambda c: c[f"xsam{last}"] > c[f"g{last}"]),
    }
    return {"pairs": len(points), "mean": mean, "fraction_of_pairs": claims}


def table(rows: list[tuple[int, list[dict]]], names: list[str], kind: str, mean: dict[str, float]) -> str:
    header = "| step | " + " | ".join(names) + " |"
    lines = [header, "| ---: |" + " ---: |" * len(names)]
    for step, points in rows:
        values = [statistics.fmean(p[kind][n] for p in points) for n in names]
        lines.append(f"| {step} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    lines.append("| mean after the first |" + "".join(f" {mean[n]:.3f} |" for n in names))
    return "\n".join(lines)


def report(
    task_name: str, rho: float, run: dict, rows: list[tuple[int, list[dict]]], ks: list[int], summary: dict
) -> str:
    names = ["g0", "g1", "xsam1", "xsam1@rho"] + [f"g{k}" for k in ks[1:]] + [f"xsam{k}" for k in ks[1:]]
    lines = [f"### {task_name}, ball radius rho = {rho:g}: {run['steps']} steps, eval loss {run['eval_loss']:.3f}", ""]
    lines.append(
        "| step | L0 | L(ball max) - L0 | max found from | min cos between starts' maxima "
        "| alpha* (rho_max = 2 rho) | alpha* (rho_max = rho) | theta (deg) |"
    )
    lines.append("| ---: | ---: | ---: | --- | ---: | --- | --- | ---: |")
    for step, points in rows:
        lines.append(
            f"| {step} | {statistics.fmean(p['loss0'] for p in points):.4f} | "
            f"{statistics.fmean(p['loss_max'] - p['loss0'] for p in points):.4f} | "
            + ", ".join("w0" if p["best_start"] == 0 else "random" for p in points)
            + f" | {min(min(p['start_cos_to_max']) for p in points):.3f} | "
            + ", ".join(f"{p['search']['xsam1']['alpha']:g}" for p in points)
            + " | "
            + ", ".join(f"{p['search']['xsam1@rho']['alpha']:g}" for p in points)
            + f" | {statistics.fmean(p['search']['xsam1']['theta'] for p in points):.1f} |"
        )
    lines += ["", "Cosine with the direction to the ball maximum:", ""]
    lines.append(table(rows, names, "cos", summary["mean"]["cos"]))
    lines += ["", "Share of the ball's loss rise reached at radius rho:", ""]
    lines.append(table(rows, names, "share", summary["mean"]["share"]))
    lines += ["", f"Of the {summary['pairs']} (checkpoint, batch) pairs after the first checkpoint, by cosine:"]
    lines += [f"- {claim}: {value:.2f}" for claim, value in summary["fraction_of_pairs"].items()]
    return "\n".join(lines)


def measure_run(task: Task, weights: dict[int, dict], rho: float, args: argparse.Namespace) -> tuple[list, list]:
    """Measures every checkpoint on ``args.batches`` batches; draws the landscape at the chosen checkpoint."""
    model = task.model.eval()
    batch_size = TRAINING[task.name][2]
    rows, pictures = [], []
    for index, (step, state) in enumerate(sorted(weights.items())):
        model.load_state_dict(state)
        points = []
        for b in range(args.batches):
            probe = LossProbe(model, task.batch(batch_size, offset=b * batch_size))
            point = measure(probe, rho, args.ks, args.starts, args.pga_steps, args.seed + b)
            if args.landscape and index == args.landscape_checkpoint and b == 0:
                os.makedirs(args.landscape, exist_ok=True)
                path = os.path.join(args.landscape, f"landscape_{task.name}_rho{rho:g}.png")
                title = f"{task.name}: batch loss around w0 at step {step} (rho = {rho:g})"
                pictures.append(landscape(probe, point, rho, args.landscape_points, path, title))
            del point["directions"], point["e_max"]
            points.append(point)
        rows.append((step, points))
    return rows, pictures


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--rho", type=float, default=0.05, help="rho of the training run")
    parser.add_argument("--radii", type=float, nargs="+", help="ball radii measured (default: --rho)")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 5, 10], help="ascent steps compared (first = 1)")
    parser.add_argument("--checkpoints", type=int, default=4, help="checkpoints, evenly spaced, first and last kept")
    parser.add_argument("--batches", type=int, default=3, help="training batches measured per checkpoint")
    parser.add_argument("--starts", type=int, default=3, help="ascent starts for the ball maximum (zero + random)")
    parser.add_argument("--pga-steps", type=int, default=80, help="projected ascent steps per start")
    parser.add_argument(
        "--landscape", metavar="DIR", help="draw landscape_<task>_rho<r>.png, and the runs' alpha plots, into DIR"
    )
    parser.add_argument("--landscape-checkpoint", type=int, default=1, help="index of the checkpoint drawn")
    parser.add_argument("--landscape-points", type=int, default=41, help="grid points per side")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write all results to this JSON file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.ks[0] != 1:
        raise ValueError(f"Invalid --ks {args.ks}: the first must be 1 (SAM's g1 and XSAM's k = 1)")
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    results = {"settings": vars(args), "tasks": {}}
    for task_name in args.tasks:
        task = build_task(task_name, "small", args.seed)
        weights, run = train(task, args.rho, args.checkpoints, args.seed, args.landscape)
        results["tasks"][task_name] = {"run": run, "radii": {}}
        for rho in args.radii or [args.rho]:
            rows, pictures = measure_run(task, weights, rho, args)
            summary = summarise(rows, args.ks)
            results["tasks"][task_name]["radii"][rho] = {
                "checkpoints": dict(rows),
                "summary": summary,
                "landscape": pictures,
            }
            print(report(task_name, rho, run, rows, args.ks, summary), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
