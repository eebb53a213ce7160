"""One line that says what a run will do: the rule, rho, the search and its schedule, and the cost per step.

The trainer logs it when training starts, so that a user reads the settings in force (the defaults included) and
what they cost before the first step, not after the run.

Example:
    >>> from hf_xsam import XSAMConfig
    >>> from hf_xsam.summary import describe_run
    >>> print(describe_run(XSAMConfig(), max_steps=100, num_epochs=5))  # doctest: +NORMALIZE_WHITESPACE
    XSAM, rho 0.05 (1 ascent step); alpha searched over 21 points 0..2 (a grid search: 22 forward passes of one
    micro-batch, on the first step of every epoch, about 5 searches), alpha at most 1 until the loss is 5% below the
    first search's; sharpness-aware on every step; 2 forward-backward passes per step on average (2x the base
    optimizer's), plus the searches
    >>> print(describe_run(XSAMConfig(sam_method="sam", sam_start_ratio=0.5, sam_interval=2), max_steps=100))
    SAM, rho 0.05 (1 ascent step); sharpness-aware from step 50 of 100, every 2nd step; 1.25 forward-backward passes per step on average (1.25x the base optimizer's)
    >>> print(describe_run(XSAMConfig(sam_method="sam", sam_adaptive=True, rho=1.0), max_steps=10))
    SAM, rho 1 (adaptive ascent, eta 0.01, 1 ascent step); sharpness-aware on every step; 2 forward-backward passes per step on average (2x the base optimizer's)
"""

from __future__ import annotations

import math
from typing import Any

from .config import XSAMConfig
from .search import coarse_to_fine_search

__all__ = ["describe_run", "search_forwards"]


def search_forwards(config: XSAMConfig, optimizer: Any = None) -> int:
    """Forward passes of one alpha search: every grid point, or the most ``"coarse_to_fine"`` takes on a curve with
    one maximum; plus the loss at ``w0`` when ``extrapolate_after_drop`` is on."""
    grid = config.alpha_grid(optimizer)
    if config.alpha_search == "grid":
        points = len(grid)
    else:
        points = max(
            len(coarse_to_fine_search(grid, lambda indices, peak=peak: [-abs(i - peak) for i in indices])[1])
            for peak in range(len(grid))
        )
    return points + (config.extrapolate_after_drop > 0)


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def describe_run(config: XSAMConfig, optimizer: Any = None, max_steps: int = 0, num_epochs: int = 0) -> str:
    """What a run of ``max_steps`` optimizer steps over ``num_epochs`` epochs with ``config`` does, in one line.

    Args:
        config: the XSAM settings (``XSAMTrainingArguments`` are).
        optimizer: the base optimizer (it decides the top of the default grid); None for the paper's 2.
        max_steps: the run's optimizer steps (0: unknown, the schedule is described without counts).
        num_epochs: the run's epochs (0: unknown), for the number of per-epoch searches.
    """
    rule = config.step_rule
    if not rule.sharpness_aware:
        return "plain training (sam_method none): the base optimizer alone, one forward-backward pass per step"
    steps = "step" if config.ascent_steps == 1 else "steps"
    ascent = f"adaptive ascent, eta {config.sam_adaptive_eta:g}, " if config.sam_adaptive else ""
    parts = [f"{config.sam_method.upper()}, rho {config.rho:g} ({ascent}{config.ascent_steps} ascent {steps})"]
    if config.searches_alpha:
        grid = config.alpha_grid(optimizer)
        how = "a grid search" if config.alpha_search == "grid" else "a coarse-to-fine search, at most"
        interval = config.alpha_search_interval
        when = "on the first step of every epoch" if interval is None else f"every {interval} steps"
        aware = [step for step in range(max_steps) if config.sharpness_aware_step(step, max_steps)]
        if interval is None:  # one search in each epoch that has a sharpness-aware step
            count = len({step * num_epochs // max_steps for step in aware}) if num_epochs else 0
        else:
            count = math.ceil(len(aware) / interval)
        search = (
            f"alpha searched over {len(grid)} points 0..{grid[-1]:g} ({how}: {search_forwards(config, optimizer)} "
            f"forward passes of one micro-batch, {when}" + (f", about {count} searches)" if count else ")")
        )
        if config.extrapolate_after_drop > 0:
            search += (
                f", alpha at most 1 until the loss is {config.extrapolate_after_drop:.0%} below the first search's"
            )
        parts.append(search)
    elif rule.fixed_alpha is None:
        parts.append(f"alpha fixed at {config.alpha:g}")
    schedule = "sharpness-aware on every step"
    if config.sam_start_ratio > 0 or config.sam_interval > 1:
        start = config.sam_start_step(max_steps) if max_steps else None
        schedule = "sharpness-aware " + (
            f"from step {start} of {max_steps}"
            if start is not None
            else f"after {config.sam_start_ratio:.0%} of the steps"
        )
        if config.sam_interval > 1:
            schedule += f", every {_ordinal(config.sam_interval)} step"
            if config.sam_reuse:
                schedule += f", reusing its direction on the others (scale {config.sam_reuse_scale:g})"
    parts.append(schedule)
    if max_steps:
        aware = sum(config.sharpness_aware_step(step, max_steps) for step in range(max_steps))
        passes = (aware * rule.passes(config.ascent_steps) + max_steps - aware) / max_steps
    else:
        passes = rule.passes(config.ascent_steps)
    cost = f"{passes:.3g} forward-backward passes per step on average ({passes:.3g}x the base optimizer's)"
    parts.append(cost + (", plus the searches" if config.searches_alpha else ""))
    return "; ".join(parts)
