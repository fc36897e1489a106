"""The gradient noise scale of McCandlish et al. (2018): ``B_simple = tr Σ / |G|²``.

``G`` is the true gradient and ``Σ`` the per-example gradient covariance; a batch of ``B``
examples has ``E‖G_B − G‖² = tr Σ / B``, so ``B_simple`` is the batch size past which a larger
batch stops paying. Two gradient estimates over batches of sizes ``B_small < B_big`` give
unbiased estimates of each (the paper's App. A.1)::

    |G|² ≈ (B_big·|G_big|² − B_small·|G_small|²) / (B_big − B_small)
    tr Σ ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

Their ratio is biased, so, as the paper and GPT-NeoX do, the lens keeps separate exponential
moving averages of both (bias-corrected as Adam does) and divides the averages. The two
batches come from one of three estimators:

* ``"accumulation"``: the ``m`` micro-batches of one optimizer step (gradient accumulation).
  ``G_small`` are the micro-batch gradients (``|G_small|²`` averaged over them), ``G_big``
  their mean, ``B_small = b`` (the micro-batch size), ``B_big = m·b``. Each micro-batch's
  contribution is read by a hook on each parameter (``Tensor.register_hook`` on a leaf sees
  the gradient just before it is added to ``.grad``: the difference of ``.grad`` before and
  after, without a copy), so it costs one norm per parameter per micro-batch. Exactly
  unbiased: all micro-batches see the same weights.
* ``"per_sample"``: per-example gradient norms from module hooks (see
  :mod:`sgdlens.lenses.per_sample`): ``B_small = 1``, ``B_big = B``; this reproduces the
  within-batch estimates ``tr Σ̂ = Σ_k Var_i(g_ik)`` (ddof 1) and
  ``|G|² = ‖ḡ‖² − tr Σ̂ / B`` exactly.
* ``"ranks"``: under DDP, each rank's local gradient (``B_small`` = the local batch) against
  the all-reduced one (``B_big`` = world size × local batch), as McCandlish et al. propose for
  data-parallel training. A DDP communication hook reads the local per-parameter norms of
  each bucket and then performs DDP's normal all-reduce, so it adds no communication per
  step; at log points the ranks' moving averages are averaged (one small all-reduce), which
  averages ``|G_small|²`` over ranks as the paper does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sgdlens import _dist, _torch
from sgdlens._quiet import probing_now
from sgdlens._warn import warn
from sgdlens.lenses._covered_sums import CoveredSums
from sgdlens.lenses._micro_batches import MicroBatches
from sgdlens.lenses._noise_scale_checks import ESTIMATORS as ESTIMATORS
from sgdlens.lenses._noise_scale_checks import check_attach, check_settings
from sgdlens.lenses._rank_norms import RankNorms
from sgdlens.lenses._two_batch import bias_corrected, fold, fold_finite, two_batch_estimates
from sgdlens.lenses.base import (
    Key,
    Lens,
    ParamView,
    State,
    Step,
    Subset,
    per_layer_keys,
    refuse_sharded,
)
from sgdlens.lenses.per_sample import Disarm, PerSampleEngine, eager, shared_engine

__all__ = ["NoiseScale", "two_batch_estimates"]


class NoiseScale(Lens):
    """The gradient noise scale ``B_simple = tr Σ / |G|²``, per layer and for the whole model.

    ``estimator="auto"`` picks from what the run offers: at the first step, if it
    accumulated gradients over two or more backward passes, the micro-batch estimator
    (nearly free); otherwise, given a model, per-sample gradient norms; the hooks of the
    estimator not chosen are removed. Choose explicitly with ``"accumulation"``,
    ``"per_sample"`` or ``"ranks"`` (DDP: each rank's local gradient against the
    all-reduced one; needs ``ddp=``).

    Per-step estimates of ``|G|²`` and ``tr Σ`` (each unbiased) go into separate EMAs with
    factor ``decay``, bias-corrected by ``1 − decay^n`` over the ``n`` steps fed so far
    (steps with non-finite gradients are skipped). ``B_simple`` is the ratio of the EMAs.
    Per-layer values use the layer's own gradient entries (``Σ`` and ``G`` restricted to the
    layer); the global ones sum the per-layer EMAs. The gradient scale follows
    ``reduction``: ``"mean"`` when ``.grad`` at ``optimizer.step()`` is the mean over all the
    step's examples of the per-example gradients (mean loss, divided by the number of
    micro-batches when accumulating), ``"sum"`` when it is their sum. ``B_simple`` itself
    does not depend on this choice; ``grad_sq_norm`` and ``grad_noise_tr`` do.

    Logged keys (``<l>`` for every covered layer), with ``B`` the examples per step:

    * ``noise_scale/<l>``, ``noise_scale``: ``B_simple = EMA(tr Σ) / EMA(|G|²)``;
    * ``grad_noise_tr/<l>``, ``grad_noise_tr``: ``EMA(tr Σ)``, the per-example noise;
    * ``grad_sq_norm/<l>``, ``grad_sq_norm``: ``EMA(|G|²)``, the true gradient's norm²;
    * ``batch_over_noise_scale/<l>``, ``batch_over_noise_scale``: ``B / B_simple``, about
      the square of the minibatch gradient SNR (see docs/science.md).

    Keys are absent until a step could be estimated (the accumulation estimator needs at
    least two micro-batches, the per-sample one at least two examples).

    Args:
        estimator: ``"auto"``, ``"accumulation"``, ``"per_sample"`` or ``"ranks"``.
        batch_size: examples per micro-batch (accumulation estimator); ``None`` reads it
            from the first dimension of the model's first tensor input at each forward.
        decay: EMA factor in [0, 1); 0.99 as in GPT-NeoX. 0 keeps only the last step.
        reduction: ``"mean"`` or ``"sum"``, how ``.grad`` relates to per-example gradients.
        per_sample: the per-sample machinery: ``"auto"`` (layer rules, ``torch.func``
            elsewhere), ``"hooks"`` (layer rules only; parameters of other modules are left
            out and listed in ``monitor.lenses[i].uncovered``, the monitor's copy of the lens)
            or ``"func"`` (``torch.func`` for every module, for comparison).
        ddp: the ``DistributedDataParallel`` module, for ``estimator="ranks"``; its
            communication hook is set to one that records local norms and then all-reduces
            as DDP does (DDP takes one hook, registered before the first backward, and keeps
            it: after the monitor closes it only all-reduces, recording nothing).
        grad_scaler: the ``torch.amp.GradScaler`` of a float16 mixed-precision run: its
            backward passes see gradients multiplied by the scale ``S``, which the hooks'
            micro-batch, per-sample and per-rank norms are divided by (``.grad`` at
            ``optimizer.step()`` is already unscaled). Without it those norms are ``S`` times
            too large and every estimate is wrong. Not needed for bfloat16.

    Example:
        >>> from sgdlens import PhaseMonitor, lenses
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> monitor = PhaseMonitor(opt, model=model, lenses=[lenses.NoiseScale()])
    """

    name = "noise_scale"
    keys = (
        Key("noise_scale", "B_simple = EMA(tr Σ) / EMA(|G|²), McCandlish's noise scale"),
        Key("grad_noise_tr", "EMA(tr Σ), the per-example gradient noise"),
        Key("grad_sq_norm", "EMA(|G|²), the true gradient's squared norm"),
        Key("batch_over_noise_scale", "B / B_simple, about the minibatch gradient SNR²"),
    )
    metrics = tuple(k.name for k in keys)
    every_step = True
    estimator: str
    batch_size: int | None
    decay: float
    reduction: str
    per_sample: str
    ddp: Any
    grad_scaler: Any

    def __init__(
        self,
        estimator: str = "auto",
        *,
        batch_size: int | None = None,
        decay: float = 0.99,
        reduction: str = "mean",
        per_sample: str = "auto",
        ddp: Any = None,
        grad_scaler: Any = None,
    ) -> None:
        check_settings(estimator, batch_size, decay, reduction, per_sample, ddp)
        self.estimator = estimator
        self.batch_size = None if batch_size is None else int(batch_size)
        self.decay = float(decay)
        self.reduction = reduction
        self.per_sample = per_sample
        self.ddp = ddp
        _torch.check_grad_scaler("NoiseScale", grad_scaler)
        self.grad_scaler = grad_scaler

    def __repr__(self) -> str:
        return (
            f"NoiseScale({self.estimator!r}, batch_size={self.batch_size}, decay={self.decay}, "
            f"reduction={self.reduction!r}, per_sample={self.per_sample!r})"
        )

    # -- set-up --------------------------------------------------------------------------

    def logged(self, view: ParamView) -> tuple[tuple[Key, ...], list[str]]:
        covered = getattr(self, "_covered", [True] * len(view.params))
        return self.keys, _covered_subset(view, covered).layers

    def init(self, view: ParamView) -> State:
        why = "its gradient norms would be each rank's shard's"
        refuse_sharded(self, view, why + ", which it does not add up over the ranks")
        self._view = view
        zeros = torch.zeros(len(view.layers), dtype=view.dtype, device=view.device)
        self._mode: str | None = None if self.estimator == "auto" else self.estimator
        self._micro: MicroBatches | None = None
        self._engine: PerSampleEngine | None = None
        self._handles: dict[str, list[Any]] = {}
        self._last_batch: int | None = None
        self._covered = [True] * len(view.params)
        self._sums = CoveredSums(view, self.reduction)
        self._warned = False
        return {
            "g2": zeros.clone(),  # EMA of the |G|² estimates, per layer
            "tr": zeros.clone(),  # EMA of the tr Σ estimates, per layer
            "n": torch.zeros((), dtype=view.dtype, device=view.device),  # finite steps fed
            "batch": torch.zeros((), dtype=view.dtype, device=view.device),  # B of last step
            "feeds": 0,
            "mode": self._mode,  # the estimator in use (auto: chosen at the first step)
        }

    def attach(self, model: nn.Module | None, view: ParamView) -> list[Any]:
        """Register the hooks the estimator needs (the monitor removes them on close)."""
        handles: list[Any] = []
        params = list(view.params)
        check_attach(self.estimator, model, self.batch_size)
        if self.estimator == "ranks":
            ranks = RankNorms(params, view.dtype, view.device)
            self._local = ranks.local
            handles.append(ranks.attach(self.ddp))
            if model is not None and self.batch_size is None:
                handles.append(
                    model.register_forward_pre_hook(eager(self._on_forward), with_kwargs=True)
                )
            return handles
        sized = self.batch_size is not None or model is not None  # given, or read from inputs
        if self.estimator in ("auto", "accumulation") and sized:
            self._micro = MicroBatches(params, view.dtype, view.device)
            self._handles["accumulation"] = self._micro.attach()
        if self.estimator in ("auto", "per_sample") and model is not None:
            self._engine = shared_engine(view, model, self.per_sample, "NoiseScale")
            self._engine.arm("NoiseScale", True)
            self._handles["per_sample"] = [Disarm(self._engine, "NoiseScale")]
        if model is not None and self.batch_size is None:
            handles.append(
                model.register_forward_pre_hook(eager(self._on_forward), with_kwargs=True)
            )
        for hs in self._handles.values():
            handles.extend(hs)
        if self._mode == "per_sample":
            self._use_per_sample(view)
        return handles

    def _on_forward(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if torch.is_grad_enabled() and not probing_now():
            for leaf in _torch.pytree.tree_leaves((args, kwargs)):
                if isinstance(leaf, Tensor) and leaf.dim() > 0:
                    self._last_batch = int(leaf.shape[0])
                    return

    def _use_per_sample(self, view: ParamView) -> None:
        assert self._engine is not None
        self._covered = self._engine.covered  # the engine may drop a module at its first use

    def release(self) -> None:
        uncovered = self.uncovered
        # DDP keeps the comm hook (it records nothing once closed): what it recorded stays
        kept = {k: getattr(self, k) for k in ("_local",) if hasattr(self, k)}
        super().release()
        self._uncovered = uncovered
        for k, v in kept.items():
            setattr(self, k, v)

    @property
    def uncovered(self) -> list[str]:
        """``"<layer>[<index>]"`` of the parameters no per-sample hook covers."""
        view = getattr(self, "_view", None)
        if view is None:  # not attached to a monitor yet, or its monitor closed
            return getattr(self, "_uncovered", [])
        return [
            f"{view.layers[view.layer_of[i]]}[{i}]" for i, c in enumerate(self._covered) if not c
        ]

    def _choose(self, view: ParamView, mode: str | None = None) -> str:
        """``auto``: accumulation if the first step had several backward passes (or the
        choice a checkpoint carries: a resumed run keeps its estimator)."""
        if mode is None:
            fires = max(self._micro.fires) if self._micro is not None else 0
            mode = "accumulation" if fires >= 2 or self._engine is None else "per_sample"
        drop = "per_sample" if mode == "accumulation" else "accumulation"
        for h in self._handles.pop(drop, []):
            h.remove()
        if mode == "per_sample":
            self._micro = None
            self._use_per_sample(view)
        else:
            self._engine = None
        return mode

    # -- per step ------------------------------------------------------------------------

    def update(self, state: State, step: Step) -> State:
        view = step.view
        if self._mode is None:
            self._mode = state["mode"] = self._choose(view, state.get("mode"))
        try:
            if self._mode == "ranks":
                self._update_ranks(state, step)
            elif self._mode == "accumulation":
                self._update_accumulation(state, step)
            elif self._mode == "per_sample":
                self._update_per_sample(state, step)
        finally:
            if self._micro is not None:
                self._micro.reset()
        return state  # the monitor resets the shared per-sample engine after every lens

    def _unscale(self, sq: Tensor) -> Tensor:
        """Squared norms of gradients seen during backward, without the GradScaler's S²."""
        return sq * _torch.inverse_scale_sq(self.grad_scaler, sq) if self.grad_scaler else sq

    def _update_accumulation(self, state: State, step: Step) -> None:
        micro = self._micro
        assert micro is not None
        m = max(micro.fires)
        b = self.batch_size or self._last_batch
        if m < 2 or b is None:
            if self.estimator == "accumulation" and not self._warned:
                self._warned = True
                warn(
                    f"NoiseScale(estimator='accumulation') saw {m} backward pass(es) in a step; "
                    f"it needs gradient accumulation over >= 2 micro-batches (or use "
                    f"estimator='per_sample')",
                )
            return
        view = step.view
        n_total = m * b
        acc = view.per_layer(self._unscale(micro.sums(view.device)), range(len(view.params)))
        big = self._sums.grad_sq(step, self._covered)
        if self.reduction == "mean":  # G_small_j = m Δ_j, G_big = .grad
            small = acc * m
        else:  # G_small_j = Δ_j / b, G_big = .grad / (m b)
            small, big = acc / (m * b * b), big / (n_total * n_total)
        self.feed_two_batch(state, small, big, b, _dist.replicas(view.sharded) * n_total, step.ok)

    def _update_ranks(self, state: State, step: Step) -> None:
        world = _dist.rank_and_size()[1]
        b = self.batch_size or self._last_batch
        if world < 2 or b is None:
            return
        view = step.view
        small = view.per_layer(self._unscale(self._local), range(len(view.params)))  # |G_local|²
        # .grad after DDP's all-reduce: the global-batch gradient
        big = self._sums.grad_sq(step, self._covered)
        if self.reduction == "sum":  # G = .grad / examples
            small, big = small / (b * b), big / (world * b) ** 2
        self.feed_two_batch(state, small, big, b, world * b, step.ok)
        self._local.zero_()

    def _update_per_sample(self, state: State, step: Step) -> None:
        engine = self._engine
        assert engine is not None
        n = max(engine.count)
        if n < 2:
            return
        view = step.view
        b_big = _dist.replicas(view.sharded) * n
        if step.flag is not None and self.grad_scaler is None:  # the CPU: the fewest ops
            est = self._sums.estimates(engine, step, self._covered, n, b_big)
            self._feed(state, est, b_big, step.flag)
            return
        s = view.per_layer(self._unscale(engine.sums(view.device)), range(len(view.params)))
        big = self._sums.grad_sq(step, self._covered)
        if self.reduction == "mean":  # g_s = n c_s, ḡ = .grad
            small = s * n
        else:  # g_s = c_s, ḡ = .grad / n
            small, big = s / n, big / (n * n)
        self.feed_two_batch(state, small, big, 1, b_big, step.ok)

    def _feed(self, state: State, est: Tensor, b_big: float, ok: bool) -> None:
        """:meth:`feed_two_batch` given ``est = [|G|²; tr Σ]`` and ``ok`` as a Python bool
        (the CPU): a finite step updates the averages in place, any other leaves them."""
        fold_finite(state, est, ok, self.decay)
        state["batch"].fill_(float(b_big))
        state["feeds"] += 1

    def feed_two_batch(
        self,
        state: State,
        small_sq: Tensor,
        big_sq: Tensor,
        b_small: float,
        b_big: float,
        ok: Tensor,
    ) -> None:
        """Fold one step's two-batch measurement (per layer) into the moving averages.

        This is the entry point every estimator ends in (the ``"ranks"`` estimator feeds
        each rank's local ``|G_local|²``, ``b_small`` = the local batch, against
        ``|G_all-reduced|²``, ``b_big`` = world size × local batch).

        Args:
            state: this lens's state.
            small_sq: per-layer ``|G_small|²`` (tensor over the view's layers).
            big_sq: per-layer ``|G_big|²``.
            b_small: examples behind each small estimate.
            b_big: examples behind the big one (``> b_small``).
            ok: 0-d bool; the step is skipped where false (non-finite gradients).
        """
        g2, tr = two_batch_estimates(small_sq, big_sq, b_small, b_big)
        fold(state, g2, tr, ok, self.decay)
        state["batch"].fill_(float(b_big))
        state["feeds"] += 1

    # -- log points ----------------------------------------------------------------------

    # each rank's EMAs of its own small batches' |G_small|² (linear in it): averaged over the
    # ranks at each record
    reductions: ClassVar[Mapping[str, str]] = {"g2": "ranks", "tr": "ranks"}

    def local(self, state: State, step: Step) -> dict[str, Tensor]:
        if state["feeds"] == 0:
            return {}
        return bias_corrected(state, self.decay)

    def finish(self, state: State, step: Step, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        if not sums:
            return {}
        view = step.view
        world = _dist.rank_and_size()[1]  # the sums over the ranks, as means
        g2, tr = sums["g2"] / world, sums["tr"] / world
        ns = tr / g2
        sub = _covered_subset(view, self._covered)
        layers = sub.layers
        g2_l, tr_l, ns_l = sub.select(g2), sub.select(tr), sub.select(ns)
        g2_all, tr_all = g2_l.sum(), tr_l.sum()
        ns_all = tr_all / g2_all
        batch = state["batch"]
        return {
            **per_layer_keys("noise_scale", layers, ns_l),
            **per_layer_keys("grad_noise_tr", layers, tr_l),
            **per_layer_keys("grad_sq_norm", layers, g2_l),
            **per_layer_keys("batch_over_noise_scale", layers, batch / ns_l),
            "noise_scale": ns_all,
            "grad_noise_tr": tr_all,
            "grad_sq_norm": g2_all,
            "batch_over_noise_scale": batch / ns_all,
        }


def _covered_subset(view: ParamView, covered: list[bool]) -> Subset:
    """The parameters some hook covers, and the layers they make up (the per-layer keys)."""
    return view.subset([i for i, c in enumerate(covered) if c])
