"""Within-batch gradient signal-to-noise: per-layer SNR over examples and Cockpit's mean GSNR.

With per-example gradients ``g_1..g_B`` of one batch and their mean ``ḡ``:

* ``batch_snr/<l>`` = ‖ḡ‖² / tr Var_i(g_i) over the layer's entries, with the unbiased
  variance (ddof 1): tr Var = (Σ_i ‖g_i‖² − B‖ḡ‖²)/(B − 1). It estimates ‖G‖²/tr Σ = 1/B_simple
  (slightly high: ‖ḡ‖² is the plug-in value); the minibatch gradient's SNR² is about
  ``B · batch_snr``.
* ``gsnr/<l>`` = mean_k ḡ_k² / (σ_k² + ε) over the layer's entries ``k``, with the population
  variance σ_k² = (1/B) Σ_i g_ik² − ḡ_k² (Liu et al. 2020, as Cockpit's ``MeanGSNR``).

The Adam-family option reads the same two ratios from the optimizer's ``exp_avg`` and
``exp_avg_sq`` instead (an across-step moving-average estimate, see :class:`BatchSNR`).
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor, nn

from sgdlens import _dist, _torch
from sgdlens.lenses.base import (
    Key,
    Lens,
    ParamView,
    State,
    Step,
    per_layer_keys,
    refuse_sharded,
)
from sgdlens.lenses.per_sample import MODES, Disarm, PerSampleEngine, shared_engine

__all__ = ["BatchSNR", "batch_snr_from_sums"]

SOURCES = ("per_sample", "optimizer")


def batch_snr_from_sums(sum_sq: Tensor, mean_sq: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``(batch_snr, tr Var)`` from Σ_i ‖g_i‖², ‖ḡ‖² and the number of examples ``n ≥ 2``.

    Example:
        >>> snr, var = batch_snr_from_sums(torch.tensor(10.0), torch.tensor(2.0), 2)
        >>> float(snr), float(var)
        (0.3333333333333333, 6.0)
    """
    var = (sum_sq - n * mean_sq) / (n - 1)
    return mean_sq / var, var


class BatchSNR(Lens):
    """Per-layer signal-to-noise of the per-example gradients within a batch.

    With ``source="per_sample"`` (default), module hooks (see
    :mod:`sgdlens.lenses.per_sample`) compute Σ_i ‖g_i‖² and, per element, Σ_i g_ik² for the
    batch of each *logged* step; the hooks are registered only for the backward passes of
    those steps and removed after them, so other steps cost nothing. Per-element sums come
    from ``(g²)ᵀ(a²)`` for ``nn.Linear`` on flat inputs, from per-(sample, token) sums for
    embeddings, and from per-sample gradients materialised one parameter at a time for
    sequence/conv inputs, layer norms and the ``torch.func`` fallback: every layer is
    supported, at different cost. ``reduction`` tells
    how ``.grad`` relates to the per-example gradients (``"mean"``: their mean over the
    step's examples; ``"sum"``: their sum). Under DDP, whose ``.grad`` is the mean over every
    rank's batch, the per-sample sums are added up over the ranks at each logged step.

    With ``source="optimizer"`` the lens reads Adam-family state (``torch.optim.Adam``,
    ``AdamW``, ``NAdam``, ``RAdam``: anything with ``exp_avg``, ``exp_avg_sq`` and
    ``betas``) at each log point, with zero extra memory: m̂ = exp_avg/(1 − β₁ᵗ) and
    v̂ = exp_avg_sq/(1 − β₂ᵗ) stand for E g and E g², so ``adam_snr/<l>`` =
    Σ m̂²/Σ(v̂ − m̂²) and ``adam_gsnr/<l>`` = mean_k m̂_k²/(v̂_k − m̂_k² + ε). This is an
    *across-step* estimate: moving averages over past minibatch gradients (β₁ for the mean,
    β₂ for the second moment, ~10 vs ~1000 steps), taken at moving weights, and of minibatch
    rather than per-example gradients; L2 ``weight_decay`` in ``Adam`` is inside the
    gradient it averages. NAdam's momentum schedule is ignored in the bias correction.

    Logged keys (``<l>`` for every covered layer):

    * ``source="per_sample"``: ``batch_snr/<l>``, ``batch_snr``, ``gsnr/<l>``, ``gsnr``
      (the global ``gsnr`` averages over all covered entries);
    * ``source="optimizer"``: ``adam_snr/<l>``, ``adam_snr``, ``adam_gsnr/<l>``,
      ``adam_gsnr`` (absent until the optimizer has state).

    Args:
        source: ``"per_sample"`` or ``"optimizer"``.
        eps: ε in the GSNR denominator (Cockpit uses 1e-5). Non-negative float.
        reduction: ``"mean"`` or ``"sum"`` (per-sample source).
        per_sample: ``"auto"``, ``"hooks"`` or ``"func"``, as in :class:`NoiseScale`.
        grad_scaler: the ``torch.amp.GradScaler`` of a float16 run, as in :class:`NoiseScale`.

    Example:
        >>> from sgdlens import PhaseMonitor, lenses
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> monitor = PhaseMonitor(opt, model=model, lenses=[lenses.BatchSNR()])
    """

    name = "batch_snr"
    keys = (
        Key("batch_snr", "mean² over variance of the batch's per-example gradients", scale="snr"),
        Key("gsnr", "Cockpit's mean GSNR over the entries, from the per-example gradients"),
        Key("adam_snr", "squared mean over variance from Adam's moments (across steps)"),
        Key("adam_gsnr", "mean GSNR over the entries from Adam's moments (across steps)"),
    )
    metrics = tuple(k.name for k in keys)
    every_step = True
    source: str
    eps: float
    reduction: str
    per_sample: str
    grad_scaler: Any

    def __init__(
        self,
        source: str = "per_sample",
        *,
        eps: float = 1e-5,
        reduction: str = "mean",
        per_sample: str = "auto",
        grad_scaler: Any = None,
    ) -> None:
        if source not in SOURCES:
            raise ValueError(
                f"BatchSNR(source={source!r}) must be one of {SOURCES}; e.g. "
                f"source='optimizer' to read Adam's moments"
            )
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
            raise TypeError(f"BatchSNR(eps=...) must be a float, got {eps!r}; e.g. eps=1e-5")
        if not eps >= 0.0:
            raise ValueError(f"BatchSNR(eps={eps}) must be >= 0; e.g. eps=1e-5")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"BatchSNR(reduction={reduction!r}) must be 'mean' or 'sum'")
        if per_sample not in MODES:
            raise ValueError(f"BatchSNR(per_sample={per_sample!r}) must be one of {MODES}")
        _torch.check_grad_scaler("BatchSNR", grad_scaler)
        self.grad_scaler = grad_scaler
        self.source, self.eps, self.reduction, self.per_sample = (
            source,
            float(eps),
            reduction,
            per_sample,
        )

    def __repr__(self) -> str:
        return (
            f"BatchSNR({self.source!r}, eps={self.eps}, reduction={self.reduction!r}, "
            f"per_sample={self.per_sample!r})"
        )

    def logged(self, view: ParamView) -> tuple[tuple[Key, ...], list[str]]:
        adam = self.source == "optimizer"
        keys = tuple(k for k in self.keys if k.name.startswith("adam_") == adam)
        if adam:  # the parameters the optimizer holds moments for, as compute() reads them
            state = view.optimizer.state
            which = [i for i, p in enumerate(view.params) if "exp_avg" in state.get(p, {})]
        else:
            covered = getattr(self, "_covered", [True] * len(view.params))
            which = [i for i, c in enumerate(covered) if c]
        return keys, view.subset(which).layers

    def init(self, view: ParamView) -> State:
        why = "its sums (per-sample, or of Adam's moments) would be each rank's shard's"
        refuse_sharded(self, view, why + ", which it does not add up over the ranks")
        self._view = view
        self._engine: PerSampleEngine | None = None
        self._covered = [True] * len(view.params)
        if self.source == "optimizer":
            opt = view.optimizer
            groups = getattr(opt, "param_groups", None) or []
            if not groups or not all("betas" in g for g in groups):
                raise ValueError(
                    f"BatchSNR(source='optimizer') reads Adam-family moments, but the "
                    f"optimizer is {type(opt).__name__} without 'betas'; use an Adam-family "
                    f"optimizer or BatchSNR(source='per_sample')"
                )
            return {}
        zeros = torch.zeros(len(view.layers), dtype=view.dtype, device=view.device)
        return {
            "snr": zeros.clone(),
            "gsnr": zeros.clone(),
            "all": torch.zeros(2, dtype=view.dtype, device=view.device),
            "done": 0,
        }

    def attach(self, model: nn.Module | None, view: ParamView) -> list[Any]:
        """Module hooks for the per-sample source (none for the optimizer source)."""
        if self.source == "optimizer":
            return []
        if model is None:
            raise ValueError(
                "BatchSNR(source='per_sample') needs the model for its module hooks: pass "
                "PhaseMonitor(opt, model=model, lenses=[...]) or BatchSNR(source='optimizer')"
            )
        self._engine = shared_engine(view, model, self.per_sample, "BatchSNR")
        self._covered = self._engine.covered  # the engine may drop a module at its first use
        self._armed = False
        self._arm(view.log_every == 1)
        return [Disarm(self._engine, "BatchSNR")]

    def _arm(self, on: bool) -> None:
        """Hooks only for the backward passes of a logged step (the engine is shared: another
        lens may keep them on between log points, without the elementwise sums)."""
        assert self._engine is not None
        self._engine.arm("BatchSNR", on, elem=on)
        self._armed = on

    def update(self, state: State, step: Step) -> State:
        engine = self._engine
        if engine is None:
            return state
        try:
            if step.logging and self._armed:
                self._measure(state, step, engine)
        finally:  # the monitor resets the shared engine after every lens has read it
            self._arm((step.index + 1) % step.view.log_every == 0)
        return state

    def _measure(self, state: State, step: Step, engine: PerSampleEngine) -> None:
        n = max(engine.count)
        if n < 2:
            return
        view = step.view
        which = [i for i, c in enumerate(self._covered) if c and engine.count[i] > 0]
        zero = torch.zeros((), dtype=view.dtype, device=view.device)
        idx = torch.tensor(which, dtype=torch.long, device=view.device)
        inv = _torch.inverse_scale_sq(self.grad_scaler, step.grad_sq)  # 1/S² under a GradScaler
        sq = engine.sums(view.device).index_select(0, idx) * inv
        k2 = float(n * n) if self.reduction == "mean" else 1.0  # Σ‖g_i‖² = k2 Σ‖c_i‖²
        gscale = 1.0 if self.reduction == "mean" else 1.0 / n  # ḡ = gscale · .grad
        gsq = step.grad_sq.index_select(0, idx)
        sum_sq = view.per_layer(sq * k2, which)
        elems = [engine.elem[i] for i in which]
        # Under DDP .grad is the mean over every rank's batch, so are the sums: every rank's
        # samples, one all-reduce of the per-layer sums and one of the elementwise ones
        replicas = _dist.replicas(view.sharded)
        if replicas > 1:
            sum_sq = _dist.all_sum_(sum_sq)
            elems = _all_sum_list(elems)
        n_all = n * replicas
        mean_sq = view.per_layer(gsq * gscale**2, which)
        snr, _ = batch_snr_from_sums(sum_sq, mean_sq, n_all)
        ratios, sizes = [], []
        for i, e in zip(which, elems):
            p, g = view.params[i], step.grads[i]
            if e is None or g is None:
                ratios.append(zero)
                sizes.append(0)
                continue
            gbar = (g.to_dense() if g.is_sparse else g).to(e.dtype) * gscale
            second = e * (k2 / n_all) * inv.to(e.dtype)  # (1/N) Σ_i g_ik² over all N examples
            var = second - gbar.square()
            ratios.append((gbar.square() / (var + self.eps)).sum().to(view.dtype))
            sizes.append(p.numel())
        ratio = view.per_layer(torch.stack(ratios), which)
        size = view.per_layer(torch.tensor(sizes, dtype=view.dtype, device=view.device), which)
        ok = step.ok
        state["snr"].copy_(torch.where(ok, snr, state["snr"]))
        state["gsnr"].copy_(torch.where(ok, ratio / size, state["gsnr"]))
        total = torch.stack(
            [
                mean_sq.sum() / ((sum_sq.sum() - n_all * mean_sq.sum()) / (n_all - 1)),
                ratio.sum() / size.sum(),
            ]
        )
        state["all"].copy_(torch.where(ok, total, state["all"]))
        state["done"] += 1

    def compute(self, state: State, step: Step) -> dict[str, Tensor]:
        view = step.view
        if self.source == "optimizer":
            return self._from_optimizer(view)
        if state["done"] == 0:
            return {}
        sub = view.subset([i for i, c in enumerate(self._covered) if c])
        return {
            **per_layer_keys("batch_snr", sub.layers, sub.select(state["snr"])),
            **per_layer_keys("gsnr", sub.layers, sub.select(state["gsnr"])),
            "batch_snr": state["all"][0],
            "gsnr": state["all"][1],
        }

    def _from_optimizer(self, view: ParamView) -> dict[str, Tensor]:
        opt = view.optimizer
        betas = {id(p): g["betas"] for g in opt.param_groups for p in g["params"]}
        which, msq, var, ratio, size = [], [], [], [], []
        for i, p in enumerate(view.params):
            st = opt.state.get(p, {})
            if "exp_avg" not in st or "exp_avg_sq" not in st or "step" not in st:
                continue
            b1, b2 = betas[id(p)]
            t = torch.as_tensor(st["step"], dtype=view.dtype).to(view.device)
            m = st["exp_avg"].to(view.dtype) / (1.0 - torch.pow(float(b1), t))
            v = st["exp_avg_sq"].to(view.dtype) / (1.0 - torch.pow(float(b2), t))
            m2 = m.square()
            vr = (v - m2).clamp_min(0)
            which.append(i)
            msq.append(m2.sum())
            var.append(vr.sum())
            ratio.append((m2 / (vr + self.eps)).sum())
            size.append(p.numel())
        if not which:
            return {}
        ms, vs = view.per_layer(torch.stack(msq), which), view.per_layer(torch.stack(var), which)
        rs = view.per_layer(torch.stack(ratio), which)
        ns = view.per_layer(torch.tensor(size, dtype=view.dtype, device=view.device), which)
        sub = view.subset(which)
        return {
            **per_layer_keys("adam_snr", sub.layers, sub.select(ms / vs)),
            **per_layer_keys("adam_gsnr", sub.layers, sub.select(rs / ns)),
            "adam_snr": ms.sum() / vs.sum(),
            "adam_gsnr": rs.sum() / ns.sum(),
        }


def _all_sum_list(tensors: list[Tensor | None]) -> list[Tensor | None]:
    """Every rank's sum of each tensor (``None`` kept), in one all-reduce per dtype."""
    present = [t for t in tensors if t is not None]
    for dtype in dict.fromkeys(t.dtype for t in present):  # the same order on every rank
        same = [t for t in present if t.dtype == dtype]
        flat = _dist.all_sum_(torch.cat([t.reshape(-1) for t in same]))
        for t, part in zip(same, flat.split([t.numel() for t in same])):
            t.copy_(part.view_as(t))
    return tensors
