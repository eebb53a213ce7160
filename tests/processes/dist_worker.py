"""Runs under ``torchrun --nproc_per_node 2``: XSAMTrainer cases on real DDP (gloo), results saved per rank.

Each case records the batches every rank saw, its final weights and alpha, so the test can rebuild the
expected weights with the single-process float64 reference.
"""

import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from helpers import RoutedClassifier, SequentialXSAMTrainer, TinyClassifier, as_dataset, flat, make_data, routed_data
from hf_xsam import XSAMTrainingArguments

N, LR = 16, 0.5
# ASAM's ascent (sam_adaptive) with this eta, in the cases named "asam"
ETA = 0.05
ASAM = dict(sam_adaptive=True, sam_adaptive_eta=ETA)

CASES = {
    "local": dict(rho=0.3, max_steps=6),
    "global": dict(rho=0.3, max_steps=6, sam_perturbation="global"),
    "local_accumulation": dict(rho=0.3, max_steps=3, gradient_accumulation_steps=2, alpha_search_interval=2),
    "global_accumulation": dict(rho=0.3, max_steps=3, gradient_accumulation_steps=2, sam_perturbation="global"),
    "local_coarse_to_fine": dict(rho=0.3, max_steps=6, alpha_search="coarse_to_fine", alpha_search_interval=1),
    "local_reuse": dict(rho=0.3, max_steps=6, sam_interval=2, sam_reuse=True, alpha=1.3, alpha_search_interval=0),
    "global_reuse_accumulation": dict(
        rho=0.3,
        max_steps=4,
        gradient_accumulation_steps=2,
        sam_perturbation="global",
        sam_interval=2,
        sam_reuse=True,
        sam_reuse_scale=0.5,
        alpha=1.3,
        alpha_search_interval=0,
    ),
    "local_start_accumulation": dict(rho=0.3, max_steps=4, gradient_accumulation_steps=2, sam_start_ratio=0.5),
    # each worker climbs with T = |w0| + eta and its own gradient; the search radii are each worker's own climb's
    "local_asam": dict(rho=0.3, max_steps=6, **ASAM),
    "global_asam_accumulation": dict(
        rho=0.3, max_steps=3, gradient_accumulation_steps=2, sam_perturbation="global", **ASAM
    ),
    "local_asam_reuse_accumulation": dict(
        rho=0.3,
        max_steps=4,
        gradient_accumulation_steps=2,
        sam_interval=2,
        sam_reuse=True,
        sam_reuse_scale=5.0,  # above the kept part's size: the test sees its size too
        alpha=1.3,
        alpha_search_interval=0,
        **ASAM,
    ),
}
# Batch j of two examples goes to rank j % 2, as micro-batch j // 2 % 2 of step j // 4. Step 0: rank 0 uses head a
# only, rank 1 head b only; step 1: head b only in rank 0's first micro-batch; step 2: head b nowhere.
ROUTES = "aabbaabb" + "abaaaaaa" + "aaaaaaaa"
ROUTED = dict(max_steps=3, gradient_accumulation_steps=2, ddp_find_unused_parameters=True, logging_steps=1000, rho=0.3)
ROUTED_CASES = {
    "routed_local": dict(alpha_search_interval=2),
    "routed_global": dict(alpha_search_interval=2, sam_perturbation="global"),
    "routed_none": dict(sam_method="none"),
    "routed_local_asam": dict(alpha_search_interval=2, **ASAM),
    "routed_global_asam": dict(alpha_search_interval=2, sam_perturbation="global", **ASAM),
}
# sam_interval=2: step 1 is plain (synchronised) and rank 1 does not reach head b there, which it used on the
# sharpness-aware step 0 (all under no_sync)
INTERVAL_CASES = {
    f"routed_interval_{mode}": dict(sam_interval=2, alpha=1.3, alpha_search_interval=0, sam_perturbation=mode)
    for mode in ("local", "global")
}
# all-reduce calls per step without a search or a log: the engine's against the plain Trainer's
COUNTED = dict(max_steps=4, logging_steps=1000, alpha_search_interval=0, rho=0.3)
COUNTED_CASES = {"count_local": {}, "count_none": dict(sam_method="none")}


class RecordingTrainer(SequentialXSAMTrainer):
    """Keeps every micro-batch it trains on."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append({key: inputs[key].detach().clone() for key in ("x", "labels")})
        return super().training_step(model, inputs, num_items_in_batch)


class InfOnRankOne(RecordingTrainer):
    """Rank 1 alone gets an infinite loss at the ascent point of optimizer step 1."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.state.global_step != getattr(self, "step", None):
            self.step, self.calls = self.state.global_step, 0
        self.calls += 1
        if os.environ["RANK"] == "1" and self.step == 1 and self.calls == 2:
            loss = loss * float("inf")
        return loss


class WeightsAfterEachStep(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights.append(flat(model))


class GradientsAtEachStep(TrainerCallback):
    """The names of the parameters holding a gradient when the optimizer steps, and the all-reduce calls so far."""

    def __init__(self):
        self.graded, self.all_reduces = [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.graded.append({name for name, p in model.named_parameters() if p.grad is not None})

    def on_step_end(self, args, state, control, **kwargs):
        self.all_reduces.append(ALL_REDUCES[0])


ALL_REDUCES = [0]
_all_reduce = torch.distributed.all_reduce


def counting_all_reduce(*args, **kwargs):
    ALL_REDUCES[0] += 1
    return _all_reduce(*args, **kwargs)


def run(
    output_dir: Path,
    resume: str | None = None,
    trainer_class: type = RecordingTrainer,
    model_class: type = TinyClassifier,
    data: dict | None = None,
    **settings,
) -> RecordingTrainer:
    defaults = dict(
        # the paper's rule, which tests/reference.py implements (grid 0..2 with SGD too)
        extrapolate_after_drop=0.0,
        alpha_max=2.0,
        per_device_train_batch_size=2,
        learning_rate=LR,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        ddp_backend="gloo",
        logging_steps=1,
        save_strategy="no",
    )
    args = XSAMTrainingArguments(output_dir=str(output_dir), **{**defaults, **settings})
    model, weights, gradients = model_class(), WeightsAfterEachStep(), GradientsAtEachStep()
    weights.weights = [flat(model)]
    data = make_data(n=N) if data is None else data
    trainer = trainer_class(model=model, args=args, train_dataset=as_dataset(data), callbacks=[weights, gradients])
    trainer.seen, trainer.weights, trainer.gradients = [], weights.weights, gradients
    ALL_REDUCES[0] = 0
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def main(out: Path) -> None:
    rank = int(os.environ["RANK"])
    torch.distributed.all_reduce = counting_all_reduce
    results = {}
    for name, settings in CASES.items():
        trainer = run(out / name, **settings)
        results[name] = {
            "weights": flat(trainer.model),
            "alpha": trainer.xsam.alpha,
            "searches": [s["step"] for s in trainer.xsam.search_history],
            "search_history": trainer.xsam.search_history,
            "seen": trainer.seen,
            "logged_alpha": [e["xsam/alpha"] for e in trainer.state.log_history if "xsam/alpha" in e],
        }
    checkpointed = dict(rho=0.3, max_steps=6, save_strategy="steps", save_steps=3, optim="adamw_torch")
    straight = run(out / "straight", **checkpointed)
    resumed = run(out / "resumed", resume=str(out / "straight" / "checkpoint-3"), **checkpointed)
    results["resume"] = {
        "straight": flat(straight.model),
        "resumed": flat(resumed.model),
        "alphas": (straight.xsam.alpha, resumed.xsam.alpha),
    }
    for optim in ("sgd", "adamw_torch_fused"):
        # a search on the bad step too: every worker must take the same branch
        bad = run(
            out / f"nonfinite-{optim}",
            trainer_class=InfOnRankOne,
            rho=0.3,
            max_steps=3,
            optim=optim,
            alpha_search_interval=1,
        )
        results[f"nonfinite-{optim}"] = {
            "weights": bad.weights,
            "nonfinite": [e["xsam/nonfinite"] for e in bad.state.log_history if "xsam/nonfinite" in e],
        }
    for name, settings in {**ROUTED_CASES, **INTERVAL_CASES}.items():
        trainer = run(out / name, model_class=RoutedClassifier, data=routed_data(ROUTES), **ROUTED, **settings)
        results[name] = {
            "weights": flat(trainer.model),
            "seen": trainer.seen,
            "graded": trainer.gradients.graded,
            "all_reduces": trainer.gradients.all_reduces,
        }
    for name, settings in COUNTED_CASES.items():
        results[name] = run(out / name, **COUNTED, **settings).gradients.all_reduces
    torch.save(results, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
