"""``sgdlens demo``: Shwartz-Ziv & Tishby's network on their 12-bit task, watched by sgdlens.

The 12-10-7-5-4-3-2 tanh network with a softmax output, trained on 80% of the 4096 patterns
(a seeded random split) with minibatches reshuffled every epoch. The gradient SNR window is one
epoch, as in the paper; one record per ``log_epochs`` epochs.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sgdlens.datasets import tishby12
from sgdlens.lenses import GradNorm, GradSNR, WeightNorms
from sgdlens.monitor import PhaseMonitor
from sgdlens.sinks import JSONLSink

WIDTHS = (12, 10, 7, 5, 4, 3, 2)


def tishby_net(widths: tuple[int, ...] = WIDTHS) -> nn.Sequential:
    """Fully connected tanh layers named ``fc1 … fcN`` (the last one gives the logits).

    Weights are drawn from a normal distribution truncated at two standard deviations with
    std ``1/sqrt(fan_in)`` and biases are 0, as in the authors' code.
    """
    layers: list[tuple[str, nn.Module]] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths), 1):
        lin = nn.Linear(a, b)
        std = 1 / math.sqrt(a)
        nn.init.trunc_normal_(lin.weight, std=std, a=-2 * std, b=2 * std)
        nn.init.zeros_(lin.bias)
        layers.append((f"fc{i}", lin))
        if i < len(widths) - 1:
            layers.append((f"tanh{i}", nn.Tanh()))
    return nn.Sequential(OrderedDict(layers))


def run(
    *,
    epochs: int = 2000,
    batch_size: int = 512,
    lr: float = 4e-4,
    optimizer: str = "adam",
    seed: int = 0,
    log_epochs: int = 10,
    out: str | None = None,
    on_record: Callable[[dict], None] | None = None,
) -> PhaseMonitor:
    """Train the network and return its (closed) monitor; records are in ``monitor.history``."""
    torch.manual_seed(seed)
    x, y = tishby12()
    perm = torch.randperm(len(x))
    n_train = int(0.8 * len(x))
    xtr, ytr = x[perm[:n_train]], y[perm[:n_train]]
    model = tishby_net()
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    else:
        raise ValueError(f"demo optimizer={optimizer!r}: use 'adam' or 'sgd'")
    batches = math.ceil(n_train / batch_size)
    sinks: list = [JSONLSink(out)] if out else []
    if on_record is not None:
        sinks.append(on_record)
    monitor = PhaseMonitor(
        opt,
        model=model,
        lenses=[GradSNR(window=batches), WeightNorms(), GradNorm()],
        sinks=sinks,
        log_every=batches * log_epochs,
    )
    with monitor:
        for _ in range(epochs):
            order = torch.randperm(n_train)
            for i in range(batches):
                idx = order[i * batch_size : (i + 1) * batch_size]
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
                loss.backward()
                monitor.observe(loss=loss)
                opt.step()
    return monitor


def main(
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    optimizer: str,
    seed: int,
    log_epochs: int,
    print_every: int,
    out: str,
) -> int:
    """Run the demo and print per-layer SNR as it trains (the CLI's ``demo`` command)."""
    layers = [f"fc{i}" for i in range(1, len(WIDTHS))]
    print(f"{'step':>7} {'loss':>7} " + " ".join(f"{n:>6}" for n in layers) + f" {'model':>6}")
    per_record = math.ceil(0.8 * 4096 / batch_size) * log_epochs
    nan = float("nan")

    def show(r: dict) -> None:
        if "event" in r or (r["step"] // per_record - 1) % print_every:
            return
        snr = " ".join(f"{r.get(f'grad_snr/{n}', nan):6.2f}" for n in layers)
        print(f"{r['step']:>7} {r.get('loss', nan):7.4f} {snr} {r.get('grad_snr', nan):6.2f}")

    t0 = time.perf_counter()
    mon = run(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        seed=seed,
        log_epochs=log_epochs,
        out=out,
        on_record=show,
    )
    print(f"{mon.step} steps in {time.perf_counter() - t0:.1f} s; run appended to {out}")
    for event in mon.events:
        if event.new == "diffusion" and event.layer:
            print(f"  {event.layer}: {event.old} -> diffusion at step {event.step}")
    print(f"final phases: {mon.phases}")
    return 0
