"""The lens protocol and the views of the parameters it reads.

A lens is a small object with four methods, in the spirit of optax's ``init``/``update`` pairs:

* ``init(view) -> state`` – allocate state (tensors beside the parameters) once, at attach time;
* ``update(state, step) -> state`` – every optimizer step, with the gradients the optimizer
  uses: in the pre-step hook, where ``backward()`` has just left them in cache (after the
  step for a step that takes a closure, like LBFGS, whose gradients only exist then); under
  ``no_grad``; sync-free: no ``.item()``, no data-dependent Python branching except on
  ``step.flag``, which is a Python bool only where reading the device is free (the CPU) and
  ``None`` elsewhere;
* ``prepare(state, step) -> state`` – before the update of a step that will be logged
  (to snapshot what the update changes); most lenses leave it alone;
* ``compute(state, step) -> dict[str, Tensor]`` – at a log point: flat keys to 0-d tensors.

Under torch.distributed a lens's log-point sums are often partial: each rank holds a shard of
every parameter (FSDP), or reads its own batch. Such a lens splits ``compute`` in two and
declares how each sum is added up over the ranks, as torchmetrics declares its reductions:

* ``local(state, step) -> dict[str, Tensor]`` – this rank's sums (the same names and shapes on
  every rank);
* ``reductions`` – ``{name: "shards"}`` for sums over this rank's shards of the parameters
  (added up over the ranks when the parameters are sharded, left alone when every rank holds
  them whole), ``{name: "ranks"}`` for sums over this rank's own data (added up whenever
  several processes train); a name left out stays this rank's;
* ``finish(state, step, sums) -> dict[str, Tensor]`` – the keys, from the added-up sums.

The monitor adds up every lens's sums (and the observed scalars) in one all-reduce per log
point; :meth:`Lens.compute` does the same for one lens called on its own.

A lens that needs more than the optimizer sees (module forward/backward hooks, per-parameter
``register_post_accumulate_grad_hook`` for micro-batches) may also define
``attach(model, view) -> list[RemovableHandle]``; the monitor calls it once after ``init`` and
removes the handles in ``close()``.

A lens declares what it logs in ``keys`` (:class:`~sgdlens.schema.Key`: whole-model and/or
per-layer, a description, a scale; ``metrics`` alone gives per-layer and whole-model keys), which
the monitor writes into the run header's schema (:mod:`sgdlens.schema`).

State is a ``dict`` of tensors, lists of tensors and plain numbers: the monitor saves and
restores it in ``state_dict``. Lenses never copy to the host; the monitor does that once per log.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sgdlens import _dist, _torch
from sgdlens.lenses._step import Step
from sgdlens.schema import Key, declared

State = dict[str, Any]


@dataclass(frozen=True, eq=False)
class ParamView:
    """What a lens may know about the parameters: the tensors and how they group into layers.

    Attributes:
        params: every parameter the optimizer holds, in ``param_groups`` order.
        layer_of: for each parameter, the index of its layer in ``layers``.
        layers: layer names (module names from ``model.named_modules()``, else names
            derived from the param groups).
        device: where per-layer scalars live (the first parameter's device).
        dtype: the dtype of accumulated scalars (float64 unless the backend lacks it).
        log_every: the monitor's log interval in optimizer steps.
        optimizer: the optimizer the monitor watches (for lenses that read its state), or
            ``None``.
        sharded: whether each rank holds only a shard of the parameters (FSDP2 ``fully_shard``,
            FSDP1 ``FULL_SHARD``/``SHARD_GRAD_OP``), so per-layer sums must be added up over
            the ranks (:attr:`Lens.reductions`, or :meth:`reduce_sum`).
        ndims: each parameter's number of dimensions as the model defines it (FSDP1 turns
            parameters into 1-D shards); empty: ``p.dim()``.
    """

    params: tuple[Tensor, ...]
    layer_of: tuple[int, ...]
    layers: tuple[str, ...]
    device: torch.device
    dtype: torch.dtype
    log_every: int
    optimizer: Any = field(default=None, repr=False)
    sharded: bool = False
    ndims: tuple[int, ...] = ()
    _index: dict[tuple[int, ...], Tensor] = field(default_factory=dict, repr=False)
    #: what the monitor's lenses share, built once: the per-sample engine under "per_sample"
    shared: dict[str, Any] = field(default_factory=dict, repr=False)

    @cached_property
    def plain(self) -> bool:
        """Whether every parameter is an ordinary tensor of one device and dtype (no shards):
        then ``.grad`` is read as it is and the squared norms take one fused kernel."""
        first = self.params[0]
        return not self.sharded and all(
            type(p) in (Tensor, nn.Parameter)
            and p.device == first.device
            and p.dtype == first.dtype
            for p in self.params
        )

    @cached_property
    def big(self) -> tuple[int, ...]:
        """The parameters whose norms the CPU takes by rows (see ``_torch.cpu_big``)."""
        return _torch.cpu_big([_torch.local(p) for p in self.params])

    @cached_property
    def flags(self) -> tuple[Tensor, Tensor]:
        """Constant 0-d ``False`` and ``True`` on the device (see :attr:`Step.ok`)."""
        return (
            torch.zeros((), dtype=torch.bool, device=self.device),
            torch.ones((), dtype=torch.bool, device=self.device),
        )

    def ndim(self, i: int) -> int:
        """The number of dimensions of parameter ``i`` as the model defines it."""
        return self.ndims[i] if self.ndims else self.params[i].dim()

    def subset(self, keep: Sequence[int]) -> Subset:
        """The parameters with indices ``keep`` and the layers they belong to."""
        return Subset(self, tuple(keep))

    def layer_index(self, which: Sequence[int]) -> Tensor:
        """A cached device tensor of ``layer_of[i]`` for ``i`` in ``which``."""
        key = tuple(which)
        if key not in self._index:
            self._index[key] = torch.tensor(
                [self.layer_of[i] for i in key], dtype=torch.long, device=self.device
            )
        return self._index[key]

    @property
    def local_params(self) -> list[Tensor]:
        """Each parameter's data on this rank: its shard under FSDP, else the tensor."""
        return [_torch.local(p.detach()) for p in self.params]

    def reduce_sum(self, sums: Tensor) -> Tensor:
        """Sums of squares (or counts) over this rank's shards, summed over every rank.

        Under FSDP each rank holds a shard of every parameter, so per-layer sums of squares
        are partial until they are added up across ranks (one all-reduce; call it at log
        points only). Replicated parameters (one process, DDP) need nothing and get ``sums``.
        A lens's log-point sums are better declared (:attr:`Lens.reductions`): the monitor then
        adds up every lens's in one all-reduce.
        """
        return _dist.all_sum_(sums.clone()) if self.sharded else sums

    def per_layer(self, values: Tensor, which: Sequence[int]) -> Tensor:
        """Sum per-parameter ``values`` (aligned with ``which``) into one entry per layer."""
        out = torch.zeros(len(self.layers), dtype=values.dtype, device=self.device)
        return out.index_add_(0, self.layer_index(which), values)


@dataclass(frozen=True, eq=False)
class Subset:
    """Some of a view's parameters (e.g. weight matrices only) and their layers.

    ``layers`` lists only the layers that keep at least one parameter; per-layer tensors a
    subset returns are over those layers, in the view's order.
    """

    view: ParamView
    which: tuple[int, ...]

    @cached_property
    def params(self) -> list[Tensor]:
        return [self.view.params[i] for i in self.which]

    @cached_property
    def _layer_ids(self) -> list[int]:
        return sorted({self.view.layer_of[i] for i in self.which})

    @cached_property
    def layers(self) -> list[str]:
        return [self.view.layers[j] for j in self._layer_ids]

    @cached_property
    def _compact(self) -> Tensor | None:
        if len(self._layer_ids) == len(self.view.layers):
            return None
        return torch.tensor(self._layer_ids, dtype=torch.long, device=self.view.device)

    @cached_property
    def whole(self) -> bool:
        """Whether the subset is every parameter of the view, in order."""
        return self.which == tuple(range(len(self.view.params)))

    @cached_property
    def _which_t(self) -> Tensor | None:
        if self.whole:
            return None
        return torch.tensor(self.which, dtype=torch.long, device=self.view.device)

    def take(self, per_param: Tensor) -> Tensor:
        """The entries of a per-parameter tensor (over all of the view) for this subset."""
        return per_param if self._which_t is None else per_param.index_select(0, self._which_t)

    def per_layer(self, values: Tensor) -> Tensor:
        """Sum per-parameter ``values`` (aligned with ``params``) into one entry per layer."""
        return self.select(self.view.per_layer(values, self.which))

    def select(self, per_layer: Tensor) -> Tensor:
        """The entries of a per-layer tensor (over all the view's layers) for :attr:`layers`."""
        return per_layer if self._compact is None else per_layer.index_select(0, self._compact)


def per_layer_keys(metric: str, layers: Sequence[str], values: Tensor) -> dict[str, Tensor]:
    """``{"metric/<layer>": values[i]}`` for a per-layer tensor (the hidden group ``""`` of
    parameters kept out of the per-layer keys gets none)."""
    return {f"{metric}/{name}": v for name, v in zip(layers, values.unbind()) if name}


class Lens:
    """Base class for lenses: no-op ``prepare`` and a readable ``repr``. Subclasses set ``name``."""

    name: str = "lens"
    #: the metric names it logs, as ``"<metric>"`` and ``"<metric>/<layer>"`` keys
    metrics: tuple[str, ...] = ()
    #: what each metric is (whole-model and/or per-layer, description, scale: the run header's
    #: schema, :mod:`sgdlens.schema`); a name of ``metrics`` left out is per-layer and whole
    keys: tuple[Key, ...] = ()
    #: whether it must update at every step (it accumulates through hooks), even when
    #: ``PhaseMonitor(overhead_budget=...)`` has the other lenses read a sample of the steps
    every_step: bool = False
    #: how each sum :meth:`local` returns is added up over the ranks: ``"shards"`` or
    #: ``"ranks"`` (see the module docstring); a name left out stays this rank's
    reductions: ClassVar[Mapping[str, str]] = {}

    def init(self, view: ParamView) -> State:
        raise NotImplementedError

    def release(self) -> None:
        """Forget what the lens holds at run time (views, engines: references to the model
        and its parameters) once its monitor closes; its settings stay."""
        for name in [n for n in vars(self) if n.startswith("_")]:
            delattr(self, name)

    def logged(self, view: ParamView) -> tuple[tuple[Key, ...], list[str]]:
        """The keys this lens, as configured and attached, logs, and the layers of its
        per-layer keys (for the run header's schema). Default: every declared key, every
        layer; a lens that logs fewer overrides it."""
        return declared(self), list(view.layers)

    def update(self, state: State, step: Step) -> State:
        return state

    def prepare(self, state: State, step: Step) -> State:
        return state

    def local(self, state: State, step: Step) -> dict[str, Tensor]:
        """At a log point, this rank's sums for :meth:`finish` (see :attr:`reductions`)."""
        return {}

    def finish(self, state: State, step: Step, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        """The logged keys from :meth:`local`'s sums, added up over the ranks as declared."""
        raise NotImplementedError

    def compute(self, state: State, step: Step) -> dict[str, Tensor]:
        """The logged keys: :meth:`local`, reduced over the ranks, then :meth:`finish` (a lens
        with no cross-rank sums may override this alone)."""
        return self.finish(
            state, step, reduce_sums(step.view, [self], [self.local(state, step)])[0]
        )


def refuse_sharded(lens: Lens, view: ParamView, why: str) -> None:
    """At ``init``: a lens that cannot run on sharded parameters (FSDP) says so, and why."""
    if view.sharded:
        raise ValueError(
            f"{lens!r} cannot run under FSDP: {why}. Use it under DDP or in one process "
            f"(GradSNR, GradNorm and WeightNorms run under FSDP)"
        )


#: the cross-rank reductions a lens may declare for its :meth:`Lens.local` sums
REDUCTIONS = ("shards", "ranks")


def declares_sums(lens: Any) -> bool:
    """Whether ``lens`` computes through ``local``/``finish`` (so the monitor may add up its sums
    together with the other lenses'), rather than through its own ``compute``."""
    return isinstance(lens, Lens) and type(lens).compute is Lens.compute


def check_reductions(lens: Any, where: str) -> None:
    """Refuse a ``reductions`` declaration the monitor cannot carry out (at construction)."""
    red = getattr(lens, "reductions", {})
    if not isinstance(red, Mapping) or any(
        not isinstance(k, str) or v not in REDUCTIONS for k, v in red.items()
    ):
        raise ValueError(
            f"{where} {type(lens).__name__}.reductions = {red!r} must map each name local() "
            f"returns to "
            f"'shards' (summed over the ranks' shards of the parameters, under FSDP) or "
            f"'ranks' (summed over every rank's own data), e.g. {{'sq': 'shards'}}"
        )


def reduce_sums(
    view: ParamView,
    lenses: Sequence[Lens],
    sums: Sequence[dict[str, Tensor]],
    extra: Tensor | None = None,
) -> list[dict[str, Tensor]]:
    """Every lens's :meth:`Lens.local` sums, added up over the ranks as it declares, in one
    all-reduce (nothing at all in one process): one dict per lens, like ``sums``.

    ``extra`` (1-D, ``view.dtype``) rides along as ``"ranks"`` (the monitor's observed sums);
    it is summed in place.
    """
    world = _dist.rank_and_size()[1]
    if world == 1:
        return list(sums)
    parts: list[tuple[int, str]] = []
    for i, (lens, local) in enumerate(zip(lenses, sums)):
        for name in local:
            how = lens.reductions.get(name)
            if how == "ranks" or (how == "shards" and view.sharded):
                parts.append((i, name))
    flat = [sums[i][name].reshape(-1).to(view.dtype) for i, name in parts]
    if extra is not None:
        flat.append(extra)
    if not flat:
        return list(sums)
    total = _dist.all_sum_(torch.cat(flat))
    out = [dict(local) for local in sums]
    pieces = total.split([t.numel() for t in flat])
    for (i, name), piece in zip(parts, pieces):
        old = sums[i][name]
        out[i][name] = piece.view(old.shape).to(old.dtype)
    if extra is not None:
        extra.copy_(pieces[-1])
    return out
