"""The XSAM settings: one dataclass with the fields, their defaults, help and validation.

The engine takes it, and the training-argument classes inherit it, so a setting is declared once and has
the same name everywhere (Python, command-line flags, checkpoints, model cards).

Example:
    >>> from hf_xsam import XSAMConfig
    >>> config = XSAMConfig(rho=0.05, alpha_max=1.0, alpha_step=0.25)
    >>> config.alpha_grid(), config.search_radius
    ([0.0, 0.25, 0.5, 0.75, 1.0], 0.1)
    >>> XSAMConfig(rho=-1)
    Traceback (most recent call last):
    ...
    ValueError: Invalid rho: -1; it must be a number > 0
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .ascent import AdaptiveAscent, Ascent, EuclideanAscent
from .rules import STEP_RULES, StepRule
from .search import SEARCHES

__all__ = [
    "XSAMConfig",
    "SAM_METHODS",
    "PERTURBATIONS",
    "ALPHA_SEARCHES",
    "MAX_SAM_EPS",
    "MAX_GRID_POINTS",
    "MAX_RADIUS",
    "PAPER_ALPHA_MAX",
    "SGD_ALPHA_MAX",
    "steps_along_direction",
]

SAM_METHODS = tuple(STEP_RULES)
PERTURBATIONS = ("local", "global")
ALPHA_SEARCHES = tuple(SEARCHES)
# The default extrapolate_after_drop, from the measurements in docs/method.md ("XSAM with SGD").
EXTRAPOLATE_AFTER_DROP = 0.05
# The top of the search grid when alpha_max is None: the paper's, and SAM's alpha with a base optimizer that steps
# along the direction as it is (SGD; docs/method.md, "XSAM with SGD")
PAPER_ALPHA_MAX = 2.0
SGD_ALPHA_MAX = 1.0
# An epsilon of this size or more is no longer negligible next to gradient norms and distorts theta.
MAX_SAM_EPS = 1e-4
# Each grid point costs one forward pass per search (grid search): more than this is a mistake, not a setting.
MAX_GRID_POINTS = 1001
# The norms square the radii: beyond this their squares overflow float32 (3.4e38), and no real setting comes near.
MAX_RADIUS = 1e18


def _number(value: Any) -> bool:
    """A finite real number (an int too large for a float is not one)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def steps_along_direction(optimizer: Any) -> bool:
    """Whether a base optimizer steps along the gradient it is given as it is (``torch.optim.SGD``).

    Wrappers that hold the optimizer as ``.optimizer`` (Accelerate's ``AcceleratedOptimizer``) are looked through.
    Adaptive optimizers (Adam and its kin, Adafactor, ...) rescale each coordinate and are not such optimizers.

    >>> w = torch.zeros(1, requires_grad=True)
    >>> steps_along_direction(torch.optim.SGD([w], lr=0.1)), steps_along_direction(torch.optim.AdamW([w]))
    (True, False)
    """
    inner = getattr(optimizer, "optimizer", None)
    while inner is not None and inner is not optimizer:
        optimizer, inner = inner, getattr(inner, "optimizer", None)
    return isinstance(optimizer, torch.optim.SGD)


@dataclass
class XSAMConfig:
    """The settings of an XSAM step (the method: ``docs/method.md``; the step rules: :mod:`hf_xsam.rules`)."""

    sam_method: str = field(
        default="xsam",
        metadata={
            "help": "Sharpness-aware method: 'xsam' (searched alpha), 'sam' (alpha fixed at 1, standard k-step SAM) "
            "or 'none' (the base optimizer alone, one pass per step).",
            "choices": list(SAM_METHODS),
        },
    )
    rho: float = field(default=0.05, metadata={"help": "Total ascent radius, split over `ascent_steps`."})
    ascent_steps: int = field(default=1, metadata={"help": "Number of ascent steps k (k + 1 passes per step)."})
    rho_max: float | None = field(
        default=None, metadata={"help": "Radius at which the alpha search evaluates the loss; None means 2 * rho."}
    )
    alpha: float = field(
        default=1.0,
        metadata={"help": "Alpha used until the first search, and always when the search is off (1 = SAM, 0 = v0)."},
    )
    alpha_max: float | None = field(
        default=None,
        metadata={
            "help": "Largest alpha of the search grid 0..alpha_max. None: 2.0 (the paper's grid), or 1.0 (SAM's "
            "direction at most) with a base optimizer that steps along the direction as it is (SGD), where "
            "extrapolated directions stalled or slowed training (docs/method.md, 'XSAM with SGD'). Set 2.0 for "
            "the paper's grid with any optimizer."
        },
    )
    alpha_step: float = field(default=0.1, metadata={"help": "Spacing of the alpha search grid."})
    alpha_search_interval: int | None = field(
        default=None,
        metadata={
            "help": "Optimizer steps between alpha searches; None searches on the first step of every epoch "
            "(as in the paper), 0 never searches."
        },
    )
    alpha_search: str = field(
        default="grid",
        metadata={
            "help": "How the search walks the grid: 'grid' evaluates every point (the paper's; reproduces it exactly) "
            "or 'coarse_to_fine', every fifth point then a Fibonacci refinement between the best one's "
            "neighbours: at most 9 of 21 points, the grid's alpha when the loss along the grid rises to one "
            "maximum and falls after it, and the higher peak of two. Both keep the largest loss, the alpha closest "
            "to 1 among equal ones.",
            "choices": list(ALPHA_SEARCHES),
        },
    )
    extrapolate_after_drop: float = field(
        default=EXTRAPOLATE_AFTER_DROP,
        metadata={
            "help": "The alpha search may go past SAM (alpha > 1) only where the loss at w0 on the search batch "
            "lies this fraction below the first search's; above that a searched alpha past 1 is capped (the best "
            "searched point at or below 1). "
            "With SGD an extrapolated alpha on the plateau at the start of training (every direction about as "
            "sharp, the arc's edge winning by a hair) can hold training at chance level (docs/method.md). 0 is "
            "the paper's rule exactly."
        },
    )
    sam_interval: int = field(
        default=1,
        metadata={"help": "Take the sharpness-aware step every N optimizer steps and a plain step otherwise."},
    )
    sam_start_ratio: float = field(
        default=0.0,
        metadata={
            "help": "Fraction of the optimizer steps, at the start of training, taken as plain steps (counted as "
            "a `warmup_steps` ratio counts them); sharpness-aware steps and the first alpha search start after."
        },
    )
    sam_reuse: bool = field(
        default=False,
        metadata={
            "help": "On the plain steps between sharpness-aware ones (`sam_interval` > 1), add to the gradient the "
            "part of the last sharpness-aware direction orthogonal to that step's first gradient, rescaled to "
            "the current gradient's norm times `sam_reuse_scale` (LookSAM's rule), or less: never more, relative to "
            "the gradient, than that step measured it. One more parameter-sized buffer, no extra pass."
        },
    )
    sam_reuse_scale: float = field(
        default=0.7,
        metadata={
            "help": "With `sam_reuse`: the largest norm of the reused component, as a multiple of the gradient's "
            "norm (less where the sharpness-aware step measured a smaller orthogonal part)."
        },
    )
    sam_perturbation: str = field(
        default="local",
        metadata={
            "help": "Data parallel: 'local' each worker ascends with its own gradient and the XSAM directions are "
            "averaged once per step; 'global' gradients are averaged before the ascent (equal to one device on "
            "the global batch, one more all-reduce per pass).",
            "choices": list(PERTURBATIONS),
        },
    )
    sam_adaptive: bool = field(
        default=False,
        metadata={
            "help": "Climb with ASAM's adaptive ascent (Kwon et al., ICML 2021): each weight's ascent is scaled by "
            "`T = |w| + sam_adaptive_eta` (the step is `rho T^2 g / ||T g||`), so `rho` is a radius in that scaled "
            "geometry and is usually about 10x SAM's (0.5 to 2). With `sam_method='sam'` this is ASAM."
        },
    )
    sam_adaptive_eta: float = field(
        default=0.01,
        metadata={
            "help": "With `sam_adaptive`: the constant added to `|w|` (>= 0), so that weights at zero (biases) "
            "still move; 0 is the scale of davda54/sam's `adaptive=True`."
        },
    )
    sam_eps: float = field(default=1e-12, metadata={"help": "Epsilon of every normalisation (small, <= 1e-4)."})

    def __post_init__(self) -> None:
        parent_post_init = getattr(super(), "__post_init__", None)
        if parent_post_init is not None:  # mixed into TrainingArguments
            parent_post_init()
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field, its value and what is allowed, for any invalid setting."""
        if self.sam_method not in SAM_METHODS:
            raise ValueError(f"Invalid sam_method: {self.sam_method!r}; choose one of {', '.join(SAM_METHODS)}")
        if self.sam_perturbation not in PERTURBATIONS:
            raise ValueError(
                f"Invalid sam_perturbation: {self.sam_perturbation!r}; choose one of {', '.join(PERTURBATIONS)}"
            )
        if self.alpha_search not in ALPHA_SEARCHES:
            raise ValueError(f"Invalid alpha_search: {self.alpha_search!r}; choose one of {', '.join(ALPHA_SEARCHES)}")
        interval = self.alpha_search_interval
        checks = [
            ("rho", self.rho, _number(self.rho) and self.rho > 0, "a number > 0"),
            (
                "ascent_steps",
                self.ascent_steps,
                _integer(self.ascent_steps) and self.ascent_steps >= 1,
                "an integer >= 1",
            ),
            (
                "rho_max",
                self.rho_max,
                self.rho_max is None or (_number(self.rho_max) and self.rho_max > 0),
                "None (2 * rho) or a number > 0",
            ),
            ("alpha", self.alpha, _number(self.alpha), "a finite number"),
            (
                "alpha_max",
                self.alpha_max,
                self.alpha_max is None or (_number(self.alpha_max) and self.alpha_max >= 0),
                f"None ({PAPER_ALPHA_MAX:g}, or {SGD_ALPHA_MAX:g} with SGD) or a number >= 0",
            ),
            ("alpha_step", self.alpha_step, _number(self.alpha_step) and self.alpha_step > 0, "a number > 0"),
            (
                "extrapolate_after_drop",
                self.extrapolate_after_drop,
                _number(self.extrapolate_after_drop) and 0 <= self.extrapolate_after_drop < 1,
                "a number in [0, 1) (0 = the paper's rule: alpha > 1 from the first search on)",
            ),
            (
                "alpha_search_interval",
                interval,
                interval is None or (_integer(interval) and interval >= 0),
                "None (first step of every epoch), 0 (never) or an integer >= 1",
            ),
            (
                "sam_interval",
                self.sam_interval,
                _integer(self.sam_interval) and self.sam_interval >= 1,
                "an integer >= 1",
            ),
            (
                "sam_start_ratio",
                self.sam_start_ratio,
                _number(self.sam_start_ratio) and 0 <= self.sam_start_ratio < 1,
                "a number in [0, 1)",
            ),
            ("sam_reuse", self.sam_reuse, isinstance(self.sam_reuse, bool), "True or False"),
            (
                "sam_reuse_scale",
                self.sam_reuse_scale,
                _number(self.sam_reuse_scale) and self.sam_reuse_scale >= 0,
                "a number >= 0",
            ),
            ("sam_adaptive", self.sam_adaptive, isinstance(self.sam_adaptive, bool), "True or False"),
            (
                "sam_adaptive_eta",
                self.sam_adaptive_eta,
                _number(self.sam_adaptive_eta) and 0 <= self.sam_adaptive_eta <= MAX_RADIUS,
                f"a finite number in [0, {MAX_RADIUS:g}]",
            ),
            (
                "sam_eps",
                self.sam_eps,
                _number(self.sam_eps) and 0 < self.sam_eps <= MAX_SAM_EPS,
                f"a small number in (0, {MAX_SAM_EPS:g}]: a larger one distorts the normalised directions",
            ),
        ]
        for name, value, valid, allowed in checks:
            if not valid:
                raise ValueError(f"Invalid {name}: {value!r}; it must be {allowed}")
        for name, value, radius in (("rho", self.rho, self.rho), ("rho_max", self.rho_max, self.search_radius)):
            if radius > MAX_RADIUS:
                given = f" (2 * rho = {radius:g})" if value is None else ""
                raise ValueError(
                    f"Invalid {name}: {value!r}{given}; a radius must be at most {MAX_RADIUS:g} (the norms square "
                    "it, and its square overflows float32 beyond that)"
                )
        # with alpha_max None the grid's top depends on the optimizer: both tops must give a valid grid
        tops = [self.alpha_max] if self.alpha_max is not None else [SGD_ALPHA_MAX, PAPER_ALPHA_MAX]
        largest, smallest = (
            (repr(self.alpha_max),) * 2 if self.alpha_max is not None else ("None (2)", "None (1 with SGD)")
        )
        if max(tops) / self.alpha_step + 1 > MAX_GRID_POINTS:
            raise ValueError(
                f"Invalid alpha_max / alpha_step: {largest} / {self.alpha_step!r} give a grid of more than "
                f"{MAX_GRID_POINTS} points (each costs a forward pass per search); use a coarser alpha_step or a "
                "smaller alpha_max"
            )
        if self.sam_reuse and self.sam_interval == 1 and self.step_rule.sharpness_aware:
            raise ValueError(
                "Invalid sam_reuse: True needs plain steps to reuse the direction on; set sam_interval >= 2"
            )
        if self.searches_alpha and len(self._grid(min(tops))) < 2:
            raise ValueError(
                f"Invalid alpha_max / alpha_step: {smallest} / {self.alpha_step!r} give a one-point search "
                "grid; alpha_max must be at least alpha_step (or turn the search off with alpha_search_interval=0)"
            )

    @property
    def ascent(self) -> Ascent:
        """The ascent of the sharpness-aware steps: ASAM's with ``sam_adaptive``, SAM's otherwise."""
        return AdaptiveAscent(eta=float(self.sam_adaptive_eta)) if self.sam_adaptive else EuclideanAscent()

    @property
    def step_rule(self) -> StepRule:
        """The registry entry of ``sam_method`` (:data:`hf_xsam.rules.STEP_RULES`), climbing with :attr:`ascent`.

        >>> XSAMConfig(sam_method="sam", sam_adaptive=True).step_rule.tags
        ('sharpness-aware-minimization', 'asam')
        """
        return STEP_RULES[self.sam_method].with_ascent(self.ascent)

    @property
    def searches_alpha(self) -> bool:
        """Whether alpha is searched at all (a searching rule with a search interval other than 0)."""
        return self.step_rule.searches_alpha and self.alpha_search_interval != 0

    def top_alpha(self, optimizer: Any = None) -> float:
        """The largest alpha the search may take: ``alpha_max``, or when it is None 1.0 with a base optimizer that
        steps along the direction as it is (:func:`steps_along_direction`) and 2.0 otherwise.

        >>> sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> XSAMConfig().top_alpha(sgd), XSAMConfig().top_alpha(), XSAMConfig(alpha_max=2.0).top_alpha(sgd)
        (1.0, 2.0, 2.0)
        """
        if self.alpha_max is not None:
            return float(self.alpha_max)
        return SGD_ALPHA_MAX if steps_along_direction(optimizer) else PAPER_ALPHA_MAX

    def alpha_grid(self, optimizer: Any = None) -> list[float]:
        """The search grid ``0, alpha_step, ..., top_alpha(optimizer)``."""
        return self._grid(self.top_alpha(optimizer))

    def _grid(self, top: float) -> list[float]:
        count = int(math.floor(top / self.alpha_step + 1e-9)) + 1
        return [round(i * self.alpha_step, 10) for i in range(count)]

    @property
    def search_radius(self) -> float:
        """The radius of the alpha search: ``rho_max``, or ``2 * rho`` when it is None."""
        return 2 * self.rho if self.rho_max is None else self.rho_max

    @property
    def initial_alpha(self) -> float:
        """The alpha a fresh run starts with: the rule's fixed alpha (1 for SAM), ``alpha`` otherwise."""
        fixed = self.step_rule.fixed_alpha
        return float(self.alpha) if fixed is None else fixed

    def sam_start_step(self, max_steps: int) -> int:
        """The first sharpness-aware optimizer step of a run of ``max_steps`` (``ceil(sam_start_ratio * max_steps)``).

        >>> XSAMConfig(sam_start_ratio=0.25).sam_start_step(10)
        3
        """
        return math.ceil(self.sam_start_ratio * max_steps)

    # the two schedules: which steps are sharpness-aware, and which of those search alpha

    def sharpness_aware_step(self, step: int, max_steps: int) -> bool:
        """Whether optimizer step ``step`` (0-based) of a run of ``max_steps`` is sharpness-aware.

        Plain steps come first (``sam_start_ratio``), then every ``sam_interval``-th step from the first
        sharpness-aware one.

        >>> config = XSAMConfig(sam_start_ratio=0.5, sam_interval=2)
        >>> [config.sharpness_aware_step(step, 8) for step in range(8)]
        [False, False, False, False, True, False, True, False]
        """
        if not self.step_rule.sharpness_aware:
            return False
        start = self.sam_start_step(max_steps)
        return step >= start and (step - start) % self.sam_interval == 0

    def search_due(self, step: int, epoch: int, last_search_step: int | None, last_search_epoch: int | None) -> bool:
        """Whether the (sharpness-aware) optimizer step ``step`` of epoch ``epoch`` searches alpha, the last search
        having been on ``last_search_step`` in ``last_search_epoch`` (``None``: no search yet).

        >>> config = XSAMConfig(alpha_search_interval=4)
        >>> config.search_due(3, 0, None, None), config.search_due(3, 0, 0, 0), config.search_due(4, 0, 0, 0)
        (True, False, True)
        """
        if not self.searches_alpha:
            return False
        if last_search_step is None:
            return True
        if self.alpha_search_interval is None:
            return epoch > last_search_epoch
        return step - last_search_step >= self.alpha_search_interval

    @property
    def xsam_settings(self) -> dict[str, Any]:
        """The XSAM fields as a dict (for logs and model cards)."""
        return {f.name: getattr(self, f.name) for f in fields(XSAMConfig)}
