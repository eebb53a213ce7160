"""Runs under ``torchrun --nproc_per_node 2``: the XSAM engine on an FSDP2-sharded model (gloo).

The Trainer cannot be put in FSDP mode on CPU (Accelerate enables FSDP only on accelerators), so this
drives the engine the way the Trainer does under FSDP: every backward reduce-scatters (the "global"
perturbation), norms and dot products are summed over the shards.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from helpers import TinyClassifier, make_data
from hf_xsam import XSAM
from hf_xsam.distributed import all_reduce_mean_

STEPS, BATCH, LR = 4, 2, 0.5
# the settings of each run beyond the shared ones; "asam": ASAM's ascent on the shards (|w0| of the local shard, the
# norms ||T g|| and ||T^2 g|| summed over the shards)
RUNS = {"xsam": {}, "asam": dict(sam_adaptive=True, sam_adaptive_eta=0.05)}


def train(world: int, rank: int, **settings) -> dict:
    model = TinyClassifier()
    fully_shard(model)
    data = make_data(n=STEPS * BATCH * world)
    engine = XSAM(
        model.parameters(),
        rho=0.3,
        alpha_search_interval=2,
        extrapolate_after_drop=0.0,  # the paper's rule, which the test's reference implements
        modules=model.modules(),
        reduce_losses=lambda losses: all_reduce_mean_([losses]),
        sam_perturbation="global",
        **settings,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        start = (step * world + rank) * BATCH
        batch = {key: value[start : start + BATCH] for key, value in data.items()}

        def forward_backward():
            loss = model(**batch)["loss"]
            loss.backward()
            return loss.detach()

        optimizer.zero_grad()
        engine.step(forward_backward, lambda: model(**batch)["loss"], step=step)
        optimizer.step()
    weights = torch.cat([p.full_tensor().reshape(-1) for p in model.parameters()])
    return {
        "weights": weights,
        "alpha": engine.alpha,
        "sharded": engine.sharded,
        "local_numel": sum(p.to_local().numel() for p in model.parameters()),
    }


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {name: train(world, rank, **settings) for name, settings in RUNS.items()}
    torch.save(results, out / f"fsdp_rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
