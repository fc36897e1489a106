"""``sgdlens demo``: Shwartz-Ziv & Tishby's network on their 12-bit task, watched by sgdlens.

The 12-10-7-5-4-3-2 tanh network with a softmax output, trained on 80% of the 4096 patterns
(a seeded random split) with minibatches reshuffled every epoch. The gradient SNR window is one
epoch, as in the paper; one record per ``log_epochs`` epochs.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sgdlens.datasets import tishby12
from sgdlens.header import new_run_id, use_run_id
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
    run_id: str | None = None,
) -> PhaseMonitor:
    """Train the network and return its (closed) monitor; records are in ``monitor.history``.

    ``out`` also writes them to a JSONL file; ``run_id`` names the run (default: a fresh id).
    """
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
    if run_id is not None:
        use_run_id(monitor, run_id)
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


def _progress(epochs: int) -> Any:
    """A tqdm bar over epochs on stderr where tqdm is installed, else ``None``."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=epochs, unit="epoch", file=sys.stderr, leave=False, dynamic_ncols=True)


def main(
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    optimizer: str,
    seed: int,
    log_epochs: int,
    print_every: int,
    out: str | None,
) -> int:
    """Run the demo and print per-layer SNR as it trains (the CLI's ``demo`` command).

    The run goes to a new file named after its run id (``runs/demo-<run id>.jsonl``) unless
    ``out`` names one; a run appended to an existing file keeps its own run id, so
    :func:`sgdlens.load` reads it apart from the runs before it.
    """
    run_id = new_run_id()
    out = out or os.path.join("runs", f"demo-{run_id}.jsonl")
    layers = [f"fc{i}" for i in range(1, len(WIDTHS))]
    per_epoch = math.ceil(0.8 * 4096 / batch_size)
    per_record = per_epoch * log_epochs
    print(
        f"Training Shwartz-Ziv & Tishby's 12-10-7-5-4-3-2 tanh network on their 12-bit task\n"
        f"({epochs} epochs of {per_epoch} {optimizer} steps, lr {lr:g}, batch {batch_size}).\n"
        f"Columns fc1..fc{len(layers)} and 'model' are the gradient signal-to-noise ratio of each\n"
        f"layer and of the whole network: |mean| / std of the minibatch gradients over one epoch.\n"
        f"Above 1 the gradients agree and the weights drift; below 1 noise dominates and they\n"
        f"diffuse (the boundary is SNR = 1; the detector switches below 0.8 and above 1.25).\n"
        f"One line every {log_epochs * print_every} epochs; writing run {run_id} to {out}\n"
    )
    print(
        f"{'epoch':>6} {'loss':>7} " + " ".join(f"{n:>6}" for n in layers) + f" {'model':>6}  phase"
    )
    nan = float("nan")
    bar = _progress(epochs)
    say = bar.write if bar is not None else print
    t0 = time.perf_counter()

    def show(r: dict) -> None:
        if "event" in r or "header" in r:
            return
        epoch = r["step"] // per_epoch
        if bar is not None:
            bar.update(epoch - bar.n)
        if (r["step"] // per_record - 1) % print_every:
            return
        snr = " ".join(f"{r.get(f'grad_snr/{n}', nan):6.2f}" for n in layers)
        line = f"{epoch:>6} {r.get('loss', nan):7.4f} {snr} {r.get('grad_snr', nan):6.2f}"
        line += f"  {r.get('phase', '-')}"
        if bar is None:  # no tqdm: say how long is left
            left = (time.perf_counter() - t0) * (epochs - epoch) / max(epoch, 1)
            line += f"  (about {left:.0f} s left)"
        say(line)

    try:
        mon = run(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            optimizer=optimizer,
            seed=seed,
            log_epochs=log_epochs,
            out=out,
            on_record=show,
            run_id=run_id,
        )
    finally:
        if bar is not None:
            bar.close()
    print(f"\n{mon.step} steps in {time.perf_counter() - t0:.1f} s.")
    for event in mon.events:
        if event.new == "diffusion" and event.layer:
            print(f"  {event.layer}: {event.old} -> diffusion at step {event.step}")
    print(f"final phases: {mon.phases}")
    print(
        f'\nDraw the report (needs matplotlib: pip install "sgdlens[plot]"):\n'
        f"  sgdlens report {out}"
    )
    return 0
