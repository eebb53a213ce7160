"""A straightforward float64 implementation of the method (docs/method.md) on one flat parameter vector.

It shares no code with hf_xsam: the tests hold the package to this independent reading of the spec.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Loss = Callable[[torch.Tensor], torch.Tensor]


def gradient(loss: Loss, w: torch.Tensor) -> torch.Tensor:
    w = w.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(w), w)
    return g


def slerp(v0: torch.Tensor, v1: torch.Tensor, theta: float, alpha: float) -> torch.Tensor:
    if math.sin(theta) <= 1e-3:
        return v1
    return (math.sin((1 - alpha) * theta) * v0 + math.sin(alpha * theta) * v1) / math.sin(theta)


def xsam_direction(
    loss: Loss,
    w0: torch.Tensor,
    *,
    rho: float,
    k: int = 1,
    alpha: float = 1.0,
    search: bool = False,
    rho_max: float | None = None,
    alpha_max: float = 2.0,
    alpha_step: float = 0.1,
    eps: float = 1e-12,
    cap_at_one: bool = False,
    adaptive_eta: float | None = None,
) -> tuple[torch.Tensor, float, list[float]]:
    """The XSAM update direction at ``w0``, the alpha used and the search losses (empty without search).

    ``cap_at_one``: a searched alpha above 1 becomes the grid point at or below 1 with the largest finite loss
    (hf_xsam's ``extrapolate_after_drop`` before the loss has fallen enough).

    ``adaptive_eta``: ASAM's ascent (Kwon et al., 2021) with ``T = |w0| + adaptive_eta``: each of the ``k`` steps is
    ``(rho / k) T^2 g / ||T g||``; the plane stays Euclidean and the search radius is the Euclidean length of the
    climb (the sum of its steps' lengths) times ``rho_max / rho``.
    """
    w0 = w0.double()
    w = w0.clone()
    climbed = 0.0
    for _ in range(k):
        g = gradient(loss, w)
        if adaptive_eta is None:
            ascent = (rho / k) * g / (g.norm() + eps)
        else:
            t = w0.abs() + adaptive_eta
            ascent = (rho / k) * t * t * g / ((t * g).norm() + eps)
        climbed += float(ascent.norm())
        w = w + ascent
    g_k = gradient(loss, w)
    v0 = (w - w0) / (w - w0).norm()
    v1 = g_k / g_k.norm()
    theta = math.acos(max(-1.0, min(1.0, float(v0 @ v1))))
    losses: list[float] = []
    if search:
        rho_max = 2 * rho if rho_max is None else rho_max
        if adaptive_eta is not None:
            rho_max = rho_max * climbed / rho
        grid = [i * alpha_step for i in range(int(round(alpha_max / alpha_step)) + 1)]
        with torch.no_grad():
            losses = [float(loss(w0 + rho_max * slerp(v0, v1, theta, a))) for a in grid]
        alpha = grid[losses.index(max(losses))]
        if cap_at_one and alpha > 1:
            at_most_one = [(loss, a) for loss, a in zip(losses, grid) if a <= 1 + 1e-9 and math.isfinite(loss)]
            alpha = max(at_most_one)[1]
    return g_k.norm() * slerp(v0, v1, theta, alpha), alpha, losses


def sgd_step(w: torch.Tensor, direction: torch.Tensor, lr: float) -> torch.Tensor:
    return w - lr * direction


def orthogonal_part(direction: torch.Tensor, first_gradient: torch.Tensor) -> torch.Tensor:
    """The part of a sharpness-aware direction orthogonal to its step's first gradient, divided by that gradient's
    norm (what ``sam_reuse`` keeps: its norm is the orthogonal part's size relative to the gradient)."""
    g = first_gradient.double()
    return (direction - (direction @ g) / (g @ g) * g) / g.norm()


def reused_direction(grad: torch.Tensor, kept: torch.Tensor, scale: float) -> torch.Tensor:
    """The plain-step direction: ``g + min(scale, ||kept||) ||g|| / ||kept|| kept`` (``g`` alone when nothing is
    kept): LookSAM's ``scale ||g||``, but never more, relative to ``g``, than the orthogonal part measured."""
    if float(kept.norm()) == 0.0:
        return grad
    return grad + min(scale, float(kept.norm())) * grad.norm() / kept.norm() * kept
