"""Strategies of the alpha search: which grid points to evaluate, and which one to keep.

A strategy gets the grid ``alphas`` and ``evaluate(indices) -> losses``, which returns the loss (averaged over
the data-parallel workers) at each grid index asked for; it returns the chosen index and every loss it saw.
Every decision is taken on those returned values, so workers that see the same averaged losses take the same
branches and choose the same alpha.

The choice, for every strategy: the largest finite loss; among exactly equal largest losses the alpha closest
to ``prefer`` (1, SAM), the smaller alpha on equal distance. Non-finite losses are never chosen; when every
evaluated loss is non-finite the index is ``None`` (the caller keeps its alpha).

- ``"grid"`` (the paper's) evaluates every grid point, in one call of ``evaluate``.
- ``"ternary"`` is a Fibonacci (golden-section) search over the same grid: each step compares two interior
  points and drops the part of the bracket that cannot hold the maximum, reusing one of the two points. On a
  curve that rises to its maximum and falls after it (unimodal; flat only at the top) it chooses exactly the
  grid's alpha with at most 7 of 21 evaluations. On other curves it returns the best point it evaluated.

Example:
    >>> from hf_xsam.search import grid_search, ternary_search
    >>> alphas = [round(0.1 * i, 10) for i in range(21)]
    >>> curve = [-(a - 1.3) ** 2 for a in alphas]
    >>> calls = []
    >>> def evaluate(indices):
    ...     calls.append(list(indices))
    ...     return [curve[i] for i in indices]
    >>> index, seen = ternary_search(alphas, evaluate)
    >>> alphas[index], len(seen), len(calls)
    (1.3, 7, 6)
    >>> grid_search(alphas, evaluate)[0] == index
    True
    >>> ternary_search(alphas, lambda indices: [0.5] * len(indices))[0]  # a flat curve: alpha 1 (SAM)
    10
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

__all__ = ["SEARCHES", "Evaluate", "SearchResult", "best_index", "grid_search", "ternary_search"]

Evaluate = Callable[[Sequence[int]], Sequence[float]]
SearchResult = tuple[int | None, dict[int, float]]

# distances to the preferred alpha are compared after rounding, so that 0.75 and 1.25 tie exactly
_DISTANCE_DIGITS = 9


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
        alphas: the grid, e.g. ``XSAMConfig.alpha_grid``.
        evaluate: returns the (worker-averaged) losses at the grid indices it is given.
        prefer: the alpha kept among exactly equal largest losses (the closest one to it).

    Returns:
        The chosen index (``None`` if no loss is finite) and ``{index: loss}`` for every point evaluated.
    """
    losses: dict[int, float] = {}
    _evaluate_into(losses, evaluate, range(len(alphas)))
    return best_index(losses, alphas, prefer), losses


def ternary_search(alphas: Sequence[float], evaluate: Evaluate, prefer: float = 1.0) -> SearchResult:
    """Fibonacci search for the best grid point; exact on unimodal curves, each point evaluated at most once.

    The maximum is kept strictly inside a bracket whose width is a Fibonacci number; points past
    the end of the grid count as lower than any real one and cost nothing. Points are compared by loss, then
    by the tie rule, so a flat top (or a flat curve) ends at the same point as the grid search. With ``n``
    grid points it makes at most ``m - 1`` evaluations, where ``F(m) >= n + 1`` (7 for 21 points).

    Args:
        alphas: the grid, e.g. ``XSAMConfig.alpha_grid``.
        evaluate: returns the (worker-averaged) losses at the grid indices it is given (called with one or
            two indices at a time).
        prefer: the alpha kept among exactly equal largest losses (the closest one to it).

    Returns:
        The best evaluated index under the tie rule (``None`` if no evaluated loss is finite) and
        ``{index: loss}`` for every point evaluated.
    """
    n = len(alphas)
    losses: dict[int, float] = {}
    below_all = (-math.inf, -math.inf, -math.inf)

    def rank(index: int) -> tuple[float, float, float]:
        return _rank(alphas, prefer, index, losses[index]) if index < n else below_all

    widths = [1, 2]
    while widths[-1] < n + 1:
        widths.append(widths[-1] + widths[-2])
    k = len(widths) - 1
    # invariant: the best point lies strictly inside (lo, lo + widths[k])
    lo = -1
    while k >= 2:
        left, right = lo + widths[k - 2], lo + widths[k - 1]
        _evaluate_into(losses, evaluate, [i for i in (left, right) if i < n])
        if rank(left) < rank(right):
            lo = left  # the maximum is past left: keep (left, lo + widths[k]), of width widths[k - 1]
        # else the maximum is before right: keep (lo, right), of width widths[k - 1]
        k -= 1
    _evaluate_into(losses, evaluate, [i for i in (lo + 1,) if i < n])
    return best_index(losses, alphas, prefer), losses


SEARCHES: dict[str, Callable[..., SearchResult]] = {"grid": grid_search, "ternary": ternary_search}
