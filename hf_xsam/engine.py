"""The XSAM step over a list of parameters, independent of transformers.

One call of :meth:`XSAM.step` turns the gradient of one (micro-)batch into the XSAM direction:

    w0 = w;  g0 = grad L(w0)                                  (the reported loss)
    for i in 1..k:  w <- w + (rho / k) g / (||g|| + eps)      (ascent; g the gradient at w)
    g_k = grad L(w_k);  v0 = (w_k - w0) / ||w_k - w0||;  v1 = g_k / ||g_k||
    theta = arccos <v0, v1>;  u(alpha) = sin((1-alpha) theta)/sin theta v0 + sin(alpha theta)/sin theta v1
    d = ||g_k|| u(alpha);  w <- w0 (exact copy);  grad <- d

On search steps alpha is the grid value that maximises the loss at ``w0 + rho_max u(alpha)``, found by
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
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from .config import XSAMConfig
from .geometry import (
    Plane,
    add_scaled_,
    addcmul_scaled_,
    angle,
    global_dot,
    global_norm,
    global_norms,
    slerp_coefficients,
)
from .guards import RunningStatsGuard, replayed_random_state
from .search import SEARCHES, best_index
from .state import validate_state

__all__ = ["XSAM", "XSAMStepStats", "check_one_device"]

GradientReducer = Callable[[list[Tensor]], None]
# The searches kept in `search_history` (enough for the model card and the plots); older ones are counted only.
SEARCH_HISTORY_LENGTH = 64
# The ascent counts as stalled when it moved the weights less than this fraction of one ascent step.
STALLED_ASCENT = 0.5


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def check_one_device(params: Iterable[Tensor]) -> None:
    """Refuse trainable parameters spread over several devices, naming the alternatives."""
    devices = sorted({str(p.device) for p in params if p.requires_grad})
    if len(devices) > 1:
        raise ValueError(
            f"XSAM needs the trainable parameters on one device, found them on {', '.join(devices)} (a model "
            "split by `device_map` or offloaded to the CPU): load the model on one device, or shard it "
            "with FSDP2 (`fsdp_config={'fsdp_version': 2}`)"
        )


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


class XSAM:
    """XSAM (eXplicit Sharpness-Aware Minimization) as a gradient transformation.

    The engine leaves in ``p.grad`` the direction the base optimizer should step along, and the weights
    exactly as they were. It owns one parameter-sized buffer (the saved weights), plus one for the
    accumulated direction when ``accumulate=True`` is used, and one for the kept direction with ``sam_reuse``
    (call :meth:`reuse_direction_` on the plain steps, after the gradient is complete). Which steps are
    sharpness-aware is the caller's choice (``config.sharpness_aware_step(step, max_steps)`` gives the schedule).

    Args:
        params: the parameters to train; only those with ``requires_grad`` and a gradient take part.
        config: the settings (:class:`~hf_xsam.XSAMConfig`; a training-arguments object is one). Instead of a
            config, its fields may be given as keywords: ``XSAM(params, rho=0.1)``.
        modules: modules whose BatchNorm running statistics must only see the first pass.
        reduce_gradients: averages a list of gradients across data-parallel workers in place.
        reduce_losses: averages a 1-D tensor of losses across workers in place (alpha search).
        optimizer: the base optimizer that steps along the direction; with ``alpha_max=None`` it sets the top of
            the search grid (:meth:`~hf_xsam.XSAMConfig.top_alpha`: 1.0 for SGD, 2.0 otherwise and without one).

    With ``sam_perturbation="local"`` the final direction is reduced once per optimizer step; with
    ``"global"`` every gradient is reduced before it is used, so the step equals one device on the global
    batch.

    References:
        J. Chen, Z. Zhou, "Revisiting Sharpness-Aware Minimization: A More Faithful and Effective
        Implementation", ICLR 2026, arXiv:2603.10048.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        config: XSAMConfig | None = None,
        *,
        modules: Iterable[nn.Module] = (),
        reduce_gradients: GradientReducer | None = None,
        reduce_losses: GradientReducer | None = None,
        optimizer: torch.optim.Optimizer | None = None,
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
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("XSAM got no parameter with requires_grad=True: there is nothing to train")
        check_one_device(self.params)
        # FSDP2 shards parameters as DTensors: the engine works on local shards and sums norms and dot
        # products over the shards with one all-reduce each
        self.sharded = any(isinstance(p, DTensor) for p in self.params)
        self.alpha = self.config.initial_alpha
        # the grid's top for this base optimizer, and the grid the searches walk
        self.alpha_max = self.config.top_alpha(optimizer)
        self.alpha_grid = self.config.alpha_grid(optimizer)
        modules = list(modules)
        self.running_stats = RunningStatsGuard(modules)
        # FSDP2 keeps the root's gathered weights after a forward without backward: drop them after every
        # search evaluation, or the next forward would reuse weights of the previous point
        self.fsdp_modules = [m for m in modules if isinstance(m, FSDPModule)]
        self.reduce_gradients = reduce_gradients
        self.reduce_losses = reduce_losses
        self.last_search_step: int | None = None
        self.last_search_epoch: int | None = None
        self.search_count = 0
        # extrapolate_after_drop: the loss at w0 of the first search, the reference for the drop
        self.first_search_loss: float | None = None
        self.search_history: deque[dict[str, Any]] = deque(maxlen=SEARCH_HISTORY_LENGTH)
        # forward passes of the alpha searches so far (the search's cost, for the logs)
        self.search_forwards = 0
        self._saved: dict[Tensor, Tensor] = {}
        self._accumulated: dict[Tensor, Tensor] = {}
        # the parameters earlier micro-batches of the current optimizer step gave a direction (in `_accumulated`)
        self._step_owners: set[Tensor] = set()
        # sam_reuse: the part of the last sharpness-aware direction orthogonal to its first gradient
        self._reused: dict[Tensor, Tensor] = {}
        self._reuse_fresh = True  # the next sharpness-aware micro-batch starts a new kept direction
        self._reuse_micro_batches = 0  # the micro-batches summed into the kept direction (it keeps their mean)
        self._buffer_lists: dict[tuple[int, ...], list[Tensor]] = {}
        # whether a micro-batch of the current optimizer step was non-finite (OR over micro-batches)
        self._step_nonfinite: Tensor | None = None

    # ----------------------------------------------------------------------------------------------
    # schedule and state

    def search_due(self, step: int, epoch: int) -> bool:
        """Whether the optimizer step ``step`` (in epoch ``epoch``) searches alpha."""
        if not self.config.searches_alpha:
            return False
        if self.last_search_step is None:
            return True
        if self.config.alpha_search_interval is None:
            return epoch > self.last_search_epoch
        return step - self.last_search_step >= self.config.alpha_search_interval

    def state_dict(self) -> dict[str, Any]:
        """The alpha in use, the search schedule and the recent searches, as JSON-serialisable values."""
        return {
            "alpha": self.alpha,
            "last_search_step": self.last_search_step,
            "last_search_epoch": self.last_search_epoch,
            "search_count": self.search_count,
            "search_history": list(self.search_history),
            "first_search_loss": self.first_search_loss,
        }

    def load_state_dict(self, state: dict[str, Any]) -> list[str]:
        """Restore what :meth:`state_dict` returned, under the current settings; returns what was not taken.

        The settings win over the saved state: the saved alpha is used only where the settings search alpha
        and it lies on the current grid. Otherwise alpha is the one the settings give (and a search is due at
        once where the settings search). Each returned line names the saved and the used value.

        Raises:
            ValueError: naming the field, when the state is damaged (see :func:`hf_xsam.state.validate_state`).
        """
        state = validate_state(state)
        self.search_count = state["search_count"]
        self.search_history = deque(state["search_history"], maxlen=SEARCH_HISTORY_LENGTH)
        self.last_search_step = state.get("last_search_step")
        self.last_search_epoch = state.get("last_search_epoch")
        # a checkpoint from before extrapolate_after_drop has none: the next search becomes the reference
        self.first_search_loss = state.get("first_search_loss")
        saved_alpha, config = state["alpha"], self.config
        on_grid = any(abs(saved_alpha - a) < 1e-9 for a in self.alpha_grid)
        if config.searches_alpha and on_grid:
            self.alpha = saved_alpha
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

    # ----------------------------------------------------------------------------------------------
    # the step

    def _active(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """The parameters with a gradient, and their (local shards of) weights and gradients.

        In ``"global"`` mode the gradients are averaged over the workers first, and the parameters are those with a
        gradient on any worker (the same list on every worker, which every later reduction of the step uses).
        """
        owners = [p for p in self.params if p.grad is not None]
        if self.config.sam_perturbation == "global" and self.reduce_gradients is not None:
            owners = self._average_over_workers_(owners)[0]
        return owners, self._locals(owners), self._gradients(owners)

    def _locals(self, tensors: list[Tensor]) -> list[Tensor]:
        return [_local(t) for t in tensors] if self.sharded else tensors

    def _gradients(self, owners: list[Tensor]) -> list[Tensor]:
        return self._locals([p.grad for p in owners])

    def _buffers(self, store: dict[Tensor, Tensor], owners: list[Tensor]) -> list[Tensor]:
        """The buffers of ``owners`` in ``store`` (made on first use); the lists are kept for the next steps."""
        key = (id(store), *map(id, owners))
        buffers = self._buffer_lists.get(key)
        if buffers is None:
            for p in owners:
                if p not in store:
                    store[p] = torch.zeros_like(_local(p))
            if len(self._buffer_lists) >= 16:  # parameters that come and go (LayerDrop): keep the cache small
                self._buffer_lists.clear()
            buffers = self._buffer_lists[key] = [store[p] for p in owners]
        return buffers

    def _norm(self, tensors: list[Tensor]) -> Tensor:
        return self._over_shards(global_norm(tensors))

    def _norms(self, *lists: list[Tensor]) -> Tensor:
        return self._over_shards(global_norms(*lists))

    def _over_shards(self, norms: Tensor) -> Tensor:
        """The norms of whole tensors from those of this worker's shards (FSDP2); unsharded, ``norms`` as given."""
        if not self.sharded:
            return norms
        squares = norms.square()
        dist.all_reduce(squares)
        return squares.sqrt()

    def _dot(self, xs: list[Tensor], ys: list[Tensor]) -> Tensor:
        dot = global_dot(xs, ys)
        if self.sharded:
            dist.all_reduce(dot)
        return dot

    def _reduce_if_global(self, grads: list[Tensor]) -> None:
        if self.config.sam_perturbation == "global" and self.reduce_gradients is not None:
            self.reduce_gradients(grads)

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

        The step is three named parts between a saved copy of the weights and its exact restore:
        :meth:`_ascend` (the climb to ``w_k`` and the gradient there), :meth:`_search_alpha` (on search steps) and
        :meth:`_direction_` (``||g_k|| u(alpha)``). With ``sam_reuse``, the part of the direction orthogonal to
        the first gradient is kept for the plain steps (:meth:`reuse_direction_`).

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
        with torch.enable_grad():
            loss = forward_backward()
        owners, params, first_grads = self._active()
        # sam_reuse measures the kept direction against ||g0||; the ascent may scale g0 in place
        first_norm = self._norm(first_grads) if self.config.sam_reuse else None
        saved = self.saved_weights(owners)
        torch._foreach_copy_(saved, params)
        try:
            with self.running_stats:
                ascent_loss, grads, ascent_norms, climbed = self._ascend(forward_backward, owners, params, first_grads)
                # params now hold the displacement w_k - w0 (v0 before normalisation)
                torch._foreach_sub_(params, saved)
                plane = self._plane(params, grads, climbed)
                # a non-finite gradient in any pass makes the sum of the norms non-finite
                nonfinite = ~torch.isfinite(ascent_norms + plane.grad_norm)
                if loss_only is not None and self.search_due(step, epoch):
                    radius = self.rule.ascent.search_radius(self.config, climbed)
                    self._search_alpha(loss_only, params, saved, grads, plane, radius, nonfinite, mean_loss)
                    self.last_search_step, self.last_search_epoch = step, epoch
                    self.search_count += 1
                    self.search_history[-1]["step"] = step
                self.rule.direction_(grads, params, plane, self.alpha, nonfinite, self.config.sam_eps)
        finally:
            # back to w0 exactly, whatever happened above
            torch._foreach_copy_(params, saved)
            self._drop_late_gradients(owners)
        if self.config.sam_reuse:
            self._keep_orthogonal_(owners, grads, first_grads, first_norm)
        skip = self._accumulate(owners, grads, accumulate, nonfinite)
        return XSAMStepStats(loss, ascent_loss, plane.theta, nonfinite, plane.stalled, skip)

    def _ascend(
        self, forward_backward: Callable[[], Tensor], owners: list[Tensor], params: list[Tensor], grads: list[Tensor]
    ) -> tuple[Tensor, list[Tensor], Tensor, Tensor | float]:
        """Climb ``k`` steps of ``rho / k`` from ``w0`` with the rule's ascent and take the gradient ``g_k`` at ``w_k``.

        Returns the loss at ``w_k``, ``g_k``, the sum of the norms that normalised the ascent steps (non-finite when
        a gradient was) and the climb's Euclidean length. The first gradient ``grads`` is left as it was, or scaled by
        a positive number (see ``add_scaled_``).
        """
        config, ascent = self.config, self.rule.ascent
        saved = self.saved_weights(owners)
        norms, lengths = [], []
        for i in range(config.ascent_steps):
            if i > 0:
                grads = self._fresh_gradient(forward_backward, owners)[1]
            norm, length = ascent.climb_(
                params, saved, grads, config.rho / config.ascent_steps, self._norms, config.sam_eps
            )
            norms.append(norm)
            lengths.append(length)
        ascent_loss, grads = self._fresh_gradient(forward_backward, owners)
        return ascent_loss, grads, sum(norms[1:], norms[0]), sum(lengths[1:], lengths[0])

    def _plane(self, displacement: list[Tensor], grads: list[Tensor], climbed: Tensor | float) -> Plane:
        """The plane of ``v0`` (along ``displacement = w_k - w0``) and ``v1`` (along ``g_k``): norms and angle.

        ``climbed`` is the Euclidean length the ascent meant to climb; the ascent stalled when the weights moved less
        than half of one of its ``k`` steps.
        """
        config = self.config
        grad_norm, displacement_norm = self._norms(grads, displacement)
        # an ascent that rounded away (rho below the weights' resolution) leaves no plane: theta = 0
        # makes u(alpha) = v1, SAM's direction, for every alpha
        stalled = displacement_norm <= STALLED_ASCENT * climbed / config.ascent_steps
        theta = angle(self._dot(displacement, grads), displacement_norm, grad_norm, config.sam_eps)
        return Plane(grad_norm, displacement_norm, torch.where(stalled, 0.0, theta), stalled)

    def saved_weights(self, owners: list[Tensor] | None = None) -> list[Tensor]:
        """The buffers holding the saved weights ``w0`` of ``owners`` (all parameters by default), made on first use.

        Between steps they hold the weights of the last step's start; this is the one parameter-sized buffer the
        engine keeps (see :meth:`buffer_elements`).
        """
        return self._buffers(self._saved, self.params if owners is None else owners)

    def buffer_elements(self) -> dict[str, int]:
        """Elements held in the engine's buffers: ``saved`` (w0), ``accumulated`` (directions, with gradient
        accumulation) and ``reused`` (the kept direction, with ``sam_reuse``)."""
        stores = {"saved": self._saved, "accumulated": self._accumulated, "reused": self._reused}
        return {name: sum(buffer.numel() for buffer in store.values()) for name, store in stores.items()}

    def _keep_orthogonal_(
        self, owners: list[Tensor], direction: list[Tensor], first: list[Tensor], first_norm: Tensor
    ) -> None:
        """``sam_reuse``: add to the kept direction the part of this micro-batch's ``direction`` orthogonal to its
        first gradient, divided by that gradient's norm ``first_norm``; ``first`` is that gradient or a positive
        multiple of it (scratch: its pass is over). The first micro-batch of a step starts the kept direction anew,
        and the last divides the sum by the number of micro-batches (:meth:`_accumulate`).
        """
        if self._reuse_fresh and self._reused:
            torch._foreach_zero_(list(self._reused.values()))
        if self._reuse_fresh:
            self._reuse_micro_batches = 0
        self._reuse_fresh = False
        self._reuse_micro_batches += 1
        # first <- direction - <direction, first> / ||first||^2 first, the orthogonal part, then divided by ||g0||:
        # measured against the gradient it was orthogonal to
        scaled_norm = self._norm(first)
        torch._foreach_mul_(first, -self._dot(direction, first) / (scaled_norm.square() + self.config.sam_eps))
        torch._foreach_add_(first, direction)
        add_scaled_(self._buffers(self._reused, owners), first, 1.0 / (first_norm + self.config.sam_eps))

    @torch.no_grad()
    def reuse_direction_(self) -> None:
        """On a plain step, with ``sam_reuse``: ``g <- g + min(sam_reuse_scale, ||k||) ||g|| / ||k|| k`` in ``p.grad``.

        ``k = d_perp / ||g0||`` is the part of the last sharpness-aware direction ``d`` orthogonal to that step's first
        gradient ``g0``, measured against ``g0`` (the mean over its micro-batches and workers). The reused part is
        LookSAM's (Liu et al., CVPR 2022: ``sam_reuse_scale`` times the gradient's norm), but never larger, relative to
        the gradient, than the sharpness-aware step measured it: where theta is tiny the orthogonal part is mostly
        noise, and lifting it to ``0.7 ||g||`` for several steps can stall what the base optimizer trains
        (docs/method.md, "Cheap schedules"). Before the first sharpness-aware step, and after one that was skipped as
        non-finite, it is zero and the step stays plain. Call it once per optimizer step, after the gradient is
        complete (accumulated and averaged over workers) and before clipping.
        """
        owners = [p for p in self.params if p.grad is not None]
        if not self._reused or not owners:
            return
        grads = self._gradients(owners)
        kept = self._buffers(self._reused, owners)
        grad_norm, kept_norm = self._norms(grads, kept)
        size = torch.clamp(kept_norm, max=self.config.sam_reuse_scale)
        addcmul_scaled_(grads, kept, size * grad_norm / (kept_norm + self.config.sam_eps))

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

    def _drop_late_gradients(self, owners: list[Tensor]) -> None:
        """Parameters without a gradient in the first pass get none from this micro-batch.

        A later pass may reach parameters the first did not (LayerDrop, branches used only at the ascent
        point); their raw ascent gradient lies outside the XSAM direction.
        """
        if len(owners) == len(self.params):
            return
        owned = set(owners)
        for p in self.params:
            if p not in owned:
                p.grad = None

    def _fresh_gradient(
        self, forward_backward: Callable[[], Tensor], owners: list[Tensor]
    ) -> tuple[Tensor, list[Tensor]]:
        """Drop the gradients, run a pass, and return its loss and the new gradients.

        The pass writes its gradients into fresh tensors (no zeroing, no accumulation); a parameter it does not
        reach gets a zero gradient.
        """
        for p in owners:
            p.grad = None
        with torch.enable_grad():
            loss = forward_backward()
        for p in owners:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = self._gradients(owners)
        self._reduce_if_global(grads)
        return loss, grads

    def _accumulate(self, owners: list[Tensor], grads: list[Tensor], accumulate: bool, nonfinite: Tensor) -> Tensor:
        """Add this micro-batch's direction to the step's; returns whether the step so far was non-finite.

        On the last micro-batch every parameter that any micro-batch of the step reached receives the sum of its
        directions, and the buffers are left empty, as the Trainer's own accumulation leaves them. In ``"local"``
        mode the sum is then averaged over the workers, and the flag covers every worker: it travels in the same
        all-reduce (in ``"global"`` mode every worker already saw the same gradients).
        """
        if self._step_nonfinite is not None:
            nonfinite = nonfinite | self._step_nonfinite
        if accumulate:
            self._step_nonfinite = nonfinite
            self._step_owners.update(owners)
            torch._foreach_add_(self._buffers(self._accumulated, owners), grads)
            for p in owners:  # the next micro-batch's first pass writes fresh gradients
                p.grad = None
            return nonfinite
        self._step_nonfinite = None
        if self._accumulated:
            owners, grads = self._with_earlier_micro_batches(owners, grads)
            accumulated = self._buffers(self._accumulated, owners)
            torch._foreach_add_(grads, accumulated)
            torch._foreach_zero_(accumulated)
        local = self.config.sam_perturbation == "local" and self.reduce_gradients is not None
        kept = self._buffers(self._reused, self.params if local else owners) if self.config.sam_reuse else []
        if local:
            nonfinite = self._average_over_workers_(owners, kept, nonfinite)[1]
        if kept:
            self._reuse_fresh = True
            # the mean over the step's micro-batches; a skipped step leaves nothing to reuse: zero the kept
            # direction (NaN * 0 is NaN, hence nan_to_num)
            torch._foreach_mul_(kept, (~nonfinite).to(kept[0].dtype) / max(self._reuse_micro_batches, 1))
            for tensor in kept:
                tensor.nan_to_num_(0.0, 0.0, 0.0)
        return nonfinite

    def _with_earlier_micro_batches(
        self, owners: list[Tensor], grads: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """``owners`` and their gradients, extended by the parameters only earlier micro-batches of the step reached
        (given a zero gradient, to which their accumulated direction is added)."""
        earlier, self._step_owners = self._step_owners, set()
        if len(owners) == len(self.params) or earlier.issubset(owners):
            return owners, grads
        owners = [p for p in self.params if p.grad is not None or p in earlier]
        for p in owners:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return owners, self._gradients(owners)

    def _average_over_workers_(
        self, owners: list[Tensor], extra: Sequence[Tensor] = (), flag: Tensor | None = None
    ) -> tuple[list[Tensor], Tensor]:
        """Average the gradients of all parameters over the workers, with ``extra`` and ``flag``, in one all-reduce.

        Every worker must reduce the same list, whatever its micro-batches reached (a branch, LayerDrop): a parameter
        without a gradient on this worker counts as zero, as DDP counts it, and one without a gradient on every worker
        gets none. Returns the parameters with a gradient and whether ``flag`` was set on any worker.
        """
        complete = len(owners) == len(self.params)
        if not complete:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        grads = self._gradients(self.params)
        # which parameters this worker reached, and the flag, in the same reduction as the gradients
        reached = torch.ones(len(self.params) + 1, dtype=grads[-1].dtype, device=grads[-1].device)
        if not complete:
            owned = set(owners)
            reached[:-1] = torch.tensor([p in owned for p in self.params], dtype=reached.dtype)
        reached[-1:] = flag.reshape(1) if flag is not None else 0.0
        self.reduce_gradients([*grads, *extra, reached])
        if complete:
            return self.params, reached[-1] > 0
        # a host read, only on a worker that missed a parameter: which ones no worker reached
        for p, anywhere in zip(self.params, reached[:-1].tolist()):
            if not anywhere:
                p.grad = None
        return [p for p in self.params if p.grad is not None], reached[-1] > 0

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
    ) -> None:
        """Search the grid for the alpha whose point ``w0 + radius u(alpha)`` has the largest loss (``radius``: the
        rule's Euclidean search radius, ``rho_max`` for SAM's ascent).

        The strategy (``alpha_search``, see :mod:`hf_xsam.search`) asks for grid points; each batch of them is
        evaluated under the same random state and its losses averaged over workers before any decision.
        """
        # every worker must take the same branch: decide on the flag of all of them
        any_nonfinite = nonfinite.float().reshape(1)
        if self.reduce_losses is not None:
            self.reduce_losses(any_nonfinite)
        if any_nonfinite.item() > 0:
            self.search_history.append({"alpha": self.alpha, "theta": float("nan"), "losses": []})
            return
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
                    for module in self.fsdp_modules:
                        module.reshard()
                losses_tensor = torch.stack(losses)
                if self.reduce_losses is not None:
                    self.reduce_losses(losses_tensor)
                return losses_tensor.tolist()

            def evaluate(indices: Sequence[int]) -> list[float]:
                # w0 + rho_max u(alpha_i), from the saved copy
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
        self.search_history.append(record)
