"""Data-parallel cost of XSAM: per-step time and bytes all-reduced, plain DDP vs "local" vs "global".

Run on several processes (CPU: gloo), e.g.::

    torchrun --nproc_per_node 2 benchmarks/benchmark_ddp.py --steps 10 --rounds 3 --hidden_size 128

Each configuration trains the same ViT (built from a config, random 32x32 images) with XSAMTrainer;
the time of every optimizer step is taken between `on_step_begin` and `on_step_end`, and every byte
that goes through an all-reduce is counted: DDP's own buckets through a communication hook, the
engine's directly, both through a counting `torch.distributed.all_reduce`. Rank 0 prints a table and writes JSON.

Produces: docs/distributed.md (the cost of DDP "local" and "global").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from datasets import Dataset
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel
from transformers import TrainerCallback, ViTConfig, ViTForImageClassification

from hf_xsam import XSAMTrainer, XSAMTrainingArguments

CONFIGURATIONS = {
    "plain DDP (none)": dict(sam_method="none"),
    "XSAM local": dict(sam_method="xsam", sam_perturbation="local"),
    "XSAM global": dict(sam_method="xsam", sam_perturbation="global"),
}


def dist_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


class ByteCounter:
    """Counts the bytes every all-reduce of this process sends in, by whoever calls it."""

    def __init__(self) -> None:
        self.bytes = 0
        self._all_reduce = dist.all_reduce

    def install(self) -> None:
        def counting_all_reduce(tensor, *args, **kwargs):
            self.bytes += tensor.numel() * tensor.element_size()
            return self._all_reduce(tensor, *args, **kwargs)

        dist.all_reduce = counting_all_reduce

    @staticmethod
    def ddp_hook(state, bucket):
        # DDP's default reduction, routed through `torch.distributed.all_reduce`, where it is counted
        return allreduce_hook(state, bucket)


class StepTimer(TrainerCallback):
    """Times optimizer steps and the bytes they all-reduce, past the first ``skip`` of each run."""

    def __init__(self, counter: ByteCounter) -> None:
        self.counter, self.times, self.bytes, self.skip = counter, [], [], 0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start, self._bytes = time.perf_counter(), self.counter.bytes

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step > self.skip:
            self.times.append(time.perf_counter() - self._start)
            self.bytes.append(self.counter.bytes - self._bytes)


class HookedTrainer(XSAMTrainer):
    """Registers the byte-counting hook on the DDP wrapper the first time it sees it."""

    counter: ByteCounter

    def training_step(self, model, inputs, num_items_in_batch=None):
        if isinstance(model, DistributedDataParallel) and not getattr(model, "_counted", False):
            model.register_comm_hook(None, self.counter.ddp_hook)
            model._counted = True
        return super().training_step(model, inputs, num_items_in_batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--json", default="benchmark_ddp.json")
    options = parser.parse_args()

    counter = ByteCounter()
    counter.install()
    generator = torch.Generator().manual_seed(0)
    n = options.batch_size * dist_world_size() * (options.steps + options.warmup)
    data = Dataset.from_dict(
        {
            "pixel_values": torch.randn(n, 3, 32, 32, generator=generator).numpy(),
            "labels": torch.randint(0, 10, (n,)).numpy(),
        }
    ).with_format("torch")
    config = ViTConfig(
        image_size=32,
        patch_size=4,
        hidden_size=options.hidden_size,
        num_hidden_layers=options.layers,
        num_attention_heads=4,
        intermediate_size=4 * options.hidden_size,
        num_labels=10,
    )
    timers = {name: StepTimer(counter) for name in CONFIGURATIONS}
    parameters = 0
    # rounds of every configuration in turn, so that a busy machine slows them alike
    for _ in range(options.rounds):
        for name, settings in CONFIGURATIONS.items():
            args = XSAMTrainingArguments(
                output_dir="/tmp/benchmark_ddp",
                per_device_train_batch_size=options.batch_size,
                max_steps=options.steps + options.warmup,
                report_to="none",
                disable_tqdm=True,
                use_cpu=True,
                ddp_backend="gloo",
                ddp_find_unused_parameters=False,
                save_strategy="no",
                logging_strategy="no",
                alpha_search_interval=0,
                seed=0,
                **settings,
            )
            torch.manual_seed(0)
            timer = timers[name]
            timer.skip = options.warmup
            trainer = HookedTrainer(
                model=ViTForImageClassification(config), args=args, train_dataset=data, callbacks=[timer]
            )
            trainer.counter = counter
            trainer.train()
            parameters = sum(p.numel() for p in trainer.model.parameters())
    results = {
        name: {
            "median_step_s": statistics.median(timer.times),
            "bytes_per_step": statistics.median(timer.bytes),
            "parameter_bytes": parameters * 4,
            "steps_timed": len(timer.times),
        }
        for name, timer in timers.items()
    }
    if dist.get_rank() == 0:
        base = results["plain DDP (none)"]
        print(
            f"{dist.get_world_size()} processes, ViT hidden {options.hidden_size} x {options.layers} layers, "
            f"{base['parameter_bytes'] / 2**20:.2f} MiB of fp32 parameters"
        )
        print("| configuration | median step (s) | vs plain DDP | all-reduced per step (MiB) | vs plain DDP |")
        print("| --- | --- | --- | --- | --- |")
        for name, r in results.items():
            print(
                f"| {name} | {r['median_step_s']:.4f} | {r['median_step_s'] / base['median_step_s']:.2f} | "
                f"{r['bytes_per_step'] / 2**20:.2f} | {r['bytes_per_step'] / base['bytes_per_step']:.2f} |"
            )
        with open(options.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
