"""Context managers that keep the extra XSAM passes from changing model state or the random stream.

Example:
    >>> import torch
    >>> from hf_xsam.guards import RunningStatsGuard, replayed_random_state
    >>> bn = torch.nn.BatchNorm1d(2)
    >>> guard = RunningStatsGuard([bn])
    >>> with guard:
    ...     _ = bn(torch.randn(4, 2))
    >>> int(bn.num_batches_tracked)
    0
    >>> with replayed_random_state(torch.device("cpu")) as replay:
    ...     a = replay(lambda: torch.rand(1))
    ...     b = replay(lambda: torch.rand(1))
    >>> bool(a == b)
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["RunningStatsGuard", "replayed_random_state"]

T = TypeVar("T")


class RunningStatsGuard:
    """Snapshots the running statistics of every BatchNorm-like layer and puts them back on exit.

    Setting ``momentum = 0`` is not enough: layers built with ``momentum=None`` keep cumulative averages
    whose counters still move, so the statistics themselves are saved and restored.
    """

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self.buffers = [
            buffer
            for module in modules
            if isinstance(module, _NormBase) and module.track_running_stats
            for buffer in (module.running_mean, module.running_var, module.num_batches_tracked)
            if buffer is not None
        ]
        self._saved: list[torch.Tensor] = []

    def __enter__(self) -> RunningStatsGuard:
        if self.buffers:
            self._saved = torch._foreach_clone(self.buffers)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.buffers:
            with torch.no_grad():
                torch._foreach_copy_(self.buffers, self._saved)
            self._saved = []


@contextlib.contextmanager
def replayed_random_state(device: torch.device) -> Iterator[Callable[[Callable[[], T]], T]]:
    """Yields ``replay(fn)``, which runs ``fn`` from the random state of entry every time.

    On exit the random state is that of entry, so the training stream continues as if nothing had run:
    dropout masks are identical for every call, and the next training pass draws what it would have.
    """
    devices = [device] if device.type not in ("cpu", "meta") else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        cpu_state = torch.get_rng_state()
        device_module = getattr(torch, device.type, None) if devices else None
        device_state = device_module.get_rng_state(device) if device_module is not None else None

        def replay(fn: Callable[[], T]) -> T:
            torch.set_rng_state(cpu_state)
            if device_state is not None:
                device_module.set_rng_state(device_state, device)
            return fn()

        yield replay
