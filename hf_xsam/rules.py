"""The step rules that ``sam_method`` names: one registry entry each, read by the settings, engine, trainer and card.

A rule says whether a step is sharpness-aware at all, and if so how it is taken: its ascent (the perturbation, an
:class:`~hf_xsam.ascent.Ascent`) and its direction (:meth:`StepRule.direction_`, by default the point at angle
``alpha * theta`` on the arc from ``v0`` to ``v1``), whether ``alpha`` is fixed or searched, which settings it reads,
its cost in forward-backward passes per step and the sentence of the model card. ``sam_adaptive`` swaps the
ascent of ``xsam`` and ``sam`` for ASAM's (:meth:`StepRule.with_ascent`). Adding a variant is one entry here (or
one ascent), its float64 reference in ``tests/reference.py`` and its tests (``docs/method.md``, "Adding a step
rule"); the engine calls the rule and does not change.

Example:
    >>> from hf_xsam.rules import STEP_RULES
    >>> sam = STEP_RULES["sam"]
    >>> sam.fixed_alpha, sam.searches_alpha, sam.passes(ascent_steps=2)
    (1.0, False, 3)
    >>> STEP_RULES["none"].passes(ascent_steps=2)
    1
    >>> set(STEP_RULES["xsam"].settings) - set(sam.settings) == set(SEARCH_SETTINGS)
    True
    >>> from hf_xsam.ascent import AdaptiveAscent
    >>> asam = sam.with_ascent(AdaptiveAscent(eta=0.01))
    >>> asam.settings[-2:], asam.tags
    (('sam_adaptive', 'sam_adaptive_eta'), ('sharpness-aware-minimization', 'asam'))
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .ascent import Ascent, EuclideanAscent
from .geometry import Plane, add_scaled_, slerp_coefficients

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
        ascent: how a sharpness-aware step climbs (:class:`~hf_xsam.ascent.EuclideanAscent`, SAM's, by default).
    """

    name: str
    card: str
    settings: tuple[str, ...]
    sharpness_aware: bool
    fixed_alpha: float | None
    searches_alpha: bool
    tags: tuple[str, ...]
    ascent: Ascent = field(default_factory=EuclideanAscent)

    def with_ascent(self, ascent: Ascent) -> StepRule:
        """This rule climbing with ``ascent``: its settings, card sentence and tags added (a rule that takes no
        sharpness-aware step is returned as it is)."""
        if not self.sharpness_aware or ascent == self.ascent:
            return self
        return replace(
            self,
            ascent=ascent,
            settings=self.settings + ascent.settings,
            card=self.card + ascent.card,
            tags=self.tags + ascent.tags,
        )

    def direction_(
        self,
        grads: list[Tensor],
        displacement: list[Tensor],
        plane: Plane,
        alpha: float,
        nonfinite: Tensor,
        eps: float,
    ) -> None:
        """``grads <- ||g_k|| u(alpha)``, the direction the base optimizer steps along; ``displacement`` (``w_k -
        w0``) is scratch. A non-finite pass poisons the direction with NaN, so that a scaler, or the trainer, skips
        the step."""
        c0, c1 = slerp_coefficients(plane.theta, alpha)
        # d = displacement scaled to c0 ||g_k|| / ||w_k - w0||, plus c1 g_k
        torch._foreach_mul_(grads, torch.where(nonfinite, torch.nan, c1))
        add_scaled_(grads, displacement, c0 * plane.grad_norm / (plane.displacement_norm + eps))

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
