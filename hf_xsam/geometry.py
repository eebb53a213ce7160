"""Geometry over lists of tensors: global norms, dot products, angles and slerp coefficients.

Every function treats a list of tensors as one flat vector and returns 0-dim tensors, so nothing here
synchronises the host with the device. Norms use the multi-tensor ``torch._foreach_norm``; there is no
multi-tensor dot product, and one ``torch.dot`` per tensor measured faster than the batched matmul.

Example:
    >>> import torch
    >>> from hf_xsam.geometry import global_norm, global_dot, angle
    >>> xs = [torch.tensor([3.0, 0.0]), torch.tensor([0.0])]
    >>> ys = [torch.tensor([0.0, 2.0]), torch.tensor([0.0])]
    >>> float(global_norm(xs)), float(global_dot(xs, ys))
    (3.0, 0.0)
    >>> round(float(angle(global_dot(xs, ys), global_norm(xs), global_norm(ys), 1e-12)), 4)
    1.5708
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "PLANE_TOLERANCE",
    "Plane",
    "sum_dtype",
    "global_norm",
    "global_norms",
    "global_dot",
    "add_scaled_",
    "addcmul_scaled_",
    "mul_add_scaled_",
    "angle",
    "slerp_coefficients",
]

# Below this value of sin(theta) the plane of v0 and v1 is taken as undefined and u(alpha) = v1.
PLANE_TOLERANCE = 1e-3


@dataclass
class Plane:
    """The search plane of one step: the norms of ``g_k`` and of ``w_k - w0``, the angle theta between them (0 when
    the ascent stalled), and whether the ascent stalled (0-dim tensors)."""

    grad_norm: Tensor
    displacement_norm: Tensor
    theta: Tensor
    stalled: Tensor


def sum_dtype(tensors: list[Tensor]) -> torch.dtype:
    """float32 for sums over ``tensors`` (bf16 and fp16 included), float64 for float64 ones."""
    return torch.float64 if tensors[0].dtype == torch.float64 else torch.float32


def global_norm(tensors: list[Tensor]) -> Tensor:
    """Euclidean norm of all ``tensors`` taken together, computed in float32 (or float64 if given)."""
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors, 2, dtype=sum_dtype(tensors))))


def global_norms(*lists: list[Tensor]) -> Tensor:
    """Norms of several lists of equally many tensors, each list taken as one vector (one multi-tensor kernel).

    >>> import torch
    >>> global_norms([torch.tensor([3.0]), torch.tensor([4.0])], [torch.tensor([1.0]), torch.tensor([0.0])])
    tensor([5., 1.])
    """
    per_tensor = torch.stack(torch._foreach_norm([t for ts in lists for t in ts], 2, dtype=sum_dtype(lists[0])))
    return torch.linalg.vector_norm(per_tensor.view(len(lists), -1), dim=1)


def global_dot(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    """Dot product of two lists of tensors seen as flat vectors, computed in float32 (or float64 if given).

    One ``torch.dot`` per pair on ``flatten()`` (a view; a 1-D tensor is used as it is): on CPU this measured
    2.5-11x faster than one batched 1xN @ Nx1 matmul over reshaped tensors, and closer to the float64 result
    (``benchmarks/dot_product.py``, ``docs/search.md``).
    """
    if not xs:
        return torch.zeros(())
    return torch.stack([torch.dot(x.flatten(), y.flatten()) for x, y in zip(xs, ys)]).to(sum_dtype(xs)).sum()


def add_scaled_(ys: list[Tensor], xs: list[Tensor], scale: Tensor) -> None:
    """``ys += scale * xs`` for a 0-dim tensor ``scale``; ``xs`` is scratch (it may hold ``scale * xs`` after).

    On the CPU, where multi-tensor kernels loop over the tensors anyway, one broadcasting ``addcmul`` per tensor
    reads ``xs`` once (:func:`addcmul_scaled_`); elsewhere the multi-tensor kernels of ``mul_`` and ``add_``
    (:func:`mul_add_scaled_`), as ``addcmul`` would take its per-tensor slow path there.

    >>> import torch
    >>> ys, xs = [torch.ones(2)], [torch.tensor([1.0, 2.0])]
    >>> add_scaled_(ys, xs, torch.tensor(0.5))
    >>> ys
    [tensor([1.5000, 2.0000])]
    """
    (addcmul_scaled_ if ys[0].device.type == "cpu" else mul_add_scaled_)(ys, xs, scale)


def addcmul_scaled_(ys: list[Tensor], xs: list[Tensor], scale: Tensor) -> None:
    """``ys += scale * xs``, one broadcasting ``addcmul`` per tensor; ``xs`` is left as it was."""
    torch._foreach_addcmul_(ys, xs, [scale] * len(xs))


def mul_add_scaled_(ys: list[Tensor], xs: list[Tensor], scale: Tensor) -> None:
    """``ys += scale * xs`` with two multi-tensor kernels; ``xs`` holds ``scale * xs`` after."""
    torch._foreach_mul_(xs, scale)
    torch._foreach_add_(ys, xs)


def angle(dot: Tensor, norm_x: Tensor, norm_y: Tensor, eps: float) -> Tensor:
    """Angle in radians between two vectors, from their dot product and norms (clamped, never NaN)."""
    cosine = dot / (norm_x * norm_y + eps)
    return torch.arccos(torch.nan_to_num(cosine, nan=0.0).clamp(-1.0, 1.0))


def slerp_coefficients(theta: Tensor, alpha: float | Tensor) -> tuple[Tensor, Tensor]:
    """Coefficients ``(c0, c1)`` with ``u(alpha) = c0 * v0 + c1 * v1`` for unit vectors at angle ``theta``.

    ``u(alpha)`` lies at angle ``alpha * theta`` from ``v0`` towards (and past) ``v1``:

        c0 = sin((1 - alpha) theta) / sin(theta),   c1 = sin(alpha theta) / sin(theta)

    When ``sin(theta) <= PLANE_TOLERANCE`` the plane is undefined and ``(c0, c1) = (0, 1)``, i.e. ``u = v1``.
    ``alpha`` may be a float or a tensor of several alphas (the coefficients broadcast).
    """
    sin_theta = torch.sin(theta)
    defined = sin_theta > PLANE_TOLERANCE
    safe_sin = torch.where(defined, sin_theta, 1.0)
    c0 = torch.where(defined, torch.sin((1 - alpha) * theta) / safe_sin, 0.0)
    c1 = torch.where(defined, torch.sin(alpha * theta) / safe_sin, 1.0)
    return c0, c1
