"""Basins proper: barriers between MLPs before and after aligning their hidden units.

A network whose hidden units are permuted computes the same function from other weights, so
the straight line between two independently trained networks crosses the barrier that the
permutation symmetry alone produces (Entezari et al. 2022). ``probes.align`` permutes one
network's units to match the other's (Git Re-Basin, Ainsworth, Hayase & Srinivasa, ICLR 2023)
before the barrier is measured. On scikit-learn's bundled digits this script prints:

1. a trained 64-64-64-10 MLP against a permuted copy of itself, before and after alignment;
2. two independently initialised MLPs of several widths, 3 seeds each: the barrier unaligned,
   after weight matching and after activation matching (Ainsworth et al. report it shrinking
   as the width grows);
3. SGD against Adam from *different* initialisations (Im, Tao & Branson's question), aligned;
4. the cost of alignment beside one training step.

Run: ``OMP_NUM_THREADS=1 python examples/align.py`` (about 30 s on one CPU core).
Needs: scikit-learn (the data) and scipy (``pip install "sgdlens[align]"``).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

from sgdlens import probes

WIDTHS = (16, 64, 256)
SEEDS = (0, 1, 2)


def load_data() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1400], perm[1400:]
    return (x[tr], y[tr]), (x[te], y[te])


def make_mlp(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )


def loss_fn(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(m(b[0]), b[1])


def error_fn(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return (m(b[0]).argmax(-1) != b[1]).float().mean()


def train(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], *, seed: int,
          optimizer: str = "sgd", epochs: int = 30) -> tuple[nn.Module, float]:  # fmt: skip
    """Train with minibatches of 64; returns the model and the mean time of one step (s)."""
    x, y = data
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed + 100)
    steps, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss_fn(model, (x[idx], y[idx])).backward()
            opt.step()
            steps += 1
    return model, (time.perf_counter() - t0) / steps


def barriers(a: nn.Module, b: nn.Module, train_b, test_b) -> tuple[float, float]:
    """(Entezari loss barrier on the training data, Frankle error barrier on held-out data)."""
    loss = probes.interpolate(a, b, loss_fn, train_b, steps=30).barrier
    err = probes.interpolate(a, b, loss_fn, test_b, steps=30, metric_fn=error_fn).error_barrier
    return loss, err


def permuted(model: nn.Module, seed: int) -> nn.Module:
    """The same function with both hidden layers' units reordered (by hand)."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    p1, p2 = (torch.randperm(model[i].out_features, generator=g) for i in (0, 2))
    with torch.no_grad():
        out[0].weight.copy_(model[0].weight[p1])
        out[0].bias.copy_(model[0].bias[p1])
        out[2].weight.copy_(model[2].weight[p2][:, p1])
        out[2].bias.copy_(model[2].bias[p2])
        out[4].weight.copy_(model[4].weight[:, p2])
    return out


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):7.3f} [{min(values):6.3f}, {max(values):6.3f}]"


def main() -> None:
    t_start = time.perf_counter()
    train_b, test_b = load_data()
    print(f"digits: {len(train_b[0])} train / {len(test_b[0])} test; MLP 64-w-w-10, ReLU\n")

    # 1. a permuted copy
    net, _ = train(make_mlp(64, 0), train_b, seed=0)
    twin = permuted(net, seed=1)
    back = probes.align(net, twin)
    with torch.no_grad():
        moved = max(float((p - q).abs().max()) for p, q in zip(net.parameters(), back.parameters()))
    print("1. a trained net against a permuted copy of itself (same function)")
    print(f"   {'':<22}{'loss barrier':>14}{'error barrier':>15}")
    for name, other in (("unaligned", twin), ("aligned (weights)", back)):
        lb, eb = barriers(net, other, train_b, test_b)
        print(f"   {name:<22}{lb:>14.2e}{eb:>15.2e}")
    print(f"   largest weight difference after alignment: {moved:.1e}\n")

    # 2. independent inits, several widths
    print("2. two independent inits, SGD; mean [min, max] over seeds", SEEDS)
    print(f"   {'width':<7}{'':<13}{'loss barrier':>27}{'error barrier':>29}")
    cost: dict[int, tuple[float, float, float]] = {}
    for width in WIDTHS:
        rows: dict[str, list[tuple[float, float]]] = {"unaligned": [], "weights": [],
                                                      "activations": []}  # fmt: skip
        step_time, t_w, t_a = [], [], []
        for seed in SEEDS:
            a, sa = train(make_mlp(width, 2 * seed), train_b, seed=2 * seed)
            b, sb = train(make_mlp(width, 2 * seed + 1), train_b, seed=2 * seed + 1)
            step_time += [sa, sb]
            t0 = time.perf_counter()
            bw = probes.align(a, b)
            t_w.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ba = probes.align(a, b, method="activations", data=train_b)
            t_a.append(time.perf_counter() - t0)
            for name, other in (("unaligned", b), ("weights", bw), ("activations", ba)):
                rows[name].append(barriers(a, other, train_b, test_b))
        for name, vals in rows.items():
            label = str(width) if name == "unaligned" else ""
            lbs, ebs = [v[0] for v in vals], [v[1] for v in vals]
            print(f"   {label:<7}{name:<13}{spread(lbs):>27}{spread(ebs):>29}")
        cost[width] = (statistics.median(step_time), statistics.median(t_w), statistics.median(t_a))
    print()

    # 3. SGD vs Adam from different inits
    print("3. SGD vs Adam from different inits, width 64")
    print(f"   {'seed':<7}{'':<13}{'loss barrier':>14}{'error barrier':>15}")
    for seed in SEEDS:
        a, _ = train(make_mlp(64, 10 + seed), train_b, seed=seed)
        b, _ = train(make_mlp(64, 20 + seed), train_b, seed=seed, optimizer="adam")
        for name, other in (("unaligned", b), ("aligned", probes.align(a, b))):
            lb, eb = barriers(a, other, train_b, test_b)
            print(f"   {seed if name == 'unaligned' else '':<7}{name:<13}{lb:>14.3f}{eb:>15.3f}")
    print()

    # 4. cost
    print("4. cost of alignment (median over seeds) beside one training step (batch 64)")
    print(
        f"   {'width':<7}{'step':>10}{'weights':>12}{'(steps)':>9}{'activations':>13}{'(steps)':>9}"
    )
    for width, (step, tw, ta) in cost.items():
        print(f"   {width:<7}{step * 1e3:>8.2f}ms{tw * 1e3:>10.1f}ms{tw / step:>9.0f}"
              f"{ta * 1e3:>11.1f}ms{ta / step:>9.0f}")  # fmt: skip
    print(
        "\nloss barrier: Entezari et al., max over alpha of the train loss above the chord (nats);"
        "\nerror barrier: Frankle et al., sup test error minus the endpoints' mean."
        "\nActivation matching uses the 1400 training inputs."
    )
    print(f"\n({time.perf_counter() - t_start:.1f} s; other programs may share the CPU)")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
