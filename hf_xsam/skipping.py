"""Skipping an optimizer step whose gradient is non-finite, when no gradient scaler does it.

With fp16 the GradScaler skips a step whose gradients hold an inf or a NaN. In fp32 and bf16 nothing does, and
one non-finite pass at the ascent point would turn every weight and the optimizer state into NaN. Fused torch
optimizers (``adamw_torch_fused``, the Trainer's default) read a ``found_inf`` tensor and skip on the device,
with no host sync; other optimizers cost one host sync per optimizer step.

Example:
    >>> import torch
    >>> from hf_xsam.skipping import step_unless
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> optimizer = torch.optim.AdamW([w], lr=0.1, fused=True)
    >>> w.grad = torch.tensor([float("nan"), 1.0])
    >>> step_unless(optimizer, torch.tensor(True), optimizer.step)
    >>> w.tolist(), optimizer.state[w]["step"].item()  # untouched, the state too
    ([1.0, 1.0], 0.0)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from .geometry import sum_dtype

__all__ = ["nonfinite", "step_unless", "guard_optimizer_step"]


def nonfinite(tensors: list[Tensor]) -> Tensor:
    """A 0-dim bool tensor: whether any of ``tensors`` holds an inf or a NaN (no host sync).

    >>> nonfinite([torch.ones(2), torch.tensor([1.0, float("inf")])]).item(), nonfinite([]).item()
    (True, False)
    """
    if not tensors:
        return torch.tensor(False)
    norms = torch._foreach_norm(tensors, 2, dtype=sum_dtype(tensors))
    if isinstance(norms[0], DTensor):  # sharded (FSDP2): the full norms, the same on every worker
        norms = [norm.full_tensor() for norm in norms]
    return ~torch.isfinite(torch.stack(norms)).all()


def step_unless(optimizer: torch.optim.Optimizer, skip: Tensor, step: Callable[[], Any]) -> Any:
    """Run ``step`` (the optimizer's step) unless the 0-dim bool tensor ``skip`` is true.

    A skipped step leaves the weights and the optimizer state as they were.
    """
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        # fused kernels skip the whole update (and undo their step count) where found_inf is 1
        optimizer.found_inf = skip.to(torch.float32)
        try:
            return step()
        finally:
            del optimizer.found_inf
    if skip.item():
        return None
    return step()


def guard_optimizer_step(optimizer: Any, take_skip: Callable[[], Tensor | None]) -> None:
    """Make ``optimizer.step`` (an Accelerate-wrapped optimizer) ask ``take_skip()`` before stepping.

    ``take_skip`` returns the skip flag of the step about to run, or None for a step that needs no check.
    Installing twice on one optimizer is a no-op.
    """
    if getattr(optimizer, "_xsam_guarded", False):
        return
    plain_step = optimizer.step
    inner = getattr(optimizer, "optimizer", optimizer)

    @functools.wraps(plain_step)  # keeps the marks an LR scheduler put on the step it wrapped
    def step(*args: Any, **kwargs: Any) -> Any:
        skip = take_skip()
        if skip is None:
            return plain_step(*args, **kwargs)
        return step_unless(inner, skip, lambda: plain_step(*args, **kwargs))

    optimizer.step = step
    optimizer._xsam_guarded = True
