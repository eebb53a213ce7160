"""Strategies of the alpha search: which grid points to evaluate, and which one to keep.

A strategy gets the grid ``alphas`` and ``evaluate(indices) -> losses``, which returns the loss (averaged over
the data-parallel workers) at each grid index asked for; it returns the chosen index and every loss it saw.
Every decision is taken on those returned values, so workers that see the same averaged losses take the same
branches and choose the same alpha.

The choice, for every strategy: the largest finite loss; among exactly equal largest losses the alpha closest
to ``prefer`` (1, SAM), the smaller alpha on equal distance. Non-finite losses are never chosen; when every
evaluated loss is non-finite the index is ``None`` (the caller keeps its alpha).

- ``"grid"`` (the paper's) evaluates every grid point, in one call of ``evaluate``.
- ``"coarse_to_fine"`` evaluates every fifth point of the default grid (0, 0.5, 1, 1.5, 2), then refines with a
  Fibonacci (golden-section) search between the two neighbours of the best of them. On a curve that rises to its
  maximum and falls after it (unimodal; flat only at the top) it chooses exactly the grid's alpha with at most
  9 of 21 evaluations, and the coarse pass keeps it on the higher peak of two-peaked curves. On other curves it
  returns the best point it evaluated.

Example:
    >>> from hf_xsam.search import coarse_to_fine_search, grid_search
    >>> alphas = [round(0.1 * i, 10) for i in range(21)]
    >>> curve = [-(a - 1.3) ** 2 for a in alphas]
    >>> calls = []
    >>> def evaluate(indices):
    ...     calls.append(list(indices))
    ...     return [curve[i] for i in indices]
    >>> index, seen = coarse_to_fine_search(alphas, evaluate)
    >>> alphas[index], len(seen), calls[0]
    (1.3, 9, [0, 5, 10, 15, 20])
    >>> grid_search(alphas, evaluate)[0] == index
    True
    >>> coarse_to_fine_search(alphas, lambda indices: [0.5] * len(indices))[0]  # a flat curve: alpha 1 (SAM)
    10
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

__all__ = ["SEARCHES", "Evaluate", "SearchResult", "best_index", "grid_search", "coarse_to_fine_search"]

Evaluate = Callable[[Sequence[int]], Sequence[float]]
SearchResult = tuple[int | None, dict[int, float]]

# distances to the preferred alpha are compared after rounding, so that 0.75 and 1.25 tie exactly
_DISTANCE_DIGITS = 9
# the coarse pass of "coarse_to_fine" splits the grid into this many intervals (5 points)
COARSE_INTERVALS = 4


def _rank(alphas: Sequence[float], prefer: float, index: int, loss: float) -> tuple[float, float, float]:
    """Sort key of a grid point: larger is better (loss, then closeness to ``prefer``, then smaller alpha)."""
    value = loss if math.isfinite(loss) else -math.inf
    return value, -round(abs(alphas[index] - prefer), _DISTANCE_DIGITS), -alphas[index]


def best_index(losses: dict[int, float], alphas: Sequence[float], prefer: float = 1.0) -> int | None:
    """The index of the best finite loss in ``losses`` under the tie rule, or ``None`` if none is finite.

    Example:
        >>> best_index({0: 2.0, 5: 3.0, 15: 3.0}, [0.1 * i for i in range(21)])  # 0.5 and 1.5 tie: the smaller
        5
    """
    finite = [i for i, loss in losses.items() if math.isfinite(loss)]
    if not finite:
        return None
    return max(finite, key=lambda i: _rank(alphas, prefer, i, losses[i]))


def _evaluate_into(losses: dict[int, float], evaluate: Evaluate, indices: Sequence[int]) -> None:
    new = list(dict.fromkeys(indices))
    new = [i for i in new if i not in losses]
    if new:
        values = [float(v) for v in evaluate(new)]
        if len(values) != len(new):
            raise ValueError(f"evaluate returned {len(values)} losses for {len(new)} grid points")
        losses.update(zip(new, values))


def grid_search(alphas: Sequence[float], evaluate: Evaluate, prefer: float = 1.0) -> SearchResult:
    """Evaluate every grid point (one call of ``evaluate``) and keep the best.

    Args:
        alphas: the grid, e.g. ``XSAM.alpha_grid``.
        evaluate: returns the (worker-averaged) losses at the grid indices it is given.
        prefer: the alpha kept among exactly equal largest losses (the closest one to it).

    Returns:
        The chosen index (``None`` if no loss is finite) and ``{index: loss}`` for every point evaluated.
    """
    losses: dict[int, float] = {}
    _evaluate_into(losses, evaluate, range(len(alphas)))
    return best_index(losses, alphas, prefer), losses


def coarse_to_fine_search(alphas: Sequence[float], evaluate: Evaluate, prefer: float = 1.0) -> SearchResult:
    """A coarse pass over every ``stride``-th grid point, then a Fibonacci search between the best one's neighbours.

    The coarse pass (``stride = round((n - 1) / 4)``: alphas 0, 0.5, 1, 1.5, 2 on the default grid) finds the
    highest peak even where the curve has two (a high peak near 0.5 and a lower one near 1.6 are common early in
    training); the refinement keeps the maximum strictly inside ``(best - stride, best + stride)`` and drops the
    part of the bracket that cannot hold it, one new evaluation per round. On a curve that rises to one maximum
    and falls after it (unimodal; flat only at the top) it chooses exactly the grid's alpha; on 21 points it
    evaluates at most 9. On other curves it returns the best point it evaluated.

    Args:
        alphas: the grid, e.g. ``XSAM.alpha_grid``.
        evaluate: returns the (worker-averaged) losses at the grid indices it is given (all coarse points in one
            call, then one or two at a time).
        prefer: the alpha kept among exactly equal largest losses (the closest one to it).

    Returns:
        The best evaluated index under the tie rule (``None`` if no evaluated loss is finite) and
        ``{index: loss}`` for every point evaluated.
    """
    n = len(alphas)
    stride = max(1, round((n - 1) / COARSE_INTERVALS))
    losses: dict[int, float] = {}
    _evaluate_into(losses, evaluate, sorted({*range(0, n, stride), n - 1}))
    best = best_index(losses, alphas, prefer)
    if best is not None and stride > 1:
        _fibonacci(alphas, losses, evaluate, prefer, max(best - stride, -1), min(best + stride, n))
    return best_index(losses, alphas, prefer), losses


def _fibonacci(
    alphas: Sequence[float], losses: dict[int, float], evaluate: Evaluate, prefer: float, lo: int, hi: int
) -> None:
    """Fibonacci search for the best grid point strictly inside ``(lo, hi)``, adding what it evaluates to ``losses``.

    The maximum is kept strictly inside a bracket whose width is a Fibonacci number; points at ``hi`` and past it
    count as lower than any real one and cost nothing. Points are compared by loss, then by the tie rule, so a
    flat top ends at the same point as the grid search. With ``w = hi - lo`` it evaluates at most ``m - 1`` new
    points, where ``F(m) >= w`` (``F = 1, 2, 3, 5, ...``).
    """
    below_all = (-math.inf, -math.inf, -math.inf)

    def rank(index: int) -> tuple[float, float, float]:
        return _rank(alphas, prefer, index, losses[index]) if index < hi else below_all

    widths = [1, 2]
    while widths[-1] < hi - lo:
        widths.append(widths[-1] + widths[-2])
    k = len(widths) - 1
    # invariant: the best point lies strictly inside (lo, lo + widths[k])
    while k >= 2:
        left, right = lo + widths[k - 2], lo + widths[k - 1]
        _evaluate_into(losses, evaluate, [i for i in (left, right) if i < hi])
        if rank(left) < rank(right):
            lo = left  # the maximum is past left: keep (left, lo + widths[k]), of width widths[k - 1]
        # else the maximum is before right: keep (lo, right), of width widths[k - 1]
        k -= 1
    _evaluate_into(losses, evaluate, [i for i in (lo + 1,) if i < hi])


SEARCHES: dict[str, Callable[..., SearchResult]] = {"grid": grid_search, "coarse_to_fine": coarse_to_fine_search}
