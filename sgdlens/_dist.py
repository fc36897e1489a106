"""torch.distributed, when it is initialised: the rank, and the monitor's few collectives.

Without an initialised process group every function here is a no-op for one process, so the
monitor's single-process path never touches torch.distributed.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor


def rank_and_size() -> tuple[int, int]:
    """``(rank, world size)``, ``(0, 1)`` outside an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum_(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks in place (one all-reduce), or leave it alone in one process."""
    if rank_and_size()[1] > 1:
        dist.all_reduce(t)
    return t


def replicas(sharded: bool) -> int:
    """How many ranks' batches the optimizer's gradient averages: the world size under data
    parallelism with replicated parameters (DDP averages the ranks' gradients), else 1.

    The micro-batch and per-sample estimators read this rank's batches, but ``.grad`` after
    DDP's all-reduce is the gradient of the global batch, ``world`` times the local one.
    """
    return 1 if sharded else rank_and_size()[1]


def broadcast_(t: Tensor) -> Tensor:
    """Rank 0's ``t`` on every rank (in place), or ``t`` itself in one process."""
    if rank_and_size()[1] > 1:
        dist.broadcast(t, src=0)
    return t


def broadcast_object(obj: Any) -> Any:
    """Rank 0's picklable ``obj`` on every rank, or ``obj`` itself in one process."""
    if rank_and_size()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
