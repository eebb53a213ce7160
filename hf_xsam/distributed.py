"""Averaging lists of tensors across data-parallel workers with few, bucketed collective calls.

Example:
    >>> import torch
    >>> from hf_xsam.distributed import all_reduce_mean_
    >>> grads = [torch.ones(2), torch.ones(3)]
    >>> all_reduce_mean_(grads)  # a no-op without an initialised process group
    >>> grads[0].tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["all_reduce_mean_", "forget_unsynchronised_use_", "BUCKET_BYTES"]

BUCKET_BYTES = 32 * 2**20


def _buckets(tensors: list[Tensor], bucket_bytes: int) -> Iterator[list[Tensor]]:
    """Consecutive runs of tensors of one dtype and device, each run at most ``bucket_bytes`` (or one tensor)."""
    bucket: list[Tensor] = []
    size = 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        same_kind = not bucket or (tensor.dtype == bucket[0].dtype and tensor.device == bucket[0].device)
        if bucket and (not same_kind or size + nbytes > bucket_bytes):
            yield bucket
            bucket, size = [], 0
        bucket.append(tensor)
        size += nbytes
    if bucket:
        yield bucket


@torch.no_grad()
def all_reduce_mean_(tensors: list[Tensor], bucket_bytes: int = BUCKET_BYTES) -> None:
    """Average ``tensors`` in place over all workers: one all-reduce per bucket of ``bucket_bytes``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not tensors:
        return
    world_size = dist.get_world_size()
    for bucket in _buckets(tensors, bucket_bytes):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat)
        flat.div_(world_size)
        torch._foreach_copy_(
            bucket, [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in bucket]), bucket)]
        )


def forget_unsynchronised_use_(model: nn.Module) -> None:
    """Make DDP forget which parameters the backward passes run under ``no_sync`` used, once their step is done.

    With ``find_unused_parameters``, DDP's reducer marks every parameter a backward pass reaches, also under
    ``no_sync`` (so that gradients accumulated there are all-reduced later), and clears the marks only at the end of
    the next synchronised backward. A sharpness-aware step runs all its passes under ``no_sync``; after its optimizer
    step the gradients are set to None, and a parameter it used that the next synchronised backward does not reach
    is then "used" with no gradient: the reducer raises "Encountered gradient which is undefined, but still
    allreduced". The reset clears the marks (a host-side fill, no communication, no device sync); with
    ``find_unused_parameters`` off, or a static graph, the reducer keeps no such marks and the model is left alone.
    """
    if isinstance(model, DistributedDataParallel) and model.find_unused_parameters and not model.static_graph:
        model.reducer._reset_state()
