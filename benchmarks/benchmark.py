#!/usr/bin/env python
"""Speed and memory of XSAM steps against the base optimizer and SAM, measured side by side.

Every configuration gets its own `XSAMTrainer` over its own copy of the same model and the same batch. One
*unit* of a configuration is what the Trainer's inner loop does for one optimizer step (two for
``sam_interval=2``): ``training_step``, gradient clipping, ``optimizer.step``, ``lr_scheduler.step``,
``zero_grad``. After warm-up the configurations run interleaved, in a fresh random order every round, so
that drifting load from other processes hits them alike; the figures are medians over rounds, and each ratio
is the median of per-round ratios (paired). CPU times come from ``perf_counter``, CUDA times from events.

The alpha search runs on few steps (the paper: once per epoch), so the median of a run would hide it: XSAM's step is
timed without it (``xsam-nosearch`` searches on its first, warm-up step only), the search on its own
(``xsam-search`` searches on every step), and the two are combined as ``xsam-amortised``, one search every
``--search-every`` steps. These names are the timed steps'; ``SCHEDULES`` costs configurations of
benchmarks/configs.py (``xsam`` there is the paper's schedule) from them.

Memory runs each configuration in a fresh process (peak RSS is per process): peak RSS or CUDA max
allocated, and the bytes held by live tensors between steps, whose excess over the base optimizer is what
XSAM keeps (its saved weights, and the accumulated direction with gradient accumulation).

On a GPU (``--device cuda``), ``--size base`` is a ViT-Base (86M parameters) built from its config, big enough
for the passes to be compute-bound; ``--bf16`` trains it under bf16 autocast as users would, and the memory
table reports ``torch.cuda.max_memory_allocated`` per configuration. ``benchmarks/gpu_check.sh`` runs it so.

The skip guard (an optimizer step whose direction is not finite is skipped) costs ``sam`` over ``sam-unguarded``
with the default fused AdamW, and ``sam-adamw`` over ``sam-adamw-unguarded`` with a non-fused one (one host read
of the flag per step); both pairs are timed only when named in ``--configs``.

``--reference PATH`` times the XSAM configurations a second time with the ``hf_xsam`` of another checkout (say a
``git worktree`` of the last release) in the same rounds, as ``sam@reference`` and so on, and gives the paired
ratios of this checkout's steps to the reference's: a change to the step measured side by side in one run.

Usage (the README's tables; the GPU check; a change to the step against the commit before it):
    python benchmarks/benchmark.py --rounds 80 --profile --json outputs/benchmark_small.json
    python benchmarks/benchmark.py --size large --rounds 6 --warmup 1 --profile --json outputs/benchmark_large.json
    python benchmarks/benchmark.py --device cuda --bf16 --tasks vit --size base --search-every 400 \
        --configs base sam xsam-nosearch xsam-search --memory-configs base sam xsam-nosearch xsam-search \
        --json outputs/gpu.json
    git worktree add /tmp/before HEAD~1 && python benchmarks/benchmark.py --tasks vit --no-memory \
        --configs base base-2pass sam xsam-nosearch xsam-search --reference /tmp/before

Produces: docs/benchmarks.md (step time and memory; the skip guard; the cheap schedules), docs/search.md (the search's cost), docs/gpu.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import importlib.util
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
from torch.autograd.profiler import record_function
from transformers import Trainer, ViTConfig, ViTForImageClassification
from transformers.utils import logging as hf_logging

import hf_xsam
from hf_xsam import XSAMTrainer, XSAMTrainerMixin
from toy_tasks import SIZES, TASKS, Task, build_task

NEVER = 10**9  # alpha_search_interval that searches on the first step only (done during warm-up)

# name -> (XSAM settings, passes per optimizer step for the plain optimizer, gradient accumulation, steps per unit)
CONFIGS = {
    "base": ({"sam_method": "none"}, 1, 1, 1),
    "base-2pass": ({"sam_method": "none"}, 2, 1, 1),
    "sam": ({"sam_method": "sam"}, 1, 1, 1),
    "xsam-nosearch": ({"sam_method": "xsam", "alpha_search_interval": NEVER}, 1, 1, 1),
    "xsam-search": ({"sam_method": "xsam", "alpha_search_interval": 1}, 1, 1, 1),
    "xsam-search-coarse": (
        {"sam_method": "xsam", "alpha_search_interval": 1, "alpha_search": "coarse_to_fine"},
        1,
        1,
        1,
    ),
    "xsam-interval2": ({"sam_method": "xsam", "alpha_search_interval": NEVER, "sam_interval": 2}, 1, 1, 2),
    "xsam-interval2-reuse": (
        {"sam_method": "xsam", "alpha_search_interval": NEVER, "sam_interval": 2, "sam_reuse": True},
        1,
        1,
        2,
    ),
    "xsam-interval4": ({"sam_method": "xsam", "alpha_search_interval": NEVER, "sam_interval": 4}, 1, 1, 4),
    "xsam-interval4-reuse": (
        {"sam_method": "xsam", "alpha_search_interval": NEVER, "sam_interval": 4, "sam_reuse": True},
        1,
        1,
        4,
    ),
    "sam-k2": ({"sam_method": "sam", "ascent_steps": 2}, 1, 1, 1),
    "asam": ({"sam_method": "sam", "sam_adaptive": True}, 1, 1, 1),
    "xsam-k2": ({"sam_method": "xsam", "alpha_search_interval": NEVER, "ascent_steps": 2}, 1, 1, 1),
    "base-ga2": ({"sam_method": "none"}, 1, 2, 1),
    "xsam-ga2": ({"sam_method": "xsam", "alpha_search_interval": 1}, 1, 2, 1),
    # the skip guard's cost: without it, and with a non-fused AdamW (one host read per step) with and without
    "sam-unguarded": ({"sam_method": "sam"}, 1, 1, 1),
    "sam-adamw": ({"sam_method": "sam", "optim": "adamw_torch"}, 1, 1, 1),
    "sam-adamw-unguarded": ({"sam_method": "sam", "optim": "adamw_torch"}, 1, 1, 1),
}
GUARDED = {"sam": "sam-unguarded", "sam-adamw": "sam-adamw-unguarded"}  # ratios guarded / unguarded
# configurations of benchmarks/configs.py (the studies' names), per step over a whole run: (timed configuration,
# share of plain steps at the start (sam_start_ratio), the search's timed configuration, amortised over
# --search-every steps)
SCHEDULES = {
    "xsam": ("xsam-nosearch", 0.0, "xsam-search"),
    "xsam-c2f": ("xsam-nosearch", 0.0, "xsam-search-coarse"),
    "xsam-late50": ("xsam-nosearch", 0.5, "xsam-search-coarse"),
    "xsam-late75": ("xsam-nosearch", 0.75, "xsam-search-coarse"),
    "xsam-late50-i2": ("xsam-interval2", 0.5, "xsam-search-coarse"),
    "xsam-late50-i2-reuse": ("xsam-interval2-reuse", 0.5, "xsam-search-coarse"),
    "xsam-i2-reuse": ("xsam-interval2-reuse", 0.0, "xsam-search-coarse"),
    "xsam-i4": ("xsam-interval4", 0.0, "xsam-search-coarse"),
    "xsam-i4-reuse": ("xsam-interval4-reuse", 0.0, "xsam-search-coarse"),
}
TIMED = [
    "base",
    "base-2pass",
    "sam",
    "xsam-nosearch",
    "xsam-search",
    "xsam-search-coarse",
    "xsam-interval2",
    "sam-k2",
    "xsam-k2",
]
MEASURED_MEMORY = ["base", "sam", "xsam-search", "base-ga2", "xsam-ga2"]
REFERENCE = "@reference"  # suffix of the configurations run with the reference checkout's hf_xsam
BATCH_SIZE = {
    ("vit", "small"): 64,
    ("vit", "large"): 32,
    ("vit", "base"): 64,
    ("marian", "small"): 32,
    ("marian", "large"): 32,
}
# "base": ViT-Base's transformer (hidden 768, 12 layers, 12 heads, MLP 3072: 86M parameters) on the large
# task's 16x16 digits, one patch per pixel, so that a sequence has 257 tokens as ViT-B/16 has at 256 px
BENCHMARK_SIZES = (*SIZES, "base")
LABELS = ("forward_backward", "forward", "optimizer")


class _LabelledTrainer(Trainer):
    """Marks every forward+backward pass and every loss-only forward in the profiler trace."""

    def training_step(self, *args, **kwargs):
        with record_function("forward_backward"):
            return super().training_step(*args, **kwargs)

    def compute_loss(self, *args, **kwargs):
        with record_function("forward"):
            return super().compute_loss(*args, **kwargs)


class ProfiledXSAMTrainer(XSAMTrainerMixin, _LabelledTrainer):
    """`XSAMTrainer` whose passes show up as labelled ranges (the mixin's ``super()`` reaches the labels)."""


@dataclass
class Runner:
    """One configuration: its trainer, model, batch and how one unit runs."""

    name: str
    trainer: Trainer
    batch: dict[str, torch.Tensor]
    passes: int
    accumulation: int
    steps: int
    before_optimizer: Callable[[], None] | None = None

    def unit(self) -> None:
        """What the Trainer's inner loop does for ``self.steps`` optimizer steps."""
        trainer, model = self.trainer, self.trainer.model
        trainer.current_gradient_accumulation_steps = self.accumulation
        for _ in range(self.steps):
            for micro in range(self.accumulation):
                trainer.accelerator.gradient_state._set_sync_gradients(micro == self.accumulation - 1)
                for _ in range(self.passes):
                    trainer.training_step(model, self.batch)
            if self.before_optimizer is not None:
                self.before_optimizer()
            with record_function("optimizer"):
                trainer.accelerator.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
                trainer.optimizer.step()
                trainer.lr_scheduler.step()
                model.zero_grad()
            trainer.state.global_step += 1


@dataclass(frozen=True)
class Setup:
    """Where and how the steps run: ``device`` "auto" (the Trainer's choice), "cpu" or "cuda"; bf16
    autocast; the batch size (``None``: the size's default)."""

    device: str = "auto"
    bf16: bool = False
    batch_size: int | None = None


def make_task(name: str, size: str, seed: int) -> Task:
    """The toy task ``name`` with a model of ``size`` (one of ``BENCHMARK_SIZES``)."""
    if size != "base":
        return build_task(name, size, seed)
    if name != "vit":
        raise ValueError(f"Invalid size 'base' for task {name!r}: the base preset is a ViT")
    task = build_task("vit", "large", seed)  # its data: 16x16 digits
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=16,
        patch_size=1,
        num_channels=1,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        num_labels=10,
    )
    return dataclasses.replace(task, size="base", model=ViTForImageClassification(config))


def load_reference(path: str) -> ModuleType:
    """The ``hf_xsam`` package of another checkout (``path`` holds its ``hf_xsam/``), as ``hf_xsam_reference``."""
    folder = os.path.join(os.path.abspath(path), "hf_xsam")
    spec = importlib.util.spec_from_file_location(
        "hf_xsam_reference", os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
    )
    if spec is None or not os.path.isdir(folder):
        raise SystemExit(f"--reference {path}: no hf_xsam/ package there")
    package = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = package
    spec.loader.exec_module(package)
    return package


def make_runner(
    task: Task,
    name: str,
    output_dir: str,
    setup: Setup,
    trainer_class: type = XSAMTrainer,
    package: ModuleType = hf_xsam,
) -> Runner:
    settings, passes, accumulation, steps = CONFIGS[name.removesuffix(REFERENCE)]
    if package is not hf_xsam:
        trainer_class = package.XSAMTrainer
    args = package.XSAMTrainingArguments(
        output_dir=output_dir,
        report_to="none",
        learning_rate=1e-4,
        gradient_accumulation_steps=accumulation,
        rho=0.05,
        use_cpu=setup.device == "cpu",
        bf16=setup.bf16,
        **settings,
    )
    if setup.device == "cuda" and args.device.type != "cuda":
        raise RuntimeError(f"--device cuda, but the Trainer runs on {args.device}: is CUDA available?")
    trainer = trainer_class(model=copy.deepcopy(task.model), args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=NEVER)
    batch = task.batch(setup.batch_size or BATCH_SIZE[task.name, task.size])
    runner = Runner(name, trainer, batch, passes, accumulation, steps)
    if name in GUARDED.values():
        runner.unit()  # the first XSAM step guards the optimizer step against non-finite directions: undo that
        trainer.optimizer.step = trainer.optimizer.step.__wrapped__
    return runner


class Clock:
    """Seconds taken by a callable: CUDA events (then one synchronisation) on GPU; on CPU the process's CPU
    time (``"cpu"``: blind to the time other processes take the core from it) or wall time (``"wall"``)."""

    def __init__(self, device: torch.device, kind: str) -> None:
        self.cuda = device.type == "cuda"
        self.now = time.process_time if kind == "cpu" else time.perf_counter

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = self.now()
        fn()
        return self.now() - begin


def time_task(
    task: Task,
    rounds: int,
    warmup: int,
    seed: int,
    clock_kind: str,
    setup: Setup,
    configs: list[str],
    reference: ModuleType | None = None,
) -> dict[str, list[float]]:
    """Seconds per optimizer step of every timed configuration, one value per round.

    With a ``reference`` package, every XSAM configuration (not ``base*``) also runs with it, as ``name@reference``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        runners = [make_runner(task, name, tmp, setup) for name in configs]
        if reference is not None:
            runners += [
                make_runner(task, name + REFERENCE, tmp, setup, package=reference)
                for name in configs
                if not name.startswith("base")
            ]
        clock = Clock(runners[0].trainer.args.device, clock_kind)
        for runner in runners:
            for _ in range(warmup):
                runner.unit()
        times: dict[str, list[float]] = defaultdict(list)
        order = random.Random(seed)
        for _ in range(rounds):
            order.shuffle(runners)
            for runner in runners:
                times[runner.name].append(clock(runner.unit) / runner.steps)
    return dict(times)


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> tuple[float, float, float]:
    """Median and interquartile range of the per-round ratios ``num / den``."""
    ratios = sorted(a / b for a, b in zip(times[num], times[den]))
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    return median, q1, q3


def paired_difference(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median of the per-round differences ``a - b``."""
    return statistics.median(x - y for x, y in zip(times[a], times[b]))


def summarise_times(times: dict[str, list[float]], search_every: int) -> dict:
    """Medians, ratios and the decomposition of a SAM step into passes, optimizer and XSAM arithmetic (paired).

    ``times`` needs "base", "sam", "xsam-nosearch" and "xsam-search"; the figures that need other configurations
    ("base-2pass", "sam-k2", "xsam-k2") are left out when those were not timed.
    """
    times = dict(times)
    for base_name, name in (("xsam-nosearch", "xsam-amortised"), ("xsam-k2", "xsam-k2-amortised")):
        if base_name in times:
            times[name] = [
                t + (search - plain) / search_every
                for t, search, plain in zip(times[base_name], times["xsam-search"], times["xsam-nosearch"])
            ]
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratios = {f"{name}/base": paired_ratio(times, name, "base") for name in times if name != "base"}
    pairs = (("xsam-nosearch", "sam"), ("xsam-amortised", "sam"), ("xsam-k2-amortised", "sam-k2"), ("asam", "sam"))
    for num, den in pairs:
        if num in times and den in times:
            ratios[f"{num}/{den}"] = paired_ratio(times, num, den)
    for guarded, unguarded in GUARDED.items():
        if guarded in times and unguarded in times:
            ratios[f"{guarded}/{unguarded}"] = paired_ratio(times, guarded, unguarded)
    for name in [name for name in times if name + REFERENCE in times]:
        ratios[f"{name}/{name}{REFERENCE}"] = paired_ratio(times, name, name + REFERENCE)
    search_extra = paired_difference(times, "xsam-search", "xsam-nosearch")
    decomposition = {"search": search_extra}
    if "base-2pass" in times:
        one_pass = paired_difference(times, "base-2pass", "base")
        decomposition = {
            "forward_backward_pass": one_pass,
            "optimizer_and_clip": medians["base"] - one_pass,
            "sam_arithmetic": paired_difference(times, "sam", "base-2pass"),
            "search": search_extra,
        }
    return {
        "times_s": times,
        "median_s": medians,
        "ratios": ratios,
        "schedules": schedule_costs(times, search_every),
        "search_every": search_every,
        "decomposition_s": decomposition,
        # one search, in SAM steps (median of per-round (search step - plain step) / SAM step)
        "search_sam_steps": {
            strategy: statistics.median(
                (s - x) / m for s, x, m in zip(times[name], times["xsam-nosearch"], times["sam"])
            )
            for strategy, name in (("grid", "xsam-search"), ("coarse_to_fine", "xsam-search-coarse"))
            if name in times
        },
        # steps between searches for which the amortised search costs at most 2 % of a SAM step
        "search_every_for_2_percent": search_extra / (0.02 * medians["sam"]),
    }


def schedule_costs(times: dict[str, list[float]], search_every: int) -> dict[str, tuple[float, float, float]]:
    """Cost per step of each ``SCHEDULES`` entry whose configurations were timed, over the base step: median and
    interquartile range of the per-round values ``(r base + (1 - r) (step + search / search_every)) / base``."""
    costs = {}
    for name, (config, plain_share, search) in SCHEDULES.items():
        if not all(n in times for n in (config, search, "xsam-nosearch", "base")):
            continue
        per_round = sorted(
            (plain_share * b + (1 - plain_share) * (t + (s - x) / search_every)) / b
            for b, t, s, x in zip(times["base"], times[config], times[search], times["xsam-nosearch"])
        )
        q1, median, q3 = statistics.quantiles(per_round, n=4)
        costs[name] = (median, q1, q3)
    return costs


def live_tensor_bytes(trainer: Trainer) -> int:
    """Bytes of all distinct tensor storages alive now (parameters, gradients, optimizer and XSAM state)."""
    tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    tensors += [p.grad for p in trainer.model.parameters() if p.grad is not None]
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def memory_child(task_name: str, size: str, name: str, seed: int, setup: Setup) -> dict:
    """Runs in a fresh process: a few units of one configuration, then its memory figures.

    Live tensor bytes are sampled between steps (what persists), and at the start of every pass and
    before every optimizer step (what lives while parameter-sized buffers are busy, e.g. during a search).
    """
    task = make_task(task_name, size, seed)
    with tempfile.TemporaryDirectory() as tmp:
        runner = make_runner(task, name, tmp, setup)
        trainer, device = runner.trainer, runner.trainer.args.device
        runner.unit()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        between, during = 0, 0

        def sample() -> None:
            nonlocal during
            during = max(during, live_tensor_bytes(trainer))

        def sampled_compute_loss(*args, **kwargs):
            sample()
            return compute_loss(*args, **kwargs)

        compute_loss = trainer.compute_loss
        trainer.compute_loss = sampled_compute_loss  # every pass and every search forward goes through it
        runner.before_optimizer = sample
        for _ in range(3):
            runner.unit()
            gc.collect()
            between = max(between, live_tensor_bytes(trainer))
        parameters = [p for p in trainer.model.parameters() if p.requires_grad]
        return {
            "config": name,
            "parameter_bytes": sum(p.numel() * p.element_size() for p in parameters),
            "live_tensor_bytes": between,
            "live_tensor_bytes_in_step": max(during, between),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        }


def measure_memory(
    task_name: str, size: str, seed: int, threads: int, setup: Setup, configs: list[str]
) -> dict[str, dict]:
    results = {}
    for name in configs:
        command = [sys.executable, os.path.abspath(__file__), "--memory-child", task_name, size, name]
        command += ["--seed", str(seed), "--threads", str(threads), "--device", setup.device]
        command += ["--bf16"] * setup.bf16 + ["--batch-size", str(setup.batch_size)] * bool(setup.batch_size)
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[name] = json.loads(output.strip().splitlines()[-1])
    return results


def summarise_memory(memory: dict[str, dict]) -> dict:
    parameter_bytes = memory["base"]["parameter_bytes"]
    on_cuda = memory["base"]["cuda_max_allocated_bytes"] is not None
    peak_key = "cuda_max_allocated_bytes" if on_cuda else "peak_rss_bytes"
    rows = {}
    for name, figures in memory.items():
        base = memory["base-ga2" if name.endswith("ga2") else "base"]
        extra = figures["live_tensor_bytes"] - base["live_tensor_bytes"]
        extra_in_step = figures["live_tensor_bytes_in_step"] - base["live_tensor_bytes_in_step"]
        rows[name] = {
            "peak_bytes": figures[peak_key],
            "peak_extra_bytes": figures[peak_key] - base[peak_key],
            "live_extra_bytes": extra,
            "live_extra_parameter_copies": extra / parameter_bytes,
            "live_extra_bytes_in_step": extra_in_step,
            "live_extra_parameter_copies_in_step": extra_in_step / parameter_bytes,
        }
    return {"parameter_bytes": parameter_bytes, "peak": peak_key, "configs": rows}


def profile_step(task: Task, steps: int, setup: Setup) -> dict:
    """Where an XSAM step's time goes outside forward/backward, from the torch profiler's top-level ranges."""
    with tempfile.TemporaryDirectory() as tmp:
        runner = make_runner(task, "xsam-nosearch", tmp, setup, trainer_class=ProfiledXSAMTrainer)
        for _ in range(3):
            runner.unit()
        activities = [torch.profiler.ProfilerActivity.CPU]
        if runner.trainer.args.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as profiler:
            for _ in range(steps):
                with record_function("step"):
                    runner.unit()
    events = profiler.events()
    step_us = sum(e.cpu_time_total for e in events if e.name == "step")
    outside: dict[str, float] = defaultdict(float)
    calls = syncs = 0
    for event in events:
        parent = event.cpu_parent
        if parent is not None and parent.name == "step":
            outside[event.name] += event.cpu_time_total
            calls += event.name not in LABELS
        # reading a tensor value back (.item(), bool(tensor), .tolist()) outside the passes and the optimizer
        labelled = any(a.name in LABELS for a in _ancestors(event))
        syncs += event.name == "aten::_local_scalar_dense" and not labelled
    children = sum(outside.values())
    rest = {name: us for name, us in outside.items() if name not in ("forward_backward", "optimizer")}
    return {
        "steps": steps,
        "step_ms": step_us / steps / 1e3,
        "forward_backward_ms": outside["forward_backward"] / steps / 1e3,
        "optimizer_ms": outside["optimizer"] / steps / 1e3,
        "xsam_ops_ms": sum(rest.values()) / steps / 1e3,
        "python_between_ops_ms": (step_us - children) / steps / 1e3,
        "op_calls_per_step_outside_passes": calls / steps,
        "host_syncs_per_step_outside_passes": syncs / steps,
        "top_ops_outside_passes_ms": {
            name: us / steps / 1e3 for name, us in sorted(rest.items(), key=lambda item: -item[1])[:12]
        },
    }


def _ancestors(event):
    while event.cpu_parent is not None:
        event = event.cpu_parent
        yield event


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def markdown(task_name: str, size: str, timing: dict, memory: dict | None, where: str) -> str:
    medians, ratios = timing["median_s"], timing["ratios"]
    lines = [
        f"### {task_name} ({size}), {where}",
        "",
        "| config | ms / step | / base (IQR) |",
        "| --- | ---: | ---: |",
    ]
    names = [n for n in [*CONFIGS, "xsam-amortised", "xsam-k2-amortised"] if n in medians]
    for name in names + [n + REFERENCE for n in names if n + REFERENCE in medians]:
        if name == "base":
            lines.append(f"| base | {_ms(medians[name])} | 1 |")
            continue
        median, q1, q3 = ratios[f"{name}/base"]
        lines.append(f"| {name} | {_ms(medians[name])} | {median:.3f} ({q1:.3f}-{q3:.3f}) |")
    lines += ["", f"Search amortised over {timing['search_every']} steps."]
    versus_reference = [key for key in ratios if key.endswith(REFERENCE)]
    guards = [f"{guarded}/{unguarded}" for guarded, unguarded in GUARDED.items()]
    for key in (
        "sam/base",
        "xsam-nosearch/sam",
        "xsam-amortised/sam",
        "xsam-k2-amortised/sam-k2",
        "asam/sam",
        *guards,
        *versus_reference,
    ):
        if key in ratios:
            median, q1, q3 = ratios[key]
            lines.append(f"- {key}: {median:.3f} (IQR {q1:.3f}-{q3:.3f})")
    parts = timing["decomposition_s"]
    passes = ""
    if "forward_backward_pass" in parts:
        passes = (
            f"one forward+backward pass {_ms(parts['forward_backward_pass'])} ms, optimizer+clip "
            f"{_ms(parts['optimizer_and_clip'])} ms, SAM arithmetic {_ms(parts['sam_arithmetic'])} ms, "
        )
    lines.append(
        f"- {passes}one search {_ms(parts['search'])} ms (<= 2 % of a SAM step when searching every "
        f">= {timing['search_every_for_2_percent']:.0f} steps)"
    )
    cost = ", ".join(f"{value:.2f} ({name})" for name, value in timing["search_sam_steps"].items())
    lines.append(f"- one search costs, in SAM steps: {cost}")
    if timing["schedules"]:
        lines += ["", f"Schedules, per step over a run (search every {timing['search_every']} steps):", ""]
        lines += ["| schedule | cost per step / base (IQR) |", "| --- | ---: |"]
        for name, (median, q1, q3) in timing["schedules"].items():
            lines.append(f"| {name} | {median:.3f} ({q1:.3f}-{q3:.3f}) |")
    if memory is not None:
        mib = 2**20
        lines += [
            "",
            f"Trainable parameters: {memory['parameter_bytes'] / mib:.2f} MiB; peak = {memory['peak']}.",
            "",
            "| config | peak MiB | peak - base MiB | extra between steps MiB (parameter copies) "
            "| extra within a step MiB (parameter copies) |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name, row in memory["configs"].items():
            lines.append(
                f"| {name} | {row['peak_bytes'] / mib:.1f} | {row['peak_extra_bytes'] / mib:.1f} | "
                f"{row['live_extra_bytes'] / mib:.2f} ({row['live_extra_parameter_copies']:.2f}) | "
                f"{row['live_extra_bytes_in_step'] / mib:.2f} ({row['live_extra_parameter_copies_in_step']:.2f}) |"
            )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument(
        "--size", choices=BENCHMARK_SIZES, default="small", help="model configuration ('base': ViT-Base, vit only)"
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train (auto: the Trainer's choice)"
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast, as `--bf16` of the Trainer")
    parser.add_argument("--batch-size", type=int, help="examples per step (default: per task and size)")
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=list(CONFIGS),
        default=TIMED,
        help="timed configurations (at least base sam xsam-nosearch xsam-search)",
    )
    parser.add_argument(
        "--memory-configs",
        nargs="+",
        choices=list(CONFIGS),
        default=MEASURED_MEMORY,
        help="configurations whose memory is measured (base at least; base-ga2 for the -ga2 ones)",
    )
    parser.add_argument("--rounds", type=int, default=60, help="timed rounds (one unit per configuration each)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed units per configuration first")
    parser.add_argument("--search-every", type=int, default=200, help="steps between alpha searches, amortised")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on a shared CPU)")
    parser.add_argument(
        "--clock", choices=("cpu", "wall"), default="cpu", help="CPU timing: process CPU time or wall time"
    )
    parser.add_argument(
        "--reference", metavar="PATH", help="also time the XSAM configurations with the hf_xsam of this checkout"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    parser.add_argument("--profile", action="store_true", help="profile XSAM steps with torch.profiler")
    parser.add_argument("--json", help="write all results to this JSON file")
    parser.add_argument("--memory-child", nargs=3, metavar=("TASK", "SIZE", "CONFIG"), help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    setup = Setup(args.device, args.bf16, args.batch_size)
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child, args.seed, setup)))
        return
    on_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    where = f"{torch.cuda.get_device_name()}, CUDA events" if on_cuda else f"CPU, {args.threads} thread(s)"
    where += ", bf16 autocast" if args.bf16 else ", fp32"
    where += "" if on_cuda else f", {args.clock} clock"
    results = {"settings": vars(args), "torch": torch.__version__, "device": where, "tasks": {}}
    reference = load_reference(args.reference) if args.reference else None
    for task_name in args.tasks:
        task = make_task(task_name, args.size, args.seed)
        results["tasks"][task_name] = {"parameters": sum(p.numel() for p in task.model.parameters())}
        times = time_task(task, args.rounds, args.warmup, args.seed, args.clock, setup, args.configs, reference)
        timing = summarise_times(times, args.search_every)
        memory = None
        if not args.no_memory:
            memory = summarise_memory(
                measure_memory(task_name, args.size, args.seed, args.threads, setup, args.memory_configs)
            )
        results["tasks"][task_name].update(timing=timing, memory=memory)
        if args.profile:
            results["tasks"][task_name]["profile"] = profile_step(task, steps=10, setup=setup)
        parameters = results["tasks"][task_name]["parameters"] / 1e6
        print(markdown(task_name, args.size, timing, memory, f"{parameters:.1f}M parameters, {where}"), flush=True)
        if args.profile:
            print(json.dumps(results["tasks"][task_name]["profile"], indent=2), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
