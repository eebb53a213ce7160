"""The ascent of a sharpness-aware step: how it climbs from ``w0`` towards the worst nearby point.

An ascent moves the weights one step of a given radius along the gradient, in its own geometry, and says how far
that step went in Euclidean terms. The engine climbs ``k`` such steps of ``rho / k``; the Euclidean length of the
climb sets the stall test (a climb that moved the weights less than half a step) and, scaled by
``rho_max / rho``, the radius of the alpha search. The plane of the direction stays Euclidean, so that alpha 1 is
the gradient at the ascent point, as every SAM variant steps (``docs/method.md``, "Adding a step rule").

- :class:`EuclideanAscent` (SAM's): ``w <- w + r g / ||g||``; the step's length is ``r``.
- :class:`AdaptiveAscent` (ASAM's, Kwon et al., ICML 2021): with ``T = |w0| + eta`` elementwise,
  ``w <- w + r T^2 g / ||T g||``, the Euclidean step in the geometry where ``T`` is the unit of each weight.

Example:
    >>> import torch
    >>> from hf_xsam.ascent import AdaptiveAscent, EuclideanAscent
    >>> from hf_xsam.geometry import global_norms
    >>> w0, g = [torch.tensor([2.0, 0.0])], [torch.tensor([1.0, 1.0])]
    >>> w = [w0[0].clone()]
    >>> norm, length = AdaptiveAscent(eta=0.0).climb_(w, w0, g, 0.5, global_norms, 1e-12)
    >>> w, float(norm), float(length)  # T = (2, 0): only the first weight moves, by 0.5 * 4 / 2
    ([tensor([3., 0.])], 2.0, 1.0)
    >>> w = [w0[0].clone()]
    >>> norm, length = EuclideanAscent().climb_(w, w0, g, 0.5, global_norms, 1e-12)
    >>> [round(x, 4) for x in w[0].tolist()], length
    ([2.3536, 0.3536], 0.5)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .geometry import add_scaled_

__all__ = ["Ascent", "EuclideanAscent", "AdaptiveAscent", "ASCENTS", "Norms"]

Norms = Callable[..., Tensor]
"""``norms(*lists)``: the norm of each list of tensors taken as one vector (over the shards, with FSDP2)."""


@dataclass(frozen=True)
class Ascent:
    """How a sharpness-aware step climbs. Subclasses implement :meth:`climb_`.

    Attributes:
        settings: the ``XSAMConfig`` fields the ascent reads, beyond every sharpness-aware step's (the card lists
            them).
        card: what the model card adds to the rule's sentence ("" for the plain ascent).
        tags: the Hub tags the ascent adds.
    """

    settings: tuple[str, ...] = ()
    card: str = ""
    tags: tuple[str, ...] = ()

    def climb_(
        self, params: list[Tensor], saved: list[Tensor], grads: list[Tensor], radius: float, norms: Norms, eps: float
    ) -> tuple[Tensor, Tensor | float]:
        """Move ``params`` one step of ``radius`` along ``grads`` (the gradient at ``params``), in place.

        ``saved`` holds ``w0``; ``grads`` is left as it was or scaled by a positive number. Returns the norm that
        normalised the step (non-finite when the gradient was; the step then does not move the weights) and the
        step's Euclidean length.
        """
        raise NotImplementedError

    def search_radius(self, config: Any, length: Tensor | float) -> Tensor | float:
        """The Euclidean radius of the alpha search, given the Euclidean ``length`` of the whole climb: the climb's
        length scaled by ``rho_max / rho``."""
        return config.search_radius * length / config.rho


@dataclass(frozen=True)
class EuclideanAscent(Ascent):
    """SAM's ascent: ``w <- w + r g / ||g||`` (``settings`` empty: it reads only ``rho`` and ``sam_eps``)."""

    def climb_(
        self, params: list[Tensor], saved: list[Tensor], grads: list[Tensor], radius: float, norms: Norms, eps: float
    ) -> tuple[Tensor, float]:
        (norm,) = norms(grads)
        scale = radius / (norm + eps)
        add_scaled_(params, grads, torch.where(torch.isfinite(norm), scale, 0.0))
        return norm, radius

    def search_radius(self, config: Any, length: Tensor | float) -> float:
        """``rho_max`` itself: each step is ``rho / k`` long."""
        return config.search_radius


@dataclass(frozen=True)
class AdaptiveAscent(Ascent):
    """ASAM's ascent: ``w <- w + r T^2 g / ||T g||`` with ``T = |w0| + eta`` on every parameter.

    ``T`` is taken at the step's start ``w0`` for every one of the ``k`` steps. The step needs two
    parameter-sized temporaries (``T`` and ``T g``), freed when it returns.
    """

    eta: float = 0.01
    settings: tuple[str, ...] = ("sam_adaptive", "sam_adaptive_eta")
    card: str = (
        "; the ascent is adaptive (ASAM, Kwon et al. 2021): each weight's step is scaled by `|w| + sam_adaptive_eta`"
        " twice, and `rho` is a radius in that scaled geometry"
    )
    tags: tuple[str, ...] = ("asam",)

    def climb_(
        self, params: list[Tensor], saved: list[Tensor], grads: list[Tensor], radius: float, norms: Norms, eps: float
    ) -> tuple[Tensor, Tensor]:
        step = torch._foreach_abs(saved)
        torch._foreach_add_(step, self.eta)  # T
        scaled_grads = torch._foreach_mul(step, grads)  # T g
        torch._foreach_mul_(step, scaled_grads)  # T^2 g
        scaled_norm, step_norm = norms(scaled_grads, step)
        scale = radius / (scaled_norm + eps)
        add_scaled_(params, step, torch.where(torch.isfinite(scaled_norm), scale, 0.0))
        return scaled_norm, step_norm * scale


ASCENTS: tuple[Ascent, ...] = (EuclideanAscent(), AdaptiveAscent())
"""One of each ascent a setting can pick (their tags and card sentences do not depend on their parameters)."""
