"""The parameters an XSAM step works on: which tensors, their shards, the engine's buffers, the micro-batch
accumulation and the reductions over data-parallel workers.

The method (:mod:`hf_xsam.engine`) asks this module for weights, gradients, norms and dot products, and hands it
each micro-batch's direction; how those are found, summed and reduced depends on one :class:`Mode`, which the
trainer chooses:

- ``single``: one process.
- ``ddp-local``: each worker ascends with its own gradient; the direction is averaged once per optimizer step.
- ``ddp-global``: every gradient is averaged over the workers before it is used (one device on the global batch).
- ``fsdp``: FSDP2 has averaged every gradient and sharded it (DTensors); the step works on local shards, and norms
  and dot products sum over the shards with one all-reduce each.

Example:
    >>> import torch
    >>> from hf_xsam.parameters import Mode, ParameterSet
    >>> w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    >>> w.grad = torch.tensor([0.0, 2.0])
    >>> parameters = ParameterSet([w], Mode.SINGLE)
    >>> owners, weights, grads = parameters.active()
    >>> float(parameters.norm(grads)), parameters.mode.value
    (2.0, 'single')
    >>> parameters.buffer_elements()
    {'saved': 0, 'accumulated': 0, 'reused': 0}
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from .geometry import global_dot, global_norm, global_norms

__all__ = ["Mode", "ParameterSet", "GradientReducer", "check_one_device"]

GradientReducer = Callable[[list[Tensor]], None]
# the cached lists of buffers; parameters that come and go (LayerDrop) would grow the cache without bound
BUFFER_LISTS_KEPT = 16


class Mode(str, enum.Enum):
    """How the step's gradients are found and reduced (see the module's docstring)."""

    SINGLE = "single"
    DDP_LOCAL = "ddp-local"
    DDP_GLOBAL = "ddp-global"
    FSDP = "fsdp"

    @classmethod
    def choose(cls, *, workers: int, fsdp: bool, perturbation: str) -> Mode:
        """The mode of a run on ``workers`` processes, sharded by FSDP2 or not, with ``sam_perturbation``.

        >>> Mode.choose(workers=2, fsdp=False, perturbation="local").value
        'ddp-local'
        """
        if fsdp:
            return cls.FSDP
        if workers <= 1:
            return cls.SINGLE
        return cls.DDP_GLOBAL if perturbation == "global" else cls.DDP_LOCAL


def check_one_device(params: Iterable[Tensor]) -> None:
    """Refuse trainable parameters spread over several devices, naming the alternatives."""
    devices = sorted({str(p.device) for p in params if p.requires_grad})
    if len(devices) > 1:
        raise ValueError(
            f"XSAM needs the trainable parameters on one device, found them on {', '.join(devices)} (a model "
            "split by `device_map` or offloaded to the CPU): load the model on one device, or shard it "
            "with FSDP2 (`fsdp_config={'fsdp_version': 2}`)"
        )


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class ParameterSet:
    """The trainable parameters of an XSAM step and everything the step needs to know about where they live.

    Args:
        params: the trainable parameters (all with ``requires_grad``), on one device.
        mode: how gradients are found and reduced.
        reduce_gradients: averages a list of tensors over the workers in place (the DDP modes).
        reduce_losses: averages a 1-D tensor over the workers in place (every mode with several workers).
        modules: the model's modules (FSDP2's gathered weights are released after each loss-only forward).
    """

    def __init__(
        self,
        params: list[Tensor],
        mode: Mode,
        reduce_gradients: GradientReducer | None = None,
        reduce_losses: GradientReducer | None = None,
        modules: Iterable[nn.Module] = (),
    ) -> None:
        if mode in (Mode.DDP_LOCAL, Mode.DDP_GLOBAL) and reduce_gradients is None:
            raise ValueError(f"mode {mode.value!r} needs reduce_gradients (the average over the workers)")
        self.params = params
        self.mode = mode
        self.reduce_gradients = reduce_gradients
        self.reduce_losses = reduce_losses
        # FSDP2 keeps the root's gathered weights after a forward without backward: release them after every
        # loss-only forward, or the next forward would reuse the weights of the previous point
        self.fsdp_modules = [m for m in modules if isinstance(m, FSDPModule)]
        self._stores: dict[str, dict[Tensor, Tensor]] = {"saved": {}, "accumulated": {}, "reused": {}}
        self._buffer_lists: dict[tuple[int, ...], list[Tensor]] = {}
        # the parameters earlier micro-batches of the current optimizer step gave a direction (in "accumulated")
        self._step_owners: set[Tensor] = set()
        # whether a micro-batch of the current optimizer step was non-finite (OR over micro-batches)
        self._step_nonfinite: Tensor | None = None

    # ----------------------------------------------------------------------------------------------
    # tensors and buffers

    def with_gradient(self) -> list[Tensor]:
        """The parameters that have a gradient now."""
        return [p for p in self.params if p.grad is not None]

    def local(self, tensors: list[Tensor]) -> list[Tensor]:
        """This worker's shards of ``tensors`` (the tensors themselves, unsharded)."""
        return [_local(t) for t in tensors] if self.mode is Mode.FSDP else tensors

    def gradients(self, owners: list[Tensor]) -> list[Tensor]:
        """The (local shards of the) gradients of ``owners``."""
        return self.local([p.grad for p in owners])

    def active(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """The parameters with a gradient, and their (local shards of) weights and gradients.

        In ``ddp-global`` mode the gradients are averaged over the workers first, and the parameters are those with a
        gradient on any worker (the same list on every worker, which every later reduction of the step uses).
        """
        owners = self.with_gradient()
        if self.mode is Mode.DDP_GLOBAL:
            owners = self._average_over_workers_(owners)[0]
        return owners, self.local(owners), self.gradients(owners)

    def buffers(self, name: str, owners: list[Tensor]) -> list[Tensor]:
        """The buffers ``name`` (``saved``, ``accumulated`` or ``reused``) of ``owners``, made on first use."""
        store = self._stores[name]
        key = (id(store), *map(id, owners))
        buffers = self._buffer_lists.get(key)
        if buffers is None:
            for p in owners:
                if p not in store:
                    store[p] = torch.zeros_like(_local(p))
            if len(self._buffer_lists) >= BUFFER_LISTS_KEPT:
                self._buffer_lists.clear()
            buffers = self._buffer_lists[key] = [store[p] for p in owners]
        return buffers

    def has_buffers(self, name: str) -> bool:
        return bool(self._stores[name])

    def zero_buffers_(self, name: str) -> None:
        """Zero every buffer of the store ``name`` made so far."""
        if self._stores[name]:
            torch._foreach_zero_(list(self._stores[name].values()))

    def buffer_elements(self) -> dict[str, int]:
        """Elements held in each store of buffers."""
        return {name: sum(b.numel() for b in store.values()) for name, store in self._stores.items()}

    # ----------------------------------------------------------------------------------------------
    # geometry over the shards

    def norm(self, tensors: list[Tensor]) -> Tensor:
        return self._over_shards(global_norm(tensors))

    def norms(self, *lists: list[Tensor]) -> Tensor:
        """The norm of each list, as one vector per list (one multi-tensor kernel, one all-reduce with FSDP2)."""
        return self._over_shards(global_norms(*lists))

    def dot(self, xs: list[Tensor], ys: list[Tensor]) -> Tensor:
        dot = global_dot(xs, ys)
        if self.mode is Mode.FSDP:
            dist.all_reduce(dot)
        return dot

    def _over_shards(self, norms: Tensor) -> Tensor:
        """The norms of whole tensors from those of this worker's shards (FSDP2); unsharded, ``norms`` as given."""
        if self.mode is not Mode.FSDP:
            return norms
        squares = norms.square()
        dist.all_reduce(squares)
        return squares.sqrt()

    # ----------------------------------------------------------------------------------------------
    # passes

    def fresh_gradient(
        self, forward_backward: Callable[[], Tensor], owners: list[Tensor]
    ) -> tuple[Tensor, list[Tensor]]:
        """Drop the gradients, run a pass, and return its loss and the new gradients.

        The pass writes its gradients into fresh tensors (no zeroing, no accumulation); a parameter it does not
        reach gets a zero gradient. In ``ddp-global`` mode they are averaged over the workers.
        """
        for p in owners:
            p.grad = None
        with torch.enable_grad():
            loss = forward_backward()
        for p in owners:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = self.gradients(owners)
        if self.mode is Mode.DDP_GLOBAL:
            self.reduce_gradients(grads)
        return loss, grads

    def loss_only_done(self) -> None:
        """After a forward without backward: release FSDP2's gathered weights."""
        for module in self.fsdp_modules:
            module.reshard()

    def drop_late_gradients(self, owners: list[Tensor]) -> None:
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

    # ----------------------------------------------------------------------------------------------
    # micro-batches and workers

    def add_micro_batch_(self, owners: list[Tensor], grads: list[Tensor], nonfinite: Tensor) -> Tensor:
        """Not the last micro-batch: add its direction to the step's and clear ``p.grad``; returns whether the step
        so far was non-finite."""
        if self._step_nonfinite is not None:
            nonfinite = nonfinite | self._step_nonfinite
        self._step_nonfinite = nonfinite
        self._step_owners.update(owners)
        torch._foreach_add_(self.buffers("accumulated", owners), grads)
        for p in owners:  # the next micro-batch's first pass writes fresh gradients
            p.grad = None
        return nonfinite

    def complete_step_(
        self,
        owners: list[Tensor],
        grads: list[Tensor],
        nonfinite: Tensor,
        also_reduce: Callable[[list[Tensor]], list[Tensor]] = lambda owners: [],
    ) -> tuple[list[Tensor], Tensor]:
        """The last micro-batch: leave the step's direction in ``p.grad``.

        Every parameter that any micro-batch of the step reached receives the sum of its directions, and the
        accumulation buffers are left empty, as the Trainer's own accumulation leaves them. In ``ddp-local`` mode the
        sum is then averaged over the workers together with ``also_reduce(parameters)`` (tensors of those parameters
        to average in the same all-reduce), and the flag covers every worker (in ``ddp-global`` mode every worker
        already saw the same gradients). Returns ``also_reduce``'s tensors and whether the step must be skipped.
        """
        if self._step_nonfinite is not None:
            nonfinite = nonfinite | self._step_nonfinite
        self._step_nonfinite = None
        if self.has_buffers("accumulated"):
            owners, grads = self._with_earlier_micro_batches(owners, grads)
            accumulated = self.buffers("accumulated", owners)
            torch._foreach_add_(grads, accumulated)
            torch._foreach_zero_(accumulated)
        if self.mode is not Mode.DDP_LOCAL:
            return also_reduce(owners), nonfinite
        extra = also_reduce(self.params)
        return extra, self._average_over_workers_(owners, extra, nonfinite)[1]

    def any_worker(self, flag: Tensor) -> bool:
        """Whether ``flag`` is set on any worker (a host read: every worker takes the same branch after it)."""
        flags = flag.float().reshape(1)
        if self.reduce_losses is not None:
            self.reduce_losses(flags)
        return flags.item() > 0

    def mean_over_workers_(self, losses: Tensor) -> None:
        """Average a 1-D tensor of losses over the workers in place."""
        if self.reduce_losses is not None:
            self.reduce_losses(losses)

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
        return owners, self.gradients(owners)

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
        grads = self.gradients(self.params)
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
