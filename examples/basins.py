"""Same basin or not? Barriers between SGD children, independent inits, permutations and Adam.

Poggio & Liao: averaging two models inside one basin gives a loss at most the average of theirs;
between basins it is higher. Frankle et al.: children trained from one starting point with
different data orders are linearly connected ("stable"). Im, Tao & Branson: different optimizers
can end in different minima. This script trains small MLPs on scikit-learn's bundled digits
(or a synthetic task if scikit-learn is absent) and prints the barrier table, with the pairs
separated by a permutation also measured after ``probes.align`` (needs scipy):

    pair                         loss barrier  error barrier  verdict

Run: ``OMP_NUM_THREADS=1 python examples/basins.py`` (about 20 s on one CPU core).
Needs: forward passes only (no double backward); a held-out batch for the error barrier.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from sgdlens import probes


def load_data() -> tuple[torch.Tensor, torch.Tensor, str]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1800, 64, generator=g)
        teacher = torch.randn(64, 10, generator=g)
        return x, (x @ teacher).argmax(1), "synthetic (scikit-learn not installed)"
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    return x, torch.tensor(d.target), "scikit-learn digits"


def make_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def loss_fn(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(m(b[0]), b[1])


def error_fn(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return (m(b[0]).argmax(-1) != b[1]).float().mean()


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    order_seed: int,
    optimizer: str = "sgd",
    epochs: int = 40,
) -> nn.Module:
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(order_seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss_fn(model, (x[idx], y[idx])).backward()
            opt.step()
    return model


def permute_hidden(model: nn.Module, seed: int) -> nn.Module:
    """The same function with its hidden units reordered."""
    out = copy.deepcopy(model)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out[0].weight.copy_(model[0].weight[perm])
        out[0].bias.copy_(model[0].bias[perm])
        out[2].weight.copy_(model[2].weight[:, perm])
    return out


def main() -> None:
    t0 = time.perf_counter()
    x, y, source = load_data()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    tr, te = perm[:1400], perm[1400:]
    train_b, test_b = (x[tr], y[tr]), (x[te], y[te])
    print(f"data: {source}, {len(tr)} train / {len(te)} test\n")

    parent = make_mlp(0)
    child_a = train(copy.deepcopy(parent), *train_b, order_seed=1)
    child_b = train(copy.deepcopy(parent), *train_b, order_seed=2)
    spawn = train(copy.deepcopy(parent), *train_b, order_seed=3, epochs=5)  # spawn at epoch 5
    late_a = train(copy.deepcopy(spawn), *train_b, order_seed=4, epochs=35)
    late_b = train(copy.deepcopy(spawn), *train_b, order_seed=5, epochs=35)
    other_init = train(make_mlp(1), *train_b, order_seed=1)
    adam = train(copy.deepcopy(parent), *train_b, order_seed=1, optimizer="adam")
    permuted = permute_hidden(child_a, 0)

    pairs = [
        ("same init, two data orders", child_a, child_b),
        ("spawned at epoch 5, two orders", late_a, late_b),
        ("SGD vs Adam, same init", child_a, adam),
        ("two different inits", child_a, other_init),
        ("  the same, aligned", child_a, probes.align(child_a, other_init)),
        ("model vs its permutation", child_a, permuted),
        ("  the same, aligned", child_a, probes.align(child_a, permuted)),
    ]
    for name, m in [("child A", child_a), ("other init", other_init), ("Adam", adam)]:
        with torch.no_grad():
            print(
                f"{name:<11} train loss {loss_fn(m, train_b):.4f}  "
                f"test error {error_fn(m, test_b):.3f}"
            )
    print()
    print(f"{'pair':<32}{'loss barrier':>13}{'error barrier':>15}   verdict (error barrier)")
    for name, a, b in pairs:
        loss_res = probes.interpolate(a, b, loss_fn, train_b, steps=30)
        verdict = probes.basin_test(a, b, loss_fn, test_b, metric_fn=error_fn, steps=30)
        print(f"{name:<32}{loss_res.barrier:>13.4f}{verdict.value:>15.3f}   {verdict}")
    print(
        "\nloss barrier: Entezari et al., max over alpha of train loss above the chord (nats);"
        "\nerror barrier: Frankle et al., sup test error minus the endpoints' mean; same basin"
        "\nwhen <= 0.02. A hidden-unit permutation is the same function, yet sits behind a"
        "\nbarrier: compare basins only after aligning permutations (probes.align, the"
        "\n'aligned' rows; examples/align.py measures this across widths and seeds)."
    )
    print(f"\n({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
