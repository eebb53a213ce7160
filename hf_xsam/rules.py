"""The step rules that ``sam_method`` names: one registry entry each, read by the settings, engine, trainer and card.

A rule says whether a step is sharpness-aware at all (an ascent, then a direction from the plane of ``v0`` and
``v1``), whether ``alpha`` is fixed or searched, which settings it reads, its cost in forward-backward passes per
step and the sentence of the model card. Adding a variant is one entry here, its float64 reference in
``tests/reference.py`` and its tests (``docs/method.md``, "Adding a step rule").

Example:
    >>> from hf_xsam.rules import STEP_RULES
    >>> sam = STEP_RULES["sam"]
    >>> sam.fixed_alpha, sam.searches_alpha, sam.passes(ascent_steps=2)
    (1.0, False, 3)
    >>> STEP_RULES["none"].passes(ascent_steps=2)
    1
    >>> set(STEP_RULES["xsam"].settings) - set(sam.settings) == set(SEARCH_SETTINGS)
    True
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StepRule", "STEP_RULES", "SHARPNESS_SETTINGS", "SEARCH_SETTINGS"]

# the settings of every sharpness-aware step: the ascent, the schedule of sharpness-aware steps, data parallel
SHARPNESS_SETTINGS = (
    "rho",
    "ascent_steps",
    "sam_interval",
    "sam_start_ratio",
    "sam_reuse",
    "sam_reuse_scale",
    "sam_perturbation",
    "sam_eps",
)
# the settings that only a searched alpha reads
SEARCH_SETTINGS = (
    "rho_max",
    "alpha",
    "alpha_max",
    "alpha_step",
    "alpha_search",
    "alpha_search_interval",
    "extrapolate_after_drop",
)


@dataclass(frozen=True)
class StepRule:
    """One value of ``sam_method``.

    Attributes:
        name: the value of ``sam_method``.
        card: how the model card names the way the model was trained (completes "trained with hf_xsam using ...").
        settings: the ``XSAMConfig`` fields the rule reads (the card lists these, and no others).
        sharpness_aware: whether the rule takes the engine's step (ascent and direction); ``False`` is the base
            optimizer alone.
        fixed_alpha: the alpha of every step, or ``None`` when it comes from the ``alpha`` setting and the search.
        searches_alpha: whether the rule searches alpha (on the schedule of ``alpha_search_interval``).
        tags: the Hub tags of a model trained with the rule.
    """

    name: str
    card: str
    settings: tuple[str, ...]
    sharpness_aware: bool
    fixed_alpha: float | None
    searches_alpha: bool
    tags: tuple[str, ...]

    def passes(self, ascent_steps: int) -> int:
        """Forward-backward passes of one (micro-)batch on a sharpness-aware step (the search not counted)."""
        return ascent_steps + 1 if self.sharpness_aware else 1


STEP_RULES: dict[str, StepRule] = {
    rule.name: rule
    for rule in (
        StepRule(
            name="xsam",
            card="XSAM: each step climbs `rho` along the gradient, then steps along the direction at angle "
            "`alpha * theta` from the ascent direction towards the gradient there, with `alpha` searched for the "
            "largest loss at radius `rho_max`",
            settings=SHARPNESS_SETTINGS + SEARCH_SETTINGS,
            sharpness_aware=True,
            fixed_alpha=None,
            searches_alpha=True,
            tags=("xsam", "sharpness-aware-minimization"),
        ),
        StepRule(
            name="sam",
            card="SAM (XSAM with alpha fixed at 1): each step climbs `rho` along the gradient and steps with the "
            "gradient found there",
            settings=SHARPNESS_SETTINGS,
            sharpness_aware=True,
            fixed_alpha=1.0,
            searches_alpha=False,
            tags=("sharpness-aware-minimization",),
        ),
        StepRule(
            name="none",
            card="plain training, without sharpness-aware minimization: one forward and backward pass per step with "
            "the base optimizer alone (`sam_method=none`, the baseline of hf_xsam's scripts)",
            settings=(),
            sharpness_aware=False,
            fixed_alpha=None,
            searches_alpha=False,
            tags=(),
        ),
    )
}
