"""Probing the loss around the current weights: the maximum in the rho-ball, the XSAM and SAM directions on a
batch, and 2-D slices of the landscape. Used by ``direction_quality.py``; not on any training path.

Perturbations and directions are flat vectors over the trainable parameters (in ``parameters()`` order).

Example:
    >>> import torch
    >>> from diagnostics import ball_maximum, cosine
    >>> b = torch.tensor([3.0, 4.0])
    >>> e, loss = ball_maximum(lambda e: (float(b @ e), b.clone()), radius=1.0, starts=[torch.zeros(2)])
    >>> round(cosine(e, b), 6), round(loss, 4)
    (1.0, 5.0)

Produces: docs/diagnostics.md (the pictures of a run).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from hf_xsam.engine import XSAM, XSAMStepStats

__all__ = ["cosine", "LossProbe", "ball_maximum", "engine_direction", "plane_basis", "plane_slice"]

LossAndGrad = Callable[[Tensor], tuple[float, Tensor]]


def cosine(x: Tensor, y: Tensor, eps: float = 1e-12) -> float:
    """Cosine of the angle between two flat vectors, computed in float64."""
    x, y = x.double(), y.double()
    return float(x @ y / (x.norm() * y.norm() + eps))


class LossProbe:
    """The loss of ``model`` on one fixed ``batch`` at ``w0 + e``, for flat perturbations ``e`` of the weights.

    ``w0`` is the weights at construction; every call puts them back exactly. Put the model in eval mode
    first if the loss must be a deterministic function of the weights (dropout).

    Args:
        model: a model whose output has a ``loss`` (Hugging Face models given ``labels``).
        batch: keyword arguments of the model's forward.
    """

    def __init__(self, model: nn.Module, batch: dict[str, Any]) -> None:
        self.model = model
        self.batch = batch
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.w0 = [p.detach().clone() for p in self.params]
        self.shapes = [p.shape for p in self.params]
        self.numel = sum(p.numel() for p in self.params)

    def split(self, flat: Tensor) -> list[Tensor]:
        """A flat vector as a list of tensors shaped like the parameters."""
        return [chunk.view(shape) for chunk, shape in zip(flat.split([s.numel() for s in self.shapes]), self.shapes)]

    @contextmanager
    def at(self, e: Tensor | None) -> Iterator[None]:
        """Weights at ``w0 + e`` inside the block, exactly ``w0`` after it."""
        with torch.no_grad():
            if e is not None:
                perturbation = self.split(e.to(self.w0[0]))
                torch._foreach_add_(self.params, perturbation)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.w0)

    def forward_loss(self) -> Tensor:
        """The batch loss at the weights as they are now (with autograd if the caller enables it)."""
        return self.model(**self.batch).loss

    def loss(self, e: Tensor | None = None) -> float:
        """The batch loss at ``w0 + e``."""
        with self.at(e), torch.no_grad():
            return float(self.forward_loss())

    def loss_and_grad(self, e: Tensor | None = None) -> tuple[float, Tensor]:
        """The batch loss at ``w0 + e`` and its gradient as a flat float32 vector (``.grad`` left untouched)."""
        with self.at(e), torch.enable_grad():
            loss = self.forward_loss()
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        flat = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]
        return float(loss.detach()), torch.cat([g.reshape(-1).float() for g in flat])


@torch.no_grad()
def ball_maximum(
    loss_and_grad: LossAndGrad, radius: float, starts: list[Tensor], steps: int = 100
) -> tuple[Tensor, float]:
    """Largest loss found in the ball ``||e|| <= radius`` by projected, normalised gradient ascent.

    From each start, ``steps`` steps ``e <- P(e + eta_t g / ||g||)`` with ``eta_t`` decaying linearly from
    ``radius / 2`` to ``radius / (2 steps)`` and ``P`` the projection onto the ball. Every visited point
    counts; the best one over all starts is returned.

    Args:
        loss_and_grad: ``e -> (loss, gradient)`` at ``w0 + e``.
        radius: radius of the ball.
        starts: initial perturbations (projected onto the ball first).
        steps: ascent steps per start.

    Returns:
        The best perturbation and its loss.
    """
    best_e, best_loss = starts[0], -math.inf
    for start in starts:
        e = _project(start.clone().float(), radius)
        for t in range(steps + 1):
            loss, grad = loss_and_grad(e)
            if loss > best_loss:
                best_e, best_loss = e.clone(), loss
            if t == steps:
                break
            eta = radius * (steps - t) / (2 * steps)
            e = _project(e + eta * grad / (grad.norm() + 1e-12), radius)
    return best_e, best_loss


def _project(e: Tensor, radius: float) -> Tensor:
    norm = float(e.norm())
    return e * (radius / norm) if norm > radius else e


def engine_direction(probe: LossProbe, *, step: int = 0, **xsam_settings: Any) -> tuple[Tensor, XSAM, XSAMStepStats]:
    """The direction a fresh :class:`~hf_xsam.XSAM` engine leaves in ``.grad`` for the probe's batch at ``w0``.

    With ``alpha_search_interval=0, alpha=1`` it is ``g_k`` (k-step SAM's gradient); with the defaults, the first step
    searches alpha and the direction is ``||g_k|| u(alpha*)``. ``.grad`` is cleared afterwards.
    """
    engine = XSAM(probe.params, **xsam_settings)

    def forward_backward() -> Tensor:
        loss = probe.forward_loss()
        loss.backward()
        return loss.detach()

    for p in probe.params:
        p.grad = None
    stats = engine.step(forward_backward, probe.forward_loss, step=step)
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in probe.params]
    direction = torch.cat([g.reshape(-1).float() for g in grads])
    for p in probe.params:
        p.grad = None
    return direction, engine, stats


def plane_basis(v0: Tensor, v1: Tensor, eps: float = 1e-12) -> tuple[Tensor, Tensor]:
    """Orthonormal ``(e0, e1)`` spanning the plane of ``v0`` and ``v1``, with ``e0`` along ``v0`` (Gram-Schmidt)."""
    e0 = v0.double() / (v0.double().norm() + eps)
    rest = v1.double() - (v1.double() @ e0) * e0
    if float(rest.norm()) <= 1e-9 * float(v1.double().norm()):
        raise ValueError("v0 and v1 are parallel: they span no plane")
    return e0.to(v0.dtype), (rest / rest.norm()).to(v0.dtype)


def plane_slice(loss: Callable[[Tensor], float], e0: Tensor, e1: Tensor, extent: float, points: int) -> Tensor:
    """Losses on a ``points x points`` grid ``x e0 + y e1`` with ``x, y`` in ``[-extent, extent]``.

    Entry ``[i, j]`` is at ``x = xs[j], y = xs[i]`` (rows follow ``e1``), ``xs = linspace(-extent, extent, points)``.
    """
    xs = torch.linspace(-extent, extent, points).tolist()
    return torch.tensor([[loss(x * e0 + y * e1) for x in xs] for y in xs])
