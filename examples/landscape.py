"""Loss-landscape slices of a small MLP: 1-D and 2-D filter-normalised, and the training path.

Trains a ReLU MLP on scikit-learn's bundled digits (a synthetic task without scikit-learn),
recording checkpoints, then computes with ``sgdlens.probes``:

* a 1-D filter-normalised slice (Li et al. 2018) at the start and at the end of training;
* a 21 x 21 filter-normalised 2-D slice around the final weights;
* the plane of the trajectory's top-2 PCA directions with the path projected onto it;
* the flatness radius (loss rise 0.1) and the sharpness (top Hessian eigenvalue).

Arrays are written to ``--out`` (default ``landscape_out/``) as ``landscape.npz``, and a figure
``landscape.png`` when matplotlib is installed (``pip install "sgdlens[plot]"``).

Run: ``OMP_NUM_THREADS=1 python examples/landscape.py`` (about 15 s on one CPU core).
Needs: forward passes for the slices and flatness; double backward for the sharpness.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import numpy as np
import torch
from torch import nn

from sgdlens import probes


def load_data() -> tuple[torch.Tensor, torch.Tensor, str]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1800, 64, generator=g)
        return x, (x @ torch.randn(64, 10, generator=g)).argmax(1), "synthetic"
    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target), "digits"


def loss_fn(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(m(b[0]), b[1])


def describe(curve: probes.Landscape1D) -> str:
    mid = len(curve.alphas) // 2
    lo, hi = float(curve.losses.min()), float(curve.losses.max())
    return f"loss at 0: {float(curve.losses[mid]):.4f}, range on [-1, 1]: {lo:.4f} .. {hi:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description="loss-landscape slices of a small MLP")
    parser.add_argument("--out", default="landscape_out", help="output directory")
    args = parser.parse_args()
    t0 = time.perf_counter()
    x, y, source = load_data()
    batch = (x[:1000], y[:1000])
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    start = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    checkpoints = []
    for _ in range(30):
        perm = torch.randperm(1000, generator=g)
        for i in range(0, 1000, 50):
            idx = perm[i : i + 50]
            opt.zero_grad()
            loss_fn(model, (batch[0][idx], batch[1][idx])).backward()
            opt.step()
        checkpoints.append({k: v.clone() for k, v in model.state_dict().items()})
    print(f"data: {source}; trained 30 epochs, {len(checkpoints)} checkpoints\n")

    gen = torch.Generator().manual_seed(1)
    c_start = probes.landscape_1d(start, loss_fn, batch, steps=25, generator=gen)
    gen = torch.Generator().manual_seed(1)
    c_end = probes.landscape_1d(model, loss_fn, batch, steps=25, generator=gen)
    print("1-D filter-normalised slice (25 points, same seed):")
    print(f"  at init : {describe(c_start)}")
    print(f"  trained : {describe(c_end)}")

    surf = probes.landscape_2d(
        model, loss_fn, batch, steps=21, generator=torch.Generator().manual_seed(2)
    )
    i, j = np.unravel_index(int(surf.losses.argmin()), tuple(surf.losses.shape))
    print(f"\n2-D filter-normalised slice, 21 x 21 on [-1, 1]^2 (vmapped: {surf.vmapped}):")
    print(
        f"  loss at centre {float(surf.losses[10, 10]):.4f}, minimum {float(surf.losses.min()):.4f}"
        f" at ({float(surf.xs[i]):+.1f}, {float(surf.ys[j]):+.1f}), "
        f"corners up to {float(surf.losses.max()):.2f}"
    )

    traj = probes.landscape_trajectory(checkpoints, loss_fn, batch, model=model, steps=21)
    ev = traj.explained_variance.tolist()
    print("\nPCA plane of the training path (Li et al. section 7):")
    print(f"  top-2 directions explain {100 * ev[0]:.1f}% + {100 * ev[1]:.1f}% of the path")
    first, last = traj.trajectory[0].tolist(), traj.trajectory[-1].tolist()
    print(
        f"  path from ({first[0]:+.2f}, {first[1]:+.2f}) to ({last[0]:+.2f}, {last[1]:+.2f}); "
        f"grid loss {float(traj.losses.min()):.4f} .. {float(traj.losses.max()):.2f}"
    )

    flat_start = probes.flatness(
        start, loss_fn, batch, epsilon=0.1, directions=4, generator=torch.Generator().manual_seed(3)
    )
    flat_end = probes.flatness(
        model, loss_fn, batch, epsilon=0.1, directions=4, generator=torch.Generator().manual_seed(3)
    )
    sharp = probes.sharpness(model, loss_fn, batch, generator=torch.Generator().manual_seed(4))
    print("\nflatness radius (loss +0.1 along filter-normalised directions, median of 4):")
    print(f"  at init {flat_start.radius:.3f}, trained {flat_end.radius:.3f}")
    print(
        f"sharpness (top Hessian eigenvalue) of the trained model: {sharp.value:.3f} "
        f"({sharp.hvps} HVPs, {sharp.method})"
    )

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "landscape.npz")
    np.savez(
        path,
        alphas=c_end.alphas.numpy(),
        curve_init=c_start.losses.numpy(),
        curve_trained=c_end.losses.numpy(),
        xs=surf.xs.numpy(),
        ys=surf.ys.numpy(),
        surface=surf.losses.numpy(),
        pca_xs=traj.xs.numpy(),
        pca_ys=traj.ys.numpy(),
        pca_surface=traj.losses.numpy(),
        trajectory=traj.trajectory.numpy(),
    )
    print(f"\narrays written to {path}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib not installed: no figure (pip install "sgdlens[plot]")')
    else:
        fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
        ax[0].plot(c_start.alphas, c_start.losses, label="init")
        ax[0].plot(c_end.alphas, c_end.losses, label="trained")
        ax[0].set(xlabel="alpha", ylabel="loss", title="1-D filter-normalised", yscale="log")
        ax[0].legend()
        cs = ax[1].contour(surf.xs, surf.ys, surf.losses.T.log10(), levels=20)
        ax[1].clabel(cs, fontsize=6)
        ax[1].set(title="2-D filter-normalised (log10 loss)")
        cs = ax[2].contour(traj.xs, traj.ys, traj.losses.T.log10(), levels=20)
        ax[2].plot(traj.trajectory[:, 0], traj.trajectory[:, 1], "o-", ms=3, color="k")
        ax[2].set(title="PCA plane of the path (log10 loss)")
        fig.tight_layout()
        fig_path = os.path.join(args.out, "landscape.png")
        fig.savefig(fig_path, dpi=120)
        print(f"figure written to {fig_path}")
    print(f"\n({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
