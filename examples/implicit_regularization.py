"""Implicit regularisation and random labels, seen through sgdlens (Zhang et al., ICLR 2017).

1. Underdetermined least squares (20 samples, 100 parameters, float64, a bias-free linear
   model), minibatch SGD. Every gradient lies in the row space of X, so from w = 0 SGD
   converges to the minimum-norm interpolant pinv(X) y: the monitor's ``weight_norm`` ends at
   its norm. From a non-zero start w0 it converges to the interpolant nearest w0,
   w0 + pinv(X)(y - X w0), and ``weight_dist`` (distance travelled from w0) ends at the
   distance from w0 to the set of interpolants.
2. The digits MLP of ``digits_mlp.py`` (64-64-32-10 tanh, SGD-momentum lr 0.01, batch 256),
   trained until it fits its training set, once with the true labels and once with the labels
   randomly permuted: steps to fit, weight norm, distance travelled, per-layer gradient SNR and
   the phase detector's timeline, side by side.

Run: ``python examples/implicit_regularization.py [--plot]`` (about half a minute on a CPU);
``--plot`` writes ``implicit_regularization.png`` (needs matplotlib).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sgdlens import PhaseDetector, PhaseMonitor, lenses

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_mlp import digits, mlp

LAYERS = ("fc1", "fc2", "fc3")


# -- 1. least squares ----------------------------------------------------------------------


@dataclass
class LeastSquaresRun:
    monitor: PhaseMonitor
    w0: torch.Tensor  # the start
    w: torch.Tensor  # the final weights
    w_min: torch.Tensor  # pinv(X) y, the minimum-norm interpolant
    w_near: torch.Tensor  # w0 + pinv(X)(y - X w0), the interpolant nearest w0
    dist_to_near: list[float]  # ‖w_t − w_near‖ at each record
    residual: float  # ‖X w − y‖ / ‖y‖

    def rel_error(self, target: torch.Tensor) -> float:
        return float((self.w - target).norm() / target.norm())


def problem(n: int = 20, d: int = 100, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """X (n × d, rows of unit norm in expectation) and y, float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    return x, y


def least_squares(start: str = "zero", *, n: int = 20, d: int = 100, steps: int = 1000,
                  lr: float = 2.0, batch_size: int = 5, log_every: int = 20,
                  seed: int = 0) -> LeastSquaresRun:  # fmt: skip
    """Minibatch SGD on 0.5·mean((x·w − y)²) from w = 0 (``"zero"``) or a random w0 (``"random"``)."""
    x, y = problem(n, d, seed)
    g = torch.Generator().manual_seed(seed + 1)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        if start == "zero":
            model.weight.zero_()
        elif start == "random":
            model.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64))
        else:
            raise ValueError(f"start={start!r}: 'zero' or 'random'")
    w0 = model.weight.detach().reshape(-1).clone()
    pinv = torch.linalg.pinv(x)
    w_min = pinv @ y
    w_near = w0 + pinv @ (y - x @ w0)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    monitor = PhaseMonitor(opt, model=model, lenses=[lenses.WeightNorms()], log_every=log_every,
                           detector=False)  # fmt: skip
    dist: list[float] = []
    with monitor:
        order = torch.randperm(n, generator=g)
        for t in range(steps):
            i = (t * batch_size) % n
            if i == 0:
                order = torch.randperm(n, generator=g)
            idx = order[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = 0.5 * (model(x[idx]).squeeze(1) - y[idx]).square().mean()
            loss.backward()
            monitor.observe(loss=loss)
            opt.step()
            if monitor.step % log_every == 0:
                dist.append(float((model.weight.detach().reshape(-1) - w_near).norm()))
    w = model.weight.detach().reshape(-1).clone()
    residual = float((x @ w - y).norm() / y.norm())
    return LeastSquaresRun(monitor, w0, w, w_min, w_near, dist, residual)


# -- 2. digits, true and random labels -----------------------------------------------------


@dataclass
class DigitsRun:
    labels: str
    monitor: PhaseMonitor
    fit_step: int | None  # first step after which every training example is classified right
    train_acc: list[float] = field(default_factory=list)  # full training set, each epoch
    test_acc: float = math.nan  # against the true test labels
    n_train: int = 0


def digits_run(labels: str = "true", *, max_epochs: int = 3000, n_train: int | None = None,
               lr: float = 0.01, batch_size: int = 256, seed: int = 0,
               label_seed: int = 1) -> DigitsRun:  # fmt: skip
    """Train ``digits_mlp``'s MLP until training accuracy is 100 % (or ``max_epochs``).

    The set-up of ``digits_mlp.train`` (same seed, split, model, optimizer, one-epoch SNR
    windows and a record per epoch); ``labels="random"`` permutes the training labels with
    ``label_seed``; ``n_train`` keeps only the first examples of the training split.
    """
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = digits(seed)
    if n_train is not None:
        xtr, ytr = xtr[:n_train], ytr[:n_train]
    if labels == "random":
        ytr = ytr[torch.randperm(len(ytr), generator=torch.Generator().manual_seed(label_seed))]
    elif labels != "true":
        raise ValueError(f"labels={labels!r}: 'true' or 'random'")
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    batches = math.ceil(len(xtr) / batch_size)
    # a short run (it fits in a few hundred steps): the detector's time constants in epochs
    detector = PhaseDetector(window=5 * batches, dwell=2 * batches, warmup=5 * batches,
                             spike_window=50 * batches)  # fmt: skip
    monitor = PhaseMonitor(opt, model=model, lenses=[lenses.GradSNR(window=batches), lenses.WeightNorms()],
                           log_every=batches, detector=detector)  # fmt: skip
    run = DigitsRun(labels, monitor, None, n_train=len(xtr))
    with monitor:
        for _ in range(max_epochs):
            order = torch.randperm(len(xtr))
            for i in range(batches):
                idx = order[i * batch_size : (i + 1) * batch_size]
                opt.zero_grad(set_to_none=True)
                logits = model(xtr[idx])
                loss = F.cross_entropy(logits, ytr[idx])
                loss.backward()
                monitor.observe(loss=loss, batch_acc=(logits.argmax(1) == ytr[idx]).double().mean())
                opt.step()
            with torch.no_grad():
                run.train_acc.append(float((model(xtr).argmax(1) == ytr).double().mean()))
            if run.train_acc[-1] == 1.0:
                run.fit_step = monitor.step
                break
    with torch.no_grad():
        run.test_acc = float((model(xte).argmax(1) == yte).double().mean())
    return run


# -- printing and plotting -----------------------------------------------------------------


def print_least_squares(zero: LeastSquaresRun, rand: LeastSquaresRun) -> None:
    hz, hr = zero.monitor.history, rand.monitor.history
    n, d = 20, zero.w.numel()
    print(f"1. Underdetermined least squares: {n} samples, {d} parameters, float64, SGD batch 5, "
          f"lr 2, {zero.monitor.step} steps")  # fmt: skip
    rows = [
        ("‖w_min‖ = ‖pinv(X) y‖", zero.w_min.norm(), rand.w_min.norm()),
        ("‖w_near‖, nearest to w0", zero.w_near.norm(), rand.w_near.norm()),
        ("weight_norm (monitor, final)", hz["weight_norm"][-1], hr["weight_norm"][-1]),
        ("‖w_near - w0‖", (zero.w_near - zero.w0).norm(), (rand.w_near - rand.w0).norm()),
        ("weight_dist (monitor, final)", hz["weight_dist"][-1], hr["weight_dist"][-1]),
        ("‖w - w_min‖ / ‖w_min‖", zero.rel_error(zero.w_min), rand.rel_error(rand.w_min)),
        ("‖w - w_near‖ / ‖w_near‖", zero.rel_error(zero.w_near), rand.rel_error(rand.w_near)),
        ("residual ‖Xw - y‖ / ‖y‖", zero.residual, rand.residual),
    ]
    print(f"   {'':30s} {'from w0 = 0':>14s} {'from random w0':>15s}")
    for name, a, b in rows:
        print(f"   {name:30s} {float(a):14.6g} {float(b):15.6g}")
    print("   ‖w_t - w_near‖ along the run (from 0 | from w0):")
    for k in range(0, len(zero.dist_to_near), max(1, len(zero.dist_to_near) // 5)):
        print(f"     step {int(hz['step'][k]):5d}: {zero.dist_to_near[k]:.3e} | "
              f"{rand.dist_to_near[k]:.3e}")  # fmt: skip


def snr_summary(h, key: str) -> str:
    s = h[key]
    return f"{s[0]:.2f} / {np.nanmax(s):.2f} / {np.nanmedian(s):.2f}"


def print_digits(true: DigitsRun, rand: DigitsRun) -> None:
    ht, hr = true.monitor.history, rand.monitor.history
    print(f"\n2. Digits MLP 64-64-32-10, {true.n_train} training examples, SGD-momentum lr 0.01, "
          f"batch 256, until training accuracy is 100 %")  # fmt: skip

    def fit(r: DigitsRun) -> str:
        if r.fit_step is None:
            return f"not in {r.monitor.step} (acc {r.train_acc[-1]:.3f})"
        return f"{r.fit_step} ({len(r.train_acc)} ep.)"

    rows = [
        ("steps to fit", fit(true), fit(rand)),
        ("final training loss", f"{ht['loss'][-1]:.4f}", f"{hr['loss'][-1]:.4f}"),
        ("test accuracy (true labels)", f"{true.test_acc:.3f}", f"{rand.test_acc:.3f}"),
        ("weight_norm at fit", f"{ht['weight_norm'][-1]:.2f}", f"{hr['weight_norm'][-1]:.2f}"),
        ("weight_dist at fit", f"{ht['weight_dist'][-1]:.2f}", f"{hr['weight_dist'][-1]:.2f}"),
        *(
            (
                f"weight_dist/{n} at fit",
                f"{ht[f'weight_dist/{n}'][-1]:.2f}",
                f"{hr[f'weight_dist/{n}'][-1]:.2f}",
            )
            for n in LAYERS
        ),
        ("grad_snr first / max / median", "", ""),
        *(
            (f"  {n}", snr_summary(ht, f"grad_snr/{n}"), snr_summary(hr, f"grad_snr/{n}"))
            for n in LAYERS
        ),
        ("  whole model", snr_summary(ht, "grad_snr"), snr_summary(hr, "grad_snr")),
    ]
    print(f"   {'':30s} {'true labels':>22s} {'random labels':>22s}")
    for name, a, b in rows:
        print(f"   {name:30s} {a:>22s} {b:>22s}")
    print("   phase timeline (detector events):")
    for r in (true, rand):
        events = ", ".join(f"{e.step} {e.layer or 'model'} -> {e.new}" for e in r.monitor.events)
        print(f"     {r.labels:6s}: {events or 'none'}")
        print(f"     {'':6s}  final phases {r.monitor.phases}")


def plot(zero: LeastSquaresRun, rand: LeastSquaresRun, true: DigitsRun, rnd: DigitsRun,
         path: str = "implicit_regularization.png") -> str | None:  # fmt: skip
    """Write the figure; ``None`` (and nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    a = ax[0, 0]
    for r, name, c in ((zero, "from 0", "C0"), (rand, "from random w0", "C1")):
        h = r.monitor.history
        a.plot(h["step"], h["weight_norm"], c, label=f"weight_norm, {name}")
        a.axhline(float(r.w_near.norm()), color=c, ls=":", lw=1)
    a.axhline(float(zero.w_min.norm()), color="k", ls="--", lw=1, label="‖pinv(X) y‖")
    a.set(xlabel="step", ylabel="‖w‖", title="least squares: weight norm → nearest interpolant")
    a.legend(fontsize=8)
    a = ax[0, 1]
    for r, name, c in ((zero, "from 0", "C0"), (rand, "from random w0", "C1")):
        a.semilogy(r.monitor.history["step"], r.dist_to_near, c, label=name)
    a.set(xlabel="step", ylabel="‖w_t - w_near‖", title="least squares: distance to w_near")
    a.legend(fontsize=8)
    a = ax[1, 0]
    for r, c in ((true, "C2"), (rnd, "C3")):
        h = r.monitor.history
        for n, ls in zip(LAYERS, ("-", "--", ":")):
            a.loglog(h["step"], h[f"grad_snr/{n}"], c, ls=ls, lw=1, label=f"{r.labels} {n}")
    a.axhline(1.0, color="k", lw=0.8)
    a.set(xlabel="step", ylabel="grad_snr", title="digits: per-layer gradient SNR (one epoch)")
    a.legend(fontsize=7, ncol=2)
    a = ax[1, 1]
    for r, c in ((true, "C2"), (rnd, "C3")):
        h = r.monitor.history
        a.plot(h["step"], h["weight_dist"], c, label=f"{r.labels}: weight_dist")
        a.plot(h["step"], h["weight_norm"], c, ls="--", lw=1, label=f"{r.labels}: weight_norm")
        if r.fit_step is not None:
            a.axvline(r.fit_step, color=c, ls=":", lw=1)
    a.set(xlabel="step", title="digits: weights (dotted: training set fitted)")
    a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--max-epochs", type=int, default=3000)
    ap.add_argument("--plot", action="store_true", help="write implicit_regularization.png")
    args = ap.parse_args()
    zero, rand = least_squares("zero"), least_squares("random")
    print_least_squares(zero, rand)
    true = digits_run("true", max_epochs=args.max_epochs)
    rnd = digits_run("random", max_epochs=args.max_epochs)
    print_digits(true, rnd)
    if args.plot and (path := plot(zero, rand, true, rnd)) is not None:
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
