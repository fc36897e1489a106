"""Two phases of SGD on a real data set: scikit-learn's handwritten digits (ships with it).

A 64-64-32-10 tanh MLP trained with SGD-momentum (lr 0.01, batch 256). With one-epoch
SNR windows, every layer starts in drift (SNR > 1) and falls into diffusion (SNR < 1), and the
detector reports when. The run is short (600 steps), so the detector's time constants are set
in epochs: a 5-epoch median window, a 2-epoch dwell, a 5-epoch warm-up and a 50-epoch loss
window (its defaults, 250/100/250/2500 steps, suit runs of thousands of steps). Run: ``python examples/digits_mlp.py`` (about a minute on a CPU).
"""

from __future__ import annotations

import argparse
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from sgdlens import PhaseDetector, PhaseMonitor, lenses


def digits(seed: int = 0):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n = int(0.8 * len(x))
    return x[perm[:n]], y[perm[:n]], x[perm[n:]], y[perm[n:]]


def mlp() -> nn.Module:
    return nn.Sequential(OrderedDict(fc1=nn.Linear(64, 64), act1=nn.Tanh(), fc2=nn.Linear(64, 32),
                                     act2=nn.Tanh(), fc3=nn.Linear(32, 10)))  # fmt: skip


def train(epochs: int = 100, lr: float = 0.01, batch_size: int = 256, log_epochs: int = 1,
          seed: int = 0, lr_at=None, verbose: bool = True):  # fmt: skip
    """Train and return the closed monitor. ``lr_at(step)`` overrides the learning rate."""
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = digits(seed)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    batches = math.ceil(len(xtr) / batch_size)
    detector = PhaseDetector(window=5 * batches, dwell=2 * batches, warmup=5 * batches,
                             spike_window=50 * batches)  # fmt: skip
    monitor = PhaseMonitor(opt, model=model, lenses=[lenses.GradSNR(window=batches), lenses.WeightNorms()],
                           log_every=batches * log_epochs, detector=detector)  # fmt: skip
    if verbose:
        monitor.on_phase_change(
            lambda e: print(f"  step {e.step:6d}: {e.layer or 'model':5s} {e.old} -> {e.new}")
        )
    with monitor:
        for _ in range(epochs):
            order = torch.randperm(len(xtr))
            for i in range(batches):
                if lr_at is not None:
                    for g in opt.param_groups:
                        g["lr"] = lr_at(monitor.step)
                idx = order[i * batch_size : (i + 1) * batch_size]
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
                loss.backward()
                monitor.observe(loss=loss)
                opt.step()
    with torch.no_grad():
        monitor.test_accuracy = float((model(xte).argmax(1) == yte).float().mean())  # type: ignore[attr-defined]
    return monitor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=100)
    args = ap.parse_args()
    print("phase events:")
    mon = train(epochs=args.epochs)
    h = mon.history
    print(f"\n{'step':>6} {'loss':>7} {'fc1':>6} {'fc2':>6} {'fc3':>6}")
    for r in h.records[:: max(1, len(h) // 15)]:
        print(
            f"{r['step']:6d} {r['loss']:7.4f} "
            + " ".join(f"{r.get(f'grad_snr/{n}', math.nan):6.2f}" for n in ("fc1", "fc2", "fc3"))
        )
    print(f"\ntest accuracy {mon.test_accuracy:.3f}; final phases {mon.phases}")


if __name__ == "__main__":
    main()
