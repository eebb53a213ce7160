#!/usr/bin/env python
"""Why XSAM with an extrapolated alpha stalls SGD on a plateau (issue 21), measured step by step.

The setting of the issue in small: the tiny ViT (4 layers, hidden 64, 16x16 inputs) on scikit-learn's digits
with 40% symmetric label noise, batch 64, SGD (lr 0.05, momentum 0.9, weight decay 5e-4) or AdamW (lr 1e-3,
weight decay 0.05), a linear warmup over 5% of 100 epochs then cosine, as the study runs it, but only the
first few epochs. Every run starts from the same weights and sees the same batches. Per step it records,
from the package's own engine:

- ``theta`` (degrees between ``v0 = g0/||g0||`` and ``v1 = g1/||g1||``) and ``||g1|| / ||g0||``;
- ``cos(d, g0)``: the angle of the update direction ``d = ||g1|| u(alpha)`` to the batch's own gradient
  (``cos(alpha theta)`` for one ascent step): negative means the base optimizer is told to climb the batch loss;
- ``cos(d, G)`` and ``cos(step, G)``, with ``G`` the gradient of the training loss over a fixed 512-image
  subset (every ``--full_every`` steps): whether the direction, and the step the base optimizer actually takes
  (momentum, Adam's rescaling included), descend the loss of the data rather than of one batch;
- per epoch, the loss on that subset and the test accuracy.

Methods: ``none`` (the base optimizer alone), ``sam`` (alpha 1), ``alpha2`` (alpha fixed at 2, what the
paper's search picks on the plateau), ``xsam`` (the paper's grid search once per epoch,
``alpha_max=2``, ``extrapolate_after_drop=0``) and ``safe`` (hf_xsam's defaults: with SGD the grid ends at 1).
Each search's losses along the arc are recorded with the step (``arc``).

Usage:
    python benchmarks/sgd_stall.py --optim sgd --methods none sam alpha2 xsam --epochs 8 --json sgd.json
    python benchmarks/sgd_stall.py --optim adamw --methods sam alpha2 xsam --epochs 8 --json adamw.json

Produces: docs/method.md ("XSAM with SGD").
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import numpy as np
import torch
import torch.nn.functional as F
from transformers import ViTConfig, ViTForImageClassification, get_cosine_schedule_with_warmup

from hf_xsam import XSAM, XSAMConfig

__all__ = ["digits", "tiny_vit", "run", "main"]

METHODS = ["none", "sam", "alpha2", "xsam", "safe"]
BATCH = 64
EPOCHS_OF_SCHEDULE = 100
WARMUP = 0.05
OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05),
}


def digits(noise: float = 0.4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Digits as 3x16x16 images in [-1, 1]: 1,497 training images with ``noise`` of their labels replaced by
    another class, 300 test images."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16
    images = F.interpolate(images, size=16, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1) * 2 - 1
    labels = torch.tensor(data.target)
    train, test = train_test_split(np.arange(len(labels)), test_size=300, random_state=seed, stratify=labels)
    train_labels = labels[train].clone()
    rng = np.random.default_rng(seed)
    flipped = rng.choice(len(train), round(noise * len(train)), replace=False)
    train_labels[flipped] = torch.tensor((train_labels[flipped].numpy() + rng.integers(1, 10, len(flipped))) % 10)
    return {"x": images[train], "y": train_labels, "x_test": images[test], "y_test": labels[test]}


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    """The study's digits ViT (4 layers, hidden 64, patch 4, no dropout)."""
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        hidden_dropout_prob=0.0,
        num_labels=10,
    )
    torch.manual_seed(seed)
    return ViTForImageClassification(config)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]).double()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm() + 1e-30))


def run(method: str, optim: str, data: dict, epochs: int, full_every: int, seed: int, rho: float) -> dict:
    """Train ``epochs`` epochs with one method; per-step and per-epoch measurements."""
    model = tiny_vit(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = OPTIMIZERS[optim](params)
    steps_per_epoch = math.ceil(len(data["y"]) / BATCH)
    total = steps_per_epoch * EPOCHS_OF_SCHEDULE
    schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(WARMUP * total), total)
    settings = {
        "sam": {"alpha": 1.0, "alpha_search_interval": 0},
        "alpha2": {"alpha": 2.0, "alpha_search_interval": 0},
        "xsam": {"extrapolate_after_drop": 0.0, "alpha_max": 2.0},
        "safe": {},
    }
    engine = XSAM(params, XSAMConfig(rho=rho, **settings[method]), optimizer=optimizer) if method != "none" else None
    subset = torch.arange(512)
    generator = torch.Generator().manual_seed(seed)
    steps, epochs_log = [], []

    def loss_on(x, y):
        return F.cross_entropy(model(pixel_values=x).logits, y)

    for epoch in range(epochs):
        order = torch.randperm(len(data["y"]), generator=generator)
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            batch = order[i * BATCH : (i + 1) * BATCH]
            x, y = data["x"][batch], data["y"][batch]
            record: dict = {"step": step}
            if step % full_every == 0:
                optimizer.zero_grad(set_to_none=True)
                loss_on(data["x"][subset], data["y"][subset]).backward()
                full = _flat(p.grad for p in params)
            optimizer.zero_grad(set_to_none=True)
            before = _flat(p.detach() for p in params)
            first: list[torch.Tensor] = []

            def forward_backward():
                loss = loss_on(x, y)
                loss.backward()
                if not first:
                    first.append(_flat(p.grad for p in params))
                return loss.detach()

            if engine is None:
                record["loss"] = float(forward_backward())
            else:
                stats = engine.step(forward_backward, lambda: loss_on(x, y), step=step, epoch=epoch)
                record.update(loss=float(stats.loss), theta=math.degrees(float(stats.theta)), alpha=engine.alpha)
                if engine.search_history and engine.search_history[-1].get("step") == step:
                    record["arc"] = engine.search_history[-1]["losses"]
            direction = _flat(p.grad for p in params)
            record["cos_d_g0"] = _cos(direction, first[0])
            record["g1_over_g0"] = float(direction.norm() / first[0].norm())
            optimizer.step()
            schedule.step()
            if step % full_every == 0:
                update = before - _flat(p.detach() for p in params)  # positive along G = descent
                record.update(cos_d_G=_cos(direction, full), cos_step_G=_cos(update, full))
            steps.append(record)
        with torch.no_grad():
            subset_loss = float(loss_on(data["x"][subset], data["y"][subset]))
            accuracy = float((model(pixel_values=data["x_test"]).logits.argmax(-1) == data["y_test"]).float().mean())
        epochs_log.append({"epoch": epoch + 1, "train_loss": subset_loss, "test_accuracy": accuracy})
        print(f"{optim} {method} epoch {epoch + 1}: loss {subset_loss:.3f}, test accuracy {accuracy:.3f}", flush=True)
    return {"method": method, "optim": optim, "steps": steps, "epochs": epochs_log}


def summary(result: dict, epochs_per_row: int = 2) -> list[str]:
    """Markdown rows: per group of epochs, the means of the step measurements and the epoch's loss/accuracy."""
    rows = []
    per_epoch = len(result["steps"]) // len(result["epochs"])
    for start in range(0, len(result["epochs"]), epochs_per_row):
        chunk = result["steps"][start * per_epoch : (start + epochs_per_row) * per_epoch]
        last = result["epochs"][min(start + epochs_per_row, len(result["epochs"])) - 1]

        def mean(key: str, chunk=chunk) -> str:
            values = [s[key] for s in chunk if key in s]
            return f"{statistics.mean(values):.2f}" if values else "-"

        cells = [
            result["optim"],
            result["method"],
            f"{start + 1}-{start + epochs_per_row}",
            mean("alpha"),
            mean("theta"),
            mean("g1_over_g0"),
            mean("cos_d_g0"),
            mean("cos_d_G"),
            mean("cos_step_G"),
            f"{last['train_loss']:.3f}",
            f"{last['test_accuracy']:.3f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


HEADER = (
    "| optimizer | method | epochs | alpha | theta (deg) | ‖g1‖/‖g0‖ | cos(d, g0) | cos(d, G) | cos(step, G) "
    "| loss (end) | test accuracy (end) |\n" + "|" + " --- |" * 11
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optim", choices=list(OPTIMIZERS), default="sgd")
    parser.add_argument("--methods", nargs="+", default=["none", "sam", "alpha2", "xsam"], choices=METHODS)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--full_every", type=int, default=4, help="steps between full-subset gradients")
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write every measurement here")
    options = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = digits(seed=options.seed)
    results = [
        run(method, options.optim, data, options.epochs, options.full_every, options.seed, options.rho)
        for method in options.methods
    ]
    print(HEADER)
    for result in results:
        print("\n".join(summary(result)))
    if options.json:
        with open(options.json, "w") as file:
            json.dump(results, file)


if __name__ == "__main__":
    main()
