"""``sam_reuse``: the part of the last sharpness-aware direction orthogonal to its first gradient, kept for the
plain steps in between (LookSAM's rule, Liu et al., CVPR 2022, with a cap; docs/method.md, "Cheap schedules").

Example:
    >>> import torch
    >>> from hf_xsam.parameters import Mode, ParameterSet
    >>> from hf_xsam.reuse import KeptDirection
    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> kept = KeptDirection(ParameterSet([w], Mode.SINGLE), scale=0.7, eps=1e-12)
    >>> first, direction = [torch.tensor([2.0, 0.0])], [torch.tensor([2.0, 1.0])]
    >>> kept.keep_([w], direction, first, torch.tensor(2.0))  # the orthogonal part (0, 1), over ||g0|| = 2
    >>> kept.close_step_(kept.buffers([w]), torch.tensor(False))
    >>> w.grad = torch.tensor([0.0, 4.0])
    >>> kept.apply_()  # g + min(0.7, 0.5) ||g|| / 0.5 (0, 0.5)
    >>> w.grad.tolist()
    [0.0, 6.0]
"""

from __future__ import annotations

import torch
from torch import Tensor

from .geometry import add_scaled_, addcmul_scaled_
from .parameters import ParameterSet

__all__ = ["KeptDirection"]


class KeptDirection:
    """The kept direction ``k = d_perp / ||g0||`` of the last sharpness-aware step, in the ``reused`` buffers.

    Args:
        parameters: the step's parameters (the buffers live there).
        scale: ``sam_reuse_scale``, the largest size of the reused part relative to the gradient.
        eps: ``sam_eps``.
    """

    def __init__(self, parameters: ParameterSet, scale: float, eps: float) -> None:
        self.parameters = parameters
        self.scale = scale
        self.eps = eps
        self._fresh = True  # the next sharpness-aware micro-batch starts a new kept direction
        self._micro_batches = 0  # the micro-batches summed into the kept direction (it keeps their mean)

    def buffers(self, owners: list[Tensor]) -> list[Tensor]:
        return self.parameters.buffers("reused", owners)

    def keep_(self, owners: list[Tensor], direction: list[Tensor], first: list[Tensor], first_norm: Tensor) -> None:
        """Add the part of this micro-batch's ``direction`` orthogonal to its first gradient, divided by that
        gradient's norm ``first_norm``; ``first`` is that gradient or a positive multiple of it (scratch: its pass is
        over). The first micro-batch of a step starts the kept direction anew."""
        parameters = self.parameters
        if self._fresh:
            parameters.zero_buffers_("reused")
            self._micro_batches = 0
        self._fresh = False
        self._micro_batches += 1
        # first <- direction - <direction, first> / ||first||^2 first, the orthogonal part, then divided by ||g0||:
        # measured against the gradient it was orthogonal to
        scaled_norm = parameters.norm(first)
        torch._foreach_mul_(first, -parameters.dot(direction, first) / (scaled_norm.square() + self.eps))
        torch._foreach_add_(first, direction)
        add_scaled_(self.buffers(owners), first, 1.0 / (first_norm + self.eps))

    def close_step_(self, kept: list[Tensor], skip: Tensor) -> None:
        """The step's last micro-batch: ``kept`` (summed, and averaged over the workers) becomes the mean over the
        step's micro-batches; a skipped step leaves nothing to reuse."""
        self._fresh = True
        if not kept:
            return
        # NaN * 0 is NaN, hence nan_to_num
        torch._foreach_mul_(kept, (~skip).to(kept[0].dtype) / max(self._micro_batches, 1))
        for tensor in kept:
            tensor.nan_to_num_(0.0, 0.0, 0.0)

    @torch.no_grad()
    def apply_(self) -> None:
        """On a plain step: ``g <- g + min(scale, ||k||) ||g|| / ||k|| k`` in ``p.grad``.

        The reused part is LookSAM's (``scale`` times the gradient's norm), but never larger, relative to the
        gradient, than the sharpness-aware step measured it: where theta is tiny the orthogonal part is mostly noise,
        and lifting it to ``0.7 ||g||`` for several steps can stall what the base optimizer trains. Before the first
        sharpness-aware step, and after one that was skipped as non-finite, it is zero and the step stays plain.
        """
        parameters = self.parameters
        owners = parameters.with_gradient()
        if not parameters.has_buffers("reused") or not owners:
            return
        grads = parameters.gradients(owners)
        kept = self.buffers(owners)
        grad_norm, kept_norm = parameters.norms(grads, kept)
        size = torch.clamp(kept_norm, max=self.scale)
        addcmul_scaled_(grads, kept, size * grad_norm / (kept_norm + self.eps))
