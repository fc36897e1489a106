"""Weight norms and weight motion.

Per layer ``l`` at a log step ``t`` (after the update):

* ``weight_norm/<l>``  = ‖w_t‖;
* ``weight_dist/<l>``  = ‖w_t − w_0‖, with ``w_0`` the weights when the monitor attached
  (with ``WeightNorms(distance=True)``, the class's default; the monitor's default lenses
  leave it out, since ``w_0`` is one more copy of the weights on the device);
* ``update_size/<l>``  = ‖w_t − w_{t−1}‖, the size of this step's update;
* ``update_ratio/<l>`` = update_size / weight_norm;

and the same four of the concatenated weights without a layer suffix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor

from sgdlens import _torch
from sgdlens.lenses.base import Key, Lens, ParamView, State, Step, per_layer_keys

__all__ = ["WeightNorms"]


class WeightNorms(Lens):
    """Weight norm, distance from the attach-time weights, and the size of the logged update.

    Nothing runs between log points. Memory: with ``distance=True`` one copy of the weights
    taken at attach time (for ``weight_dist``); for the duration of each logged step only, a
    copy of the weights before the update (for ``update_size``).

    Logged keys: ``weight_norm/<l>``, ``update_size/<l>``, ``update_ratio/<l>`` (and with
    ``distance=True`` ``weight_dist/<l>``) for every layer, and ``weight_norm``,
    ``update_size``, ``update_ratio`` (``weight_dist``) for the whole model.

    Args:
        distance: keep the attach-time weights and log the distance from them.

    Example:
        >>> import torch
        >>> from sgdlens import PhaseMonitor, lenses
        >>> opt = torch.optim.SGD(torch.nn.Linear(3, 1).parameters(), lr=0.1)
        >>> monitor = PhaseMonitor(opt, lenses=[lenses.WeightNorms()])
    """

    name = "weights"
    keys = (
        Key("weight_norm", "norm of the weights after the logged update"),
        Key("weight_dist", "distance of the weights from those at attach time"),
        Key("update_size", "norm of the logged step's update"),
        Key("update_ratio", "update_size / weight_norm"),
    )
    metrics = tuple(k.name for k in keys)

    def __init__(self, *, distance: bool = True) -> None:
        if not isinstance(distance, bool):
            raise TypeError(f"WeightNorms(distance=...) must be a bool, got {distance!r}")
        self.distance = distance

    def __repr__(self) -> str:
        return "WeightNorms()" if self.distance else "WeightNorms(distance=False)"

    def logged(self, view: ParamView) -> tuple[tuple[Key, ...], list[str]]:
        keys = tuple(k for k in self.keys if self.distance or k.name != "weight_dist")
        return keys, list(view.layers)

    def init(self, view: ParamView) -> State:
        with torch.no_grad():
            init = [p.clone() for p in view.local_params] if self.distance else None
            return {"init": init, "prev": None}

    def prepare(self, state: State, step: Step) -> State:
        state["prev"] = [p.clone() for p in step.view.local_params]
        return state

    reductions: ClassVar[Mapping[str, str]] = {
        "norm": "shards",
        "dist": "shards",
        "update": "shards",
    }

    def local(self, state: State, step: Step) -> dict[str, Tensor]:
        view = step.view
        params = view.local_params
        everything = range(len(params))
        sums = {
            "norm": view.per_layer(
                _torch.norms(params, view.device, view.dtype).square(), everything
            )
        }
        if state["init"] is not None:
            dist = _torch.distances(params, state["init"], view.device, view.dtype)
            sums["dist"] = view.per_layer(dist.square(), everything)
        if state["prev"] is not None:
            upd = _torch.distances(params, state["prev"], view.device, view.dtype)
            sums["update"] = view.per_layer(upd.square(), everything)
        return sums

    def finish(self, state: State, step: Step, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        view = step.view
        norm_sq = sums["norm"]
        out = {
            **per_layer_keys("weight_norm", view.layers, norm_sq.sqrt()),
            "weight_norm": norm_sq.sum().sqrt(),
        }
        if "dist" in sums:
            dist_sq = sums["dist"]
            out.update(per_layer_keys("weight_dist", view.layers, dist_sq.sqrt()))
            out["weight_dist"] = dist_sq.sum().sqrt()
        if "update" in sums:
            upd_sq = sums["update"]
            state["prev"] = None
            out.update(per_layer_keys("update_size", view.layers, upd_sq.sqrt()))
            out.update(per_layer_keys("update_ratio", view.layers, (upd_sq / norm_sq).sqrt()))
            out["update_size"] = upd_sq.sum().sqrt()
            out["update_ratio"] = (upd_sq.sum() / norm_sq.sum()).sqrt()
        return out
