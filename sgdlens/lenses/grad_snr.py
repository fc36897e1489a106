"""Gradient signal-to-noise across optimizer steps (Shwartz-Ziv & Tishby 2017, §3.5).

For layer ``l`` and gradients ``g_1..g_K`` of ``K`` consecutive steps:

* ``grad_mean/<l>`` = ‖(1/K) Σ_k g_k‖ (Frobenius norm over the layer's parameters);
* ``grad_std/<l>``  = sqrt(tr Cov_k g_k), the population covariance (divide by K);
* ``grad_snr/<l>``  = grad_mean / grad_std;

and for the whole model the same statistic of the concatenated gradient:
``grad_mean`` = sqrt(Σ_l mean_l²), ``grad_std`` = sqrt(Σ_l std_l²), ``grad_snr`` their ratio.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal, cast

import torch
from torch import Tensor

from sgdlens import _torch
from sgdlens.lenses._optimizer_moments import OptimizerMoments
from sgdlens.lenses.base import Key, Lens, ParamView, State, Step, Subset, per_layer_keys

__all__ = ["GradSNR", "gradient_snr", "snr_from_moments"]


def gradient_snr(grads: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The statistic of one layer from its stacked gradients, the slow and obvious way.

    Args:
        grads: shape ``(K, ...)``: one gradient per step.

    Returns:
        ``(mean, std, snr)``: ‖mean_k g_k‖, sqrt(Σ population variance), and their ratio.

    Example:
        >>> g = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
        >>> [float(v) for v in gradient_snr(g)]
        [2.0, 1.0, 2.0]
    """
    flat = grads.reshape(grads.shape[0], -1)
    mean = flat.mean(0).norm()
    std = flat.var(0, correction=0).sum().sqrt()
    return mean, std, mean / std


def snr_from_moments(mean_sq: Tensor, second: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean norm, std and SNR from ‖E g‖² and E‖g‖² (elementwise over layers).

    ``tr Var g = E‖g‖² − ‖E g‖²``, clamped at 0 against rounding. Identical gradients give
    ``std = 0`` and ``snr = inf``; an all-zero gradient gives ``snr = nan`` (undefined).
    """
    var = (second - mean_sq).clamp_min(0)
    mean, std = mean_sq.sqrt(), var.sqrt()
    return mean, std, mean / std


class GradSNR(Lens):
    """Per-layer gradient mean, std and SNR across steps, as Shwartz-Ziv & Tishby define them.

    Three estimators:

    * ``GradSNR(window=K)`` (default ``K`` = the monitor's ``log_every``): exactly the paper's
      statistic over non-overlapping windows of ``K`` optimizer steps. A log point reports the
      last *completed* window; before the first window completes the keys are absent.
    * ``GradSNR(decay=β)``: exponential moving averages of ``g`` and ‖g‖², bias-corrected as
      Adam does (divide by ``1 − β^t``), so ``E g`` and ``E‖g‖²`` weight recent steps by
      ``(1 − β) β^age``; roughly a window of ``2/(1 − β) − 1`` steps.
    * ``GradSNR(decay="optimizer")``: the same EMA form with the optimizer's own running mean
      of the gradient as E g (SGD's momentum buffer, weights ``μ^age`` normalised, or Adam's
      and AdamW's ``exp_avg``, bias-corrected): no parameter-sized buffer of its own, the
      optimizer's β₁ or μ as time constant. It keeps E‖g‖² with the buffer's own recursion
      (two float64 numbers per parameter tensor) and reads the buffer at log points. Refused
      (``ValueError`` at attach) where the buffer is not a running mean of ``.grad``: other
      optimizers, SGD without momentum, L2 ``weight_decay`` in SGD or Adam (AdamW's decoupled
      decay is fine), and an optimizer that already holds state (a history the lens did not
      see; resuming through the Hugging Face callback, the check waits for the first step,
      where the monitor's own loaded state must cover that history). A parameter without a
      gradient at a step is skipped, as the optimizer skips it; a step with non-finite
      gradients is left out of E‖g‖² (a fused optimizer under a
      ``GradScaler`` skips it too; one that takes it has a non-finite buffer, and non-finite
      records, from then on). It reads every step, also under ``overhead_budget``.

    The gradient read is the one each ``step()`` uses, taken at the moving weights of the
    training run itself (the cheap choice, see docs/science.md; the authors' code and Saxe et
    al.'s compute extra gradients for the statistic). In the window and ``decay=β`` forms a
    parameter without a gradient at a step counts as a zero gradient; on the CPU a step with
    non-finite gradients is skipped exactly (it is not one of the ``K`` samples and does not
    move the averages). On an accelerator, where the per-step path may not read the device,
    the sums (window) or averages (EMA) take one fused op per step whatever the step: the
    window holding a non-finite step, or the EMA's next log point, reports non-finite values
    (the count is in ``nonfinite_steps``) and the next window, or the restarted EMA, starts
    clean.

    State (window, ``decay=β``): one running buffer per parameter (float32, or wider if the
    parameter is) and a few per-layer float64 scalars. ``tr Var = E‖g‖² − ‖E g‖²`` is formed
    in float64; the float32 buffer bounds its relative accuracy to about ``1e-7 · SNR²`` (with
    ``decay="optimizer"`` the buffer is the optimizer's, in the parameter's dtype); on the CPU
    the fused float32 norm of a tensor of up to 262k elements adds up to ``1.5e-6 · SNR²``
    (larger tensors are normed by rows, in float64: see docs/lenses/grad_snr.md).

    Logged keys (``<l>`` for every layer with a monitored parameter):
    ``grad_mean/<l>``, ``grad_std/<l>``, ``grad_snr/<l>``, ``grad_mean``, ``grad_std``,
    ``grad_snr``.

    Args:
        window: steps per window (positive int); ``None`` uses the monitor's ``log_every``.
        decay: EMA factor in (0, 1) instead of windows, or ``"optimizer"`` for the optimizer's
            own. Give ``window`` or ``decay``, not both.
        weights_only: only parameters with ``dim >= 2`` (weight matrices, conv kernels), biases
            and norm-layer parameters skipped, as the authors' plotting code does.

    Example:
        >>> import torch
        >>> from sgdlens import PhaseMonitor, lenses
        >>> opt = torch.optim.SGD(torch.nn.Linear(3, 1).parameters(), lr=0.1)
        >>> monitor = PhaseMonitor(opt, lenses=[lenses.GradSNR(window=10)], log_every=10)
    """

    name = "grad_snr"
    keys = (
        Key("grad_mean", "norm of the mean gradient over the SNR window (or EMA)"),
        Key("grad_std", "sqrt(tr Cov) of the gradients over the SNR window (or EMA)"),
        Key("grad_snr", "grad_mean / grad_std: above 1 drift, below 1 diffusion", scale="snr"),
    )
    metrics = tuple(k.name for k in keys)

    def __init__(
        self,
        window: int | None = None,
        *,
        decay: float | Literal["optimizer"] | None = None,
        weights_only: bool = False,
    ) -> None:
        if window is not None and (isinstance(window, bool) or not isinstance(window, int)):
            raise TypeError(f"GradSNR(window=...) must be an int, got {window!r}; e.g. window=50")
        if window is not None and window < 1:
            raise ValueError(f"GradSNR(window={window}) must be >= 1 steps; e.g. window=50")
        if decay is not None:
            if window is not None:
                raise ValueError(
                    f"GradSNR(window={window}, decay={decay}): give one of window and decay"
                )
            if isinstance(decay, str) and decay == "optimizer":
                pass
            elif isinstance(decay, bool) or not isinstance(decay, (int, float)):
                raise TypeError(
                    f"GradSNR(decay=...) must be a float or 'optimizer', got {decay!r}; e.g. 0.99"
                )
            elif not 0.0 < decay < 1.0:
                raise ValueError(f"GradSNR(decay={decay}) must lie in (0, 1); e.g. decay=0.99")
        if not isinstance(weights_only, bool):
            raise TypeError(f"GradSNR(weights_only=...) must be a bool, got {weights_only!r}")
        self.window = window
        self.decay: float | str | None = (
            decay if decay is None or isinstance(decay, str) else float(decay)
        )
        self.weights_only = weights_only
        #: the optimizer's buffer moves at every step: so must E‖g‖² (also when sampling)
        self.every_step = self.decay == "optimizer"

    def __repr__(self) -> str:
        mode = f"decay={self.decay!r}" if self.decay is not None else f"window={self.window}"
        return f"GradSNR({mode}, weights_only={self.weights_only})"

    def logged(self, view: ParamView) -> tuple[tuple[Key, ...], list[str]]:
        sub = getattr(self, "_sub", None)  # the layers of the parameters it reads
        return self.keys, list(view.layers) if sub is None else sub.layers

    def _subset(self, view: ParamView) -> Subset:
        if self.weights_only and any(_torch.is_flat_param(p) for p in view.params):
            raise ValueError(
                "GradSNR(weights_only=True) cannot tell weights from biases inside an FSDP1 "
                "FlatParameter; wrap with FullyShardedDataParallel(..., use_orig_params=True)"
            )
        keep = [i for i in range(len(view.params)) if view.ndim(i) >= 2 or not self.weights_only]
        return view.subset(keep)

    def init(self, view: ParamView) -> State:
        sub = self._subset(view)
        if self.decay == "optimizer":
            self._moments = OptimizerMoments(sub)
            self._sub = sub
            return self._moments.init()
        zeros = torch.zeros(len(sub.layers), dtype=view.dtype, device=view.device)
        state: State = {
            "buf": [
                torch.zeros_like(_torch.local(p), dtype=_torch.buffer_dtype(p.dtype))
                for p in sub.params
            ],
            # Σ‖g‖² per parameter (window) or its EMA; summed into layers at log points
            "sq": torch.zeros(len(sub.which), dtype=view.dtype, device=view.device),
            "n": torch.zeros((), dtype=view.dtype, device=view.device),  # finite steps
            "window": self.window or view.log_every,
        }
        if self.decay is None:
            state["mean_sq"] = zeros.clone()  # results of the last completed window
            state["second"] = zeros.clone()
            state["done"] = 0  # completed windows
        self._sub = sub
        # every parameter, each buffer in its parameter's dtype: a step whose gradients are
        # all there and dense adds them to the buffers as they are (Step.fused)
        self._whole = sub.whole and all(_torch.buffer_dtype(p.dtype) == p.dtype for p in sub.params)
        return state

    def update(self, state: State, step: Step) -> State:
        if self.decay == "optimizer":
            self._moments.update(state, step)
            return state
        sub = self._sub
        if self.decay is None:
            if step.flag is not False:  # the CPU skips a non-finite step exactly
                # every gradient there, dense and of its buffer's dtype: the lists as they are,
                # with no Python work per tensor
                fast = self._whole and step.fused
                bufs, present = (
                    (state["buf"], cast(list[Tensor], step.grads))
                    if fast
                    else self._pairs(state, step)
                )
                sq = sub.take(step.grad_sq)
                _torch.window_add_([*bufs, state["sq"]], [*present, sq], plain=fast)
            state["n"].add_(step.ok)
            if step.index % state["window"] == 0:
                self._close_window(state)
        elif step.flag is not False:  # the CPU skips a non-finite step exactly
            beta = float(self.decay)
            if self._whole and step.fused:  # as in the window: no Python work per tensor
                _torch.lerp_(state["buf"], cast(list[Tensor], step.grads), 1.0 - beta, plain=True)
            else:
                grads = [step.grads[i] for i in sub.which]
                bufs, present = self._pairs(state, step)
                # A missing gradient is a zero gradient: decay its buffer too.
                _torch.scale_([b for b, g in zip(state["buf"], grads) if g is None], beta)
                _torch.lerp_(bufs, present, 1.0 - beta)
            state["sq"].lerp_(sub.take(step.grad_sq), 1.0 - beta)
            state["n"].add_(1)
        return state

    def _pairs(self, state: State, step: Step) -> tuple[list[Tensor], list[Tensor]]:
        """The buffers of the parameters with a gradient this step, and those gradients."""
        grads = [step.grads[i] for i in self._sub.which]
        pairs = [(b, g) for b, g in zip(state["buf"], grads) if g is not None]
        return [b for b, _ in pairs], [g for _, g in pairs]

    def due(self, state: State, index: int) -> bool:
        """Whether step ``index`` closes a window (a sampling monitor reads it)."""
        return self.decay is None and index % state["window"] == 0

    def _close_window(self, state: State) -> None:
        n = state["n"]
        buf_sq, sq = self._layer_sums(state)
        # this rank's share (under FSDP the sums over its shards), added up at the log point
        state["mean_sq"].copy_(buf_sq / n.square())
        state["second"].copy_(sq / n)
        _torch.zero_(state["buf"])
        state["sq"].zero_()
        n.zero_()
        state["done"] += 1

    def _layer_sums(self, state: State) -> tuple[Tensor, Tensor]:
        """Per layer: ‖Σ g‖² (or ‖EMA g‖²) and Σ‖g‖² (or its EMA), over this rank's shards."""
        n, sub = state["n"], self._sub
        buf_sq = sub.per_layer(_torch.norms(state["buf"], n.device, n.dtype).square())
        return buf_sq, sub.per_layer(state["sq"])

    # ‖E g‖² and E‖g‖² per layer: sums of squares over the parameters (shards under FSDP)
    reductions: ClassVar[Mapping[str, str]] = {"mean_sq": "shards", "second": "shards"}

    def local(self, state: State, step: Step) -> dict[str, Tensor]:
        if self.decay == "optimizer":
            mean_sq, second = self._moments.moments(state)
        elif self.decay is None:
            if state["done"] == 0:
                return {}
            mean_sq, second = state["mean_sq"], state["second"]
        else:
            n = state["n"]
            corr = 1.0 - torch.pow(torch.as_tensor(self.decay, dtype=n.dtype, device=n.device), n)
            buf_sq, sq = self._layer_sums(state)
            mean_sq, second = buf_sq / corr.square(), sq / corr
        return {"mean_sq": mean_sq, "second": second}

    def finish(self, state: State, step: Step, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        if not sums:
            return {}
        mean_sq, second = sums["mean_sq"], sums["second"]
        if isinstance(self.decay, float) and not bool(torch.isfinite(second).all()):
            # On an accelerator a non-finite step entered the averages (read here, at a log
            # point, not at every step, and from the sums every rank shares): this record
            # reports non-finite values and the averages start again.
            _torch.zero_(state["buf"])
            state["sq"].zero_()
            state["n"].zero_()
        mean, std, snr = snr_from_moments(mean_sq, second)
        layers = self._sub.layers
        out = {
            **per_layer_keys("grad_mean", layers, mean),
            **per_layer_keys("grad_std", layers, std),
            **per_layer_keys("grad_snr", layers, snr),
        }
        g_mean, g_std, g_snr = snr_from_moments(mean_sq.sum(), second.sum())
        out.update(grad_mean=g_mean, grad_std=g_std, grad_snr=g_snr)
        return out
