"""The DDP communication hook of ``NoiseScale("ranks")``: per parameter, this rank's local
gradient norm², read from each bucket before DDP's all-reduce."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sgdlens import _torch

__all__ = ["RankNorms"]


class RankNorms:
    """``local``: ‖g_local‖² per parameter, written by a comm hook that then all-reduces.

    The hook adds no communication: it takes the norms of each bucket's gradients and hands
    the bucket to DDP's default all-reduce. DDP cannot drop a comm hook, so :meth:`attach`
    returns a handle whose removal stops the recording; the hook then only all-reduces.
    """

    def __init__(self, params: list[Tensor], dtype: torch.dtype, device: torch.device) -> None:
        self.local = torch.zeros(len(params), dtype=dtype, device=device)
        self._index = {id(p): i for i, p in enumerate(params)}
        self._buckets: dict[tuple[int, ...], Tensor] = {}

    def attach(self, ddp: Any) -> Any:
        """Set ``ddp``'s comm hook; the returned handle's ``remove()`` stops the recording."""
        from collections import OrderedDict

        from torch.utils.hooks import RemovableHandle

        self._recording: OrderedDict[int, Any] = OrderedDict()
        recording = RemovableHandle(self._recording)
        self._recording[recording.id] = True
        ddp.register_comm_hook(None, self._comm_hook)
        return recording

    def _comm_hook(self, process_group, bucket):
        """Record this rank's per-parameter gradient norms, then all-reduce as DDP does.

        After the handle is removed it only all-reduces. Unannotated on purpose: DDP rejects a
        hook whose annotations are not the real ``dist.GradBucket`` / ``Future[Tensor]``
        objects, and this module's are strings.
        """
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        if self._recording:
            grads, params = bucket.gradients(), bucket.parameters()
            key = tuple(self._index[id(p)] for p in params)
            index = self._buckets.get(key)
            if index is None:  # copied to the device once per bucket, not every step
                index = self._buckets[key] = torch.tensor(
                    key, dtype=torch.long, device=self.local.device
                )
            local = _torch.norms(grads, self.local.device, self.local.dtype).square()
            self.local.index_copy_(0, index, local)
        return allreduce_hook(process_group, bucket)
