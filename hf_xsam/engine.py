"""The XSAM step over a list of parameters, independent of transformers.

One call of :meth:`XSAM.step` turns the gradient of one (micro-)batch into the XSAM direction:

    w0 = w;  g0 = grad L(w0)                                  (the reported loss)
    for i in 1..k:  w <- w + (rho / k) g / (||g|| + eps)      (ascent; g the gradient at w; the rule's ascent)
    g_k = grad L(w_k);  v0 = (w_k - w0) / ||w_k - w0||;  v1 = g_k / ||g_k||
    theta = arccos <v0, v1>;  u(alpha) = sin((1-alpha) theta)/sin theta v0 + sin(alpha theta)/sin theta v1
    d = ||g_k|| u(alpha);  w <- w0 (exact copy);  grad <- d

With ``sam_adaptive`` the ascent is ASAM's (:mod:`hf_xsam.ascent`). On search steps alpha is the grid value that
maximises the loss at ``w0 + rho_max u(alpha)`` (for the adaptive ascent, at the climb's length times
``rho_max / rho``), found by
evaluating every grid point (``alpha_search="grid"``) or a coarse pass and a refinement (``"coarse_to_fine"``). With
``extrapolate_after_drop`` > 0 (the default) an alpha past 1 is capped (the best searched point at or below 1) until
the loss has fallen that fraction;
with ``alpha_max=None`` (the default) the grid ends at 1 when the ``optimizer`` given is SGD, at 2 otherwise.

Example:
    >>> import torch
    >>> from hf_xsam.engine import XSAM
    >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    >>> def forward_backward():
    ...     loss = (w ** 4).sum()
    ...     loss.backward()
    ...     return loss.detach()
    >>> paper = XSAM([w], rho=0.1, extrapolate_after_drop=0.0)
    >>> loss = paper.step(forward_backward, lambda: (w ** 4).sum(), step=0)
    >>> paper.alpha  # searched on the first step: the arc's largest loss
    2.0
    >>> w.tolist()  # restored exactly; w.grad holds the XSAM direction
    [1.0, 2.0]
    >>> w.grad = None
    >>> engine = XSAM([w], rho=0.1)
    >>> loss = engine.step(forward_backward, lambda: (w ** 4).sum(), step=0)
    >>> engine.alpha, engine.search_history[-1]["capped"]  # the first search: no drop of the loss yet
    (1.0, 2.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from .config import XSAMConfig
from .geometry import Plane, angle, slerp_coefficients
from .guards import RunningStatsGuard, replayed_random_state
from .parameters import GradientReducer, Mode, ParameterSet, check_one_device
from .reuse import KeptDirection
from .search import SEARCHES, best_index
from .state import SearchState

__all__ = ["XSAM", "XSAMStepStats", "check_one_device"]

# The ascent counts as stalled when it moved the weights less than this fraction of one ascent step.
STALLED_ASCENT = 0.5


@dataclass
class XSAMStepStats:
    """What one XSAM step measured, as 0-dim tensors on the parameters' device (no host sync)."""

    loss: Tensor
    ascent_loss: Tensor
    theta: Tensor
    nonfinite: Tensor
    """A pass of this micro-batch produced a non-finite gradient (its direction is poisoned with NaN)."""
    stalled: Tensor
    """The ascent moved the weights less than half a step (rho below the weights' float resolution)."""
    skip: Tensor
    """The optimizer step must be skipped: a micro-batch of it was non-finite, on any worker (last micro-batch)."""


def _search_state_field(name: str) -> property:
    """The engine's attribute ``name``, read from and written to its :class:`~hf_xsam.state.SearchState`."""
    return property(
        lambda engine: getattr(engine.search_state, name),
        lambda engine, value: setattr(engine.search_state, name, value),
        doc=f"``search_state.{name}``.",
    )


class XSAM:
    """XSAM (eXplicit Sharpness-Aware Minimization) as a gradient transformation.

    The engine leaves in ``p.grad`` the direction the base optimizer should step along, and the weights
    exactly as they were. It owns one parameter-sized buffer (the saved weights), plus one for the
    accumulated direction when ``accumulate=True`` is used, and one for the kept direction with ``sam_reuse``
    (call :meth:`reuse_direction_` on the plain steps, after the gradient is complete). Which steps are
    sharpness-aware is the caller's choice (``config.sharpness_aware_step(step, max_steps)`` gives the schedule).

    The method is here; the step rule (:mod:`hf_xsam.rules`) supplies the ascent and the direction, and the
    parameters' plumbing (shards, buffers, micro-batches, reductions over workers) is a
    :class:`~hf_xsam.parameters.ParameterSet` in one :class:`~hf_xsam.parameters.Mode`.

    Args:
        params: the parameters to train; only those with ``requires_grad`` and a gradient take part.
        config: the settings (:class:`~hf_xsam.XSAMConfig`; a training-arguments object is one). Instead of a
            config, its fields may be given as keywords: ``XSAM(params, rho=0.1)``.
        modules: modules whose BatchNorm running statistics must only see the first pass.
        reduce_gradients: averages a list of gradients across data-parallel workers in place.
        reduce_losses: averages a 1-D tensor of losses across workers in place (alpha search).
        optimizer: the base optimizer that steps along the direction; with ``alpha_max=None`` it sets the top of
            the search grid (:meth:`~hf_xsam.XSAMConfig.top_alpha`: 1.0 for SGD, 2.0 otherwise and without one).
        mode: how gradients are reduced (the trainer chooses it with :meth:`~hf_xsam.parameters.Mode.choose`); by
            default FSDP2 where the parameters are DTensors, else one process without ``reduce_gradients``, else DDP
            with ``sam_perturbation``'s mode.

    With ``sam_perturbation="local"`` the final direction is reduced once per optimizer step; with
    ``"global"`` every gradient is reduced before it is used, so the step equals one device on the global
    batch.

    References:
        J. Chen, Z. Zhou, "Revisiting Sharpness-Aware Minimization: A More Faithful and Effective
        Implementation", ICLR 2026, arXiv:2603.10048.
    """

    alpha = _search_state_field("alpha")
    last_search_step = _search_state_field("last_search_step")
    last_search_epoch = _search_state_field("last_search_epoch")
    search_count = _search_state_field("search_count")
    search_history = _search_state_field("search_history")
    first_search_loss = _search_state_field("first_search_loss")

    def __init__(
        self,
        params: Iterable[Tensor],
        config: XSAMConfig | None = None,
        *,
        modules: Iterable[nn.Module] = (),
        reduce_gradients: GradientReducer | None = None,
        reduce_losses: GradientReducer | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        mode: Mode | None = None,
        **settings: Any,
    ) -> None:
        if config is not None and settings:
            raise TypeError(f"XSAM takes a config or settings as keywords, not both (got {sorted(settings)})")
        self.config = config if config is not None else XSAMConfig(**settings)
        self.rule = self.config.step_rule
        if not self.rule.sharpness_aware:
            raise ValueError(
                f"Invalid sam_method: {self.config.sam_method!r} takes no XSAM step; use the base optimizer alone"
            )
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("XSAM got no parameter with requires_grad=True: there is nothing to train")
        check_one_device(params)
        if mode is None:
            sharded = any(isinstance(p, DTensor) for p in params)
            workers = 1 if reduce_gradients is None else 2
            mode = Mode.choose(workers=workers, fsdp=sharded, perturbation=self.config.sam_perturbation)
        modules = list(modules)
        self.parameters = ParameterSet(params, mode, reduce_gradients, reduce_losses, modules)
        self.kept = KeptDirection(self.parameters, self.config.sam_reuse_scale, self.config.sam_eps)
        self.running_stats = RunningStatsGuard(modules)
        self.search_state = SearchState(alpha=self.config.initial_alpha)
        # the grid's top for this base optimizer, and the grid the searches walk
        self.alpha_max = self.config.top_alpha(optimizer)
        self.alpha_grid = self.config.alpha_grid(optimizer)
        # forward passes of the alpha searches so far (the search's cost, for the logs)
        self.search_forwards = 0

    @property
    def params(self) -> list[Tensor]:
        """The trainable parameters."""
        return self.parameters.params

    @property
    def sharded(self) -> bool:
        """Whether the parameters are FSDP2 shards."""
        return self.parameters.mode is Mode.FSDP

    # ----------------------------------------------------------------------------------------------
    # the step

    @torch.no_grad()
    def step(
        self,
        forward_backward: Callable[[], Tensor],
        loss_only: Callable[[], Tensor] | None = None,
        *,
        step: int = 0,
        epoch: int = 0,
        accumulate: bool = False,
        mean_loss: Callable[[], Tensor] | None = None,
    ) -> XSAMStepStats:
        """Run one XSAM step on one (micro-)batch and leave the direction in ``p.grad``.

        In the order of the method (docs/method.md): the loss and gradient at ``w0``; the climb to ``w_k`` and
        the gradient there (:meth:`_ascend`); the plane of ``v0`` and ``v1`` (:meth:`_plane`); on search steps, alpha
        (:meth:`_search_alpha`); the direction ``||g_k|| u(alpha)`` (the rule's ``direction_``); the weights back to
        ``w0`` exactly; the micro-batch's direction into the step's. With ``sam_reuse``, the part of the direction
        orthogonal to the first gradient is kept for the plain steps (:meth:`reuse_direction_`).

        Args:
            forward_backward: computes the loss at the current weights, calls ``backward`` on it and returns
                it detached. Called ``k + 1`` times; the first call may update BatchNorm statistics.
            loss_only: the loss at the current weights without gradient (needed on search steps).
            step: index of the optimizer step, for the search schedule.
            epoch: index of the epoch, for the search schedule.
            accumulate: ``True`` for every micro-batch but the last of an optimizer step: the direction is
                added to an internal buffer and ``p.grad`` is cleared. On the last micro-batch ``p.grad`` of every
                parameter a micro-batch reached receives the sum of its directions and, in ``"local"`` mode, is
                averaged across workers.
            mean_loss: the loss at the current weights without gradient, as a mean over this micro-batch's own items
                (default ``loss_only``). ``extrapolate_after_drop`` compares it from one search to the next: give it
                where ``loss_only`` is a share of the optimizer step's items (a loss divided by the step's token
                count under gradient accumulation), which changes with how the items fall over the micro-batches.

        Returns:
            :class:`XSAMStepStats` with the loss at ``w0``, the loss at the ascent point, the angle theta
            (radians), whether a gradient was non-finite (then ``p.grad`` is non-finite too, so a gradient
            scaler skips the step), whether the ascent stalled, and whether the optimizer step must be skipped.
        """
        parameters, config = self.parameters, self.config
        with torch.enable_grad():
            loss = forward_backward()  # L(w0), g0
        owners, weights, first_grads = parameters.active()
        # sam_reuse measures the kept direction against ||g0||; the ascent may scale g0 in place
        first_norm = parameters.norm(first_grads) if config.sam_reuse else None
        saved = parameters.buffers("saved", owners)
        torch._foreach_copy_(saved, weights)
        try:
            with self.running_stats:
                ascent_loss, grads, ascent_norms, climbed = self._ascend(
                    forward_backward, owners, weights, saved, first_grads
                )
                torch._foreach_sub_(weights, saved)  # weights hold w_k - w0 (v0 before normalisation)
                plane = self._plane(weights, grads, climbed)
                nonfinite = ~torch.isfinite(ascent_norms + plane.grad_norm)  # any pass non-finite
                if loss_only is not None and self.search_due(step, epoch):
                    radius = self.rule.ascent.search_radius(config, climbed)
                    record = self._search_alpha(loss_only, weights, saved, grads, plane, radius, nonfinite, mean_loss)
                    self.search_state.record_search(step, epoch, record)
                self.rule.direction_(grads, weights, plane, self.alpha, nonfinite, config.sam_eps)
        finally:
            torch._foreach_copy_(weights, saved)  # back to w0 exactly, whatever happened above
            parameters.drop_late_gradients(owners)
        if config.sam_reuse:
            self.kept.keep_(owners, grads, first_grads, first_norm)
        if accumulate:
            skip = parameters.add_micro_batch_(owners, grads, nonfinite)
        else:
            reduce_kept = self.kept.buffers if config.sam_reuse else lambda owners: []
            kept, skip = parameters.complete_step_(owners, grads, nonfinite, reduce_kept)
            if config.sam_reuse:
                self.kept.close_step_(kept, skip)
        return XSAMStepStats(loss, ascent_loss, plane.theta, nonfinite, plane.stalled, skip)

    def _ascend(
        self,
        forward_backward: Callable[[], Tensor],
        owners: list[Tensor],
        weights: list[Tensor],
        saved: list[Tensor],
        grads: list[Tensor],
    ) -> tuple[Tensor, list[Tensor], Tensor, Tensor | float]:
        """Climb ``k`` steps of ``rho / k`` from ``w0`` (held in ``saved``) with the rule's ascent and take the gradient
        ``g_k`` at ``w_k``.

        Returns the loss at ``w_k``, ``g_k``, the sum of the norms that normalised the ascent steps (non-finite when
        a gradient was) and the climb's Euclidean length. The first gradient ``grads`` is left as it was, or scaled by
        a positive number.
        """
        config, parameters = self.config, self.parameters
        radius = config.rho / config.ascent_steps
        norms, lengths = [], []
        for i in range(config.ascent_steps):
            if i > 0:
                grads = parameters.fresh_gradient(forward_backward, owners)[1]
            norm, length = self.rule.ascent.climb_(weights, saved, grads, radius, parameters.norms, config.sam_eps)
            norms.append(norm)
            lengths.append(length)
        ascent_loss, grads = parameters.fresh_gradient(forward_backward, owners)
        return ascent_loss, grads, sum(norms[1:], norms[0]), sum(lengths[1:], lengths[0])

    def _plane(self, displacement: list[Tensor], grads: list[Tensor], climbed: Tensor | float) -> Plane:
        """The plane of ``v0`` (along ``displacement = w_k - w0``) and ``v1`` (along ``g_k``): norms and angle.

        ``climbed`` is the Euclidean length the ascent meant to climb; the ascent stalled when the weights moved less
        than half of one of its ``k`` steps.
        """
        config = self.config
        grad_norm, displacement_norm = self.parameters.norms(grads, displacement)
        # an ascent that rounded away (rho below the weights' resolution) leaves no plane: theta = 0
        # makes u(alpha) = v1, SAM's direction, for every alpha
        stalled = displacement_norm <= STALLED_ASCENT * climbed / config.ascent_steps
        theta = angle(self.parameters.dot(displacement, grads), displacement_norm, grad_norm, config.sam_eps)
        return Plane(grad_norm, displacement_norm, torch.where(stalled, 0.0, theta), stalled)

    def _search_alpha(
        self,
        loss_only: Callable[[], Tensor],
        params: list[Tensor],
        saved: list[Tensor],
        grads: list[Tensor],
        plane: Plane,
        radius: Tensor | float,
        nonfinite: Tensor,
        mean_loss: Callable[[], Tensor] | None = None,
    ) -> dict[str, Any]:
        """Search the grid for the alpha whose point ``w0 + radius u(alpha)`` has the largest loss (``radius``: the
        rule's Euclidean search radius, ``rho_max`` for SAM's ascent).

        The strategy (``alpha_search``, see :mod:`hf_xsam.search`) asks for grid points; each batch of them is
        evaluated under the same random state and its losses averaged over workers before any decision. Returns the
        search's record (for :attr:`search_history`).
        """
        # every worker must take the same branch: decide on the flag of all of them
        if self.parameters.any_worker(nonfinite):
            return {"alpha": self.alpha, "theta": float("nan"), "losses": []}
        displacement = torch._foreach_clone(params)
        grid, theta = self.alpha_grid, plane.theta
        c0, c1 = slerp_coefficients(theta, torch.tensor(grid, dtype=theta.dtype, device=theta.device))
        along_displacement = (radius * c0 / (plane.displacement_norm + self.config.sam_eps)).tolist()
        along_gradient = (radius * c1 / (plane.grad_norm + self.config.sam_eps)).tolist()
        with replayed_random_state(params[0].device) as replay:

            def losses_at(
                points: Sequence[tuple[float, float]], loss_of: Callable[[], Tensor] = loss_only
            ) -> list[float]:
                """The (worker-averaged) losses ``loss_of`` at ``w0 + a (w_k - w0) + b g_k`` for each ``(a, b)``."""
                losses = []
                for along_d, along_g in points:
                    torch._foreach_copy_(params, saved)
                    torch._foreach_add_(params, displacement, alpha=along_d)
                    torch._foreach_add_(params, grads, alpha=along_g)
                    losses.append(replay(loss_of).detach().float().reshape(()))
                    self.parameters.loss_only_done()
                losses_tensor = torch.stack(losses)
                self.parameters.mean_over_workers_(losses_tensor)
                return losses_tensor.tolist()

            def evaluate(indices: Sequence[int]) -> list[float]:
                # w0 + radius u(alpha_i), from the saved copy
                return losses_at([(along_displacement[i], along_gradient[i]) for i in indices])

            index, seen = SEARCHES[self.config.alpha_search](grid, evaluate)
            self.search_forwards += len(seen)
            record: dict[str, Any] = {}
            if self.config.extrapolate_after_drop > 0 and index is not None:
                # the loss at w0 in a form that compares across searches (mean_loss), under the search's random state
                (record["loss0"],) = losses_at([(0.0, 0.0)], mean_loss or loss_only)
                self.search_forwards += 1
                index = self._cap_before_drop(grid, index, record["loss0"], seen, record)
        torch._foreach_copy_(params, displacement)
        if index is not None:
            self.alpha = grid[index]
        evaluated = sorted(seen)
        record.update(alpha=self.alpha, theta=math.degrees(theta.item()), losses=[seen[i] for i in evaluated])
        if len(evaluated) < len(grid):
            record["alphas"] = [grid[i] for i in evaluated]
        return record

    def _cap_before_drop(
        self, grid: list[float], index: int, loss0: float, seen: dict[int, float], record: dict[str, Any]
    ) -> int | None:
        """``extrapolate_after_drop``: the grid index to keep, given the search's choice ``index``, its loss ``loss0``
        at ``w0`` and every loss it saw (``seen``); ``None`` keeps the current alpha.

        The first finite ``loss0`` is the reference (a non-finite one is not kept: the next search's is taken). While
        ``loss0`` has not fallen ``extrapolate_after_drop`` times the reference's magnitude below it (a reference at
        or below zero too: ``reference - f |reference|``), an alpha past 1 is capped: the search's choice among the
        points it evaluated at or below 1 (the largest finite loss, the tie rule of :func:`~hf_xsam.search.best_index`).
        """
        if self.first_search_loss is None and math.isfinite(loss0):
            self.first_search_loss = loss0
        reference = self.first_search_loss
        if grid[index] <= 1.0:
            return index
        if reference is not None and loss0 <= reference - self.config.extrapolate_after_drop * abs(reference):
            return index  # False for a NaN loss0: it caps
        record["capped"] = grid[index]
        capped = best_index({i: loss for i, loss in seen.items() if grid[i] <= 1.0}, grid)
        if capped is not None:
            return capped
        # no finite loss at or below 1: alpha stays, but not above 1
        below_one = [i for i, alpha in enumerate(grid) if alpha <= 1.0]
        return None if self.alpha <= 1.0 else below_one[-1]

    # ----------------------------------------------------------------------------------------------
    # plain steps, buffers, schedule and state

    @torch.no_grad()
    def reuse_direction_(self) -> None:
        """On a plain step, with ``sam_reuse``: ``g <- g + min(sam_reuse_scale, ||k||) ||g|| / ||k|| k`` in ``p.grad``.

        ``k = d_perp / ||g0||`` is the part of the last sharpness-aware direction ``d`` orthogonal to that step's first
        gradient ``g0``, measured against ``g0`` (the mean over its micro-batches and workers); see
        :meth:`hf_xsam.reuse.KeptDirection.apply_`. Call it once per optimizer step, after the gradient is complete
        (accumulated and averaged over workers) and before clipping.
        """
        self.kept.apply_()

    def saved_weights(self, owners: list[Tensor] | None = None) -> list[Tensor]:
        """The buffers holding the saved weights ``w0`` of ``owners`` (all parameters by default), made on first use.

        Between steps they hold the weights of the last step's start; this is the one parameter-sized buffer the
        engine keeps (see :meth:`buffer_elements`).
        """
        return self.parameters.buffers("saved", self.params if owners is None else owners)

    def buffer_elements(self) -> dict[str, int]:
        """Elements held in the engine's buffers: ``saved`` (w0), ``accumulated`` (directions, with gradient
        accumulation) and ``reused`` (the kept direction, with ``sam_reuse``)."""
        return self.parameters.buffer_elements()

    def search_due(self, step: int, epoch: int) -> bool:
        """Whether the optimizer step ``step`` (in epoch ``epoch``) searches alpha (:meth:`XSAMConfig.search_due`)."""
        return self.config.search_due(step, epoch, self.last_search_step, self.last_search_epoch)

    def state_dict(self) -> dict[str, Any]:
        """The alpha in use, the search schedule and the recent searches, as JSON-serialisable values."""
        return self.search_state.to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> list[str]:
        """Restore what :meth:`state_dict` returned, under the current settings; returns what was not taken.

        The settings win over the saved state: the saved alpha is used only where the settings search alpha
        and it lies on the current grid. Otherwise alpha is the one the settings give (and a search is due at
        once where the settings search). Each returned line names the saved and the used value.

        Raises:
            ValueError: naming the field, when the state is damaged (see :class:`hf_xsam.state.SearchState`).
        """
        self.search_state = SearchState.from_dict(state)
        saved_alpha, config = self.alpha, self.config
        on_grid = any(abs(saved_alpha - a) < 1e-9 for a in self.alpha_grid)
        if config.searches_alpha and on_grid:
            return []
        self.alpha = config.initial_alpha
        if config.searches_alpha:
            self.last_search_step = self.last_search_epoch = None
            reason = f"it is not on the search grid 0..{self.alpha_max:g} step {config.alpha_step:g}; searching again"
        elif config.step_rule.fixed_alpha is not None:
            reason = f"sam_method={config.sam_method!r} uses alpha {config.step_rule.fixed_alpha:g}"
        else:
            reason = "the alpha search is off (alpha_search_interval=0), so the alpha setting applies"
        if saved_alpha == self.alpha:
            return []
        return [f"saved alpha {saved_alpha:g} not used ({reason}): alpha is {self.alpha:g}"]
