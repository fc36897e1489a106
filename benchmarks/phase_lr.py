"""PhaseLR against the usual schedules, same epoch budget, 3 seeds (not part of the test suite).

Run: ``OMP_NUM_THREADS=1 python benchmarks/phase_lr.py`` (a few minutes on one CPU core;
``--tasks digits`` for one task, ``--seeds 0`` for a smoke run, ``--seeds 3 4 5`` for fresh
seeds). Prints one markdown table per
task: final training loss (full training set, after the last epoch) and test accuracy, mean ±
std over the seeds, and how many tuning runs each schedule needed.

Tasks (all data bundled with scikit-learn or generated in code; nothing is downloaded):

* ``digits``: 64-64-32-10 tanh MLP on scikit-learn's 8×8 digits (1437 train / 360 test);
* ``tishby``: Shwartz-Ziv & Tishby's 12-10-7-5-4-3-2 tanh network on the 12-bit task
  (80 % / 20 % seeded split);
* ``cnn``: a small CNN (two 3×3 conv layers, 16 and 32 channels) on the digits as 1×8×8 images.

Every run: SGD with momentum 0.9, batch 64, the task's base rate, the same number of epochs.
Schedules, all stepped once per optimizer step except ``ReduceLROnPlateau`` (once per epoch on
the epoch's mean training loss):

* ``constant``: the base rate throughout;
* ``step (tuned)``: ×0.1 at milestones chosen on a grid of 5 (fractions of the budget:
  [0.3], [0.5], [0.7], [0.5, 0.75], [0.3, 0.6, 0.9]) by validation accuracy (a 20 % split of
  the training set, one tuning seed): 5 tuning runs;
* ``cosine``: ``CosineAnnealingLR`` to 0 over the budget;
* ``plateau``: ``ReduceLROnPlateau`` with torch's defaults (factor 0.1, patience 10 epochs);
* ``PhaseLR``: ``PhaseMonitor(opt, model=model)`` and ``PhaseLR(opt, monitor)``, all defaults
  (it cuts only in a diffusion episode entered from drift);
* ``PhaseLR (from warmup)``: the same with ``from_warmup=True``, the earlier rule (it also
  cuts when the model enters diffusion straight from the detector's warm-up);
* ``PhaseLR (stationary)``: ``PhaseLR(opt, monitor, trigger="stationary")``, all defaults
  (SASA's test of Yaida's relation every 100 steps on the most recent half of the steps at the
  current rate, 95 % interval, at least 1000 steps in the window, i.e. no test before step
  2000; ×0.1 at each decay);
* ``PhaseLR (stationary, window ≥ 100)``: the same test with ``min_samples=100`` (first test
  at step 200).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, MultiStepLR, ReduceLROnPlateau

from sgdlens import PhaseMonitor
from sgdlens.datasets import tishby12
from sgdlens.demo import tishby_net
from sgdlens.schedulers import PhaseLR
from sgdlens.stationarity import StationarityTest

GRID = ([0.3], [0.5], [0.7], [0.5, 0.75], [0.3, 0.6, 0.9])
SCHEDULES = (
    "constant",
    "step (tuned)",
    "cosine",
    "plateau",
    "PhaseLR",
    "PhaseLR (from warmup)",
    "PhaseLR (stationary)",
    "PhaseLR (stationary, window ≥ 100)",
)
Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Task:
    name: str
    data: Callable[[], Data]
    model: Callable[[], nn.Module]
    lr: float
    epochs: int
    batch: int = 64


def _split(x: torch.Tensor, y: torch.Tensor, seed: int = 0, frac: float = 0.8) -> Data:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n = int(frac * len(x))
    return x[perm[:n]], y[perm[:n]], x[perm[n:]], y[perm[n:]]


def digits_data() -> Data:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return _split(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))


def digits_images() -> Data:
    xtr, ytr, xte, yte = digits_data()
    return xtr.view(-1, 1, 8, 8), ytr, xte.view(-1, 1, 8, 8), yte


def tishby_data() -> Data:
    x, y = tishby12()
    return _split(x, y)


def mlp() -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(64, 64),
            act1=nn.Tanh(),
            fc2=nn.Linear(64, 32),
            act2=nn.Tanh(),
            fc3=nn.Linear(32, 10),
        )
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 16, 3, padding=1),
            act1=nn.ReLU(),
            conv2=nn.Conv2d(16, 32, 3, padding=1),
            act2=nn.ReLU(),
            pool=nn.MaxPool2d(2),
            flat=nn.Flatten(),
            fc=nn.Linear(32 * 4 * 4, 10),
        )
    )


TASKS = {
    "digits": Task("digits MLP", digits_data, mlp, lr=0.05, epochs=40),
    "tishby": Task("Tishby 12-bit", tishby_data, tishby_net, lr=0.05, epochs=40),
    "cnn": Task("digits CNN", digits_images, cnn, lr=0.02, epochs=25),
}


def train(
    task: Task, schedule: str, seed: int, data: Data, milestones: list[float] | None = None
) -> dict[str, Any]:
    """One run; returns final train loss, test accuracy and the steps at which the rate fell."""
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = task.model()
    opt = torch.optim.SGD(model.parameters(), lr=task.lr, momentum=0.9)
    batches = math.ceil(len(xtr) / task.batch)
    total = batches * task.epochs
    monitor = None
    sched: Any = None
    if schedule == "step (tuned)":
        sched = MultiStepLR(opt, [round(f * total) for f in milestones or []], gamma=0.1)
    elif schedule == "cosine":
        sched = CosineAnnealingLR(opt, T_max=total)
    elif schedule == "plateau":
        sched = ReduceLROnPlateau(opt)
    elif schedule.startswith("PhaseLR"):
        monitor = PhaseMonitor(opt, model=model)
        trigger: Any = "stationary" if schedule == "PhaseLR (stationary)" else "drift"
        if schedule == "PhaseLR (stationary, window ≥ 100)":
            trigger = StationarityTest(min_samples=100)
        sched = PhaseLR(
            opt, monitor, from_warmup=schedule == "PhaseLR (from warmup)", trigger=trigger
        )
    drops: list[int] = []  # steps after which the rate fell
    step = 0
    for _ in range(task.epochs):
        order = torch.randperm(len(xtr))
        epoch_loss = 0.0
        for i in range(batches):
            idx = order[i * task.batch : (i + 1) * task.batch]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            loss.backward()
            if monitor is not None:
                monitor.observe(loss=loss)
            opt.step()
            step += 1
            epoch_loss += float(loss.detach()) / batches
            before = opt.param_groups[0]["lr"]
            if sched is not None and schedule != "plateau":
                sched.step()
            if opt.param_groups[0]["lr"] < before and schedule != "cosine":
                drops.append(step)
        if schedule == "plateau":
            before = opt.param_groups[0]["lr"]
            sched.step(epoch_loss)
            if opt.param_groups[0]["lr"] < before:
                drops.append(step)
    if monitor is not None:
        monitor.close()
    with torch.no_grad():
        train_loss = float(F.cross_entropy(model(xtr), ytr))
        accuracy = float((model(xte).argmax(1) == yte).float().mean())
    return {"loss": train_loss, "acc": accuracy, "drops": drops, "steps": total}


def tune_step_decay(task: Task, data: Data) -> list[float]:
    """The grid point with the best validation accuracy (then lowest train loss), seed 100."""
    xtr, ytr, _, _ = data
    inner = _split(xtr, ytr, seed=1)  # 80 % of the training set to train, 20 % to validate
    scores = []
    for milestones in GRID:
        r = train(task, "step (tuned)", 100, inner, milestones)
        scores.append((-r["acc"], r["loss"], milestones))
    return min(scores, key=lambda t: (t[0], t[1]))[2]


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def run_task(key: str, seeds: list[int]) -> str:
    task = TASKS[key]
    data = task.data()
    t0 = time.perf_counter()
    best = tune_step_decay(task, data)
    lines = [
        f"**{task.name}** ({task.epochs} epochs of {math.ceil(len(data[0]) / task.batch)} steps,"
        f" base rate {task.lr}; tuned milestones {best}; seeds {seeds})",
        "",
        "| schedule | final train loss | test accuracy | tuning runs | rate cut at steps |",
        "|---|---|---|---|---|",
    ]
    for schedule in SCHEDULES:
        runs = [train(task, schedule, seed, data, best) for seed in seeds]
        tuning = len(GRID) if schedule == "step (tuned)" else 0
        drops = "; ".join(",".join(str(d) for d in r["drops"]) or "none" for r in runs)
        if schedule == "cosine":
            drops = "(smooth)"
        lines.append(
            f"| {schedule} | {mean_std([r['loss'] for r in runs])} | "
            f"{mean_std([100 * r['acc'] for r in runs])} % | {tuning} | {drops} |"
        )
    lines.append(f"\n({time.perf_counter() - t0:.0f} s)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[0, 1, 2],
        help="training seeds (default 0 1 2; the step decay is tuned on seed 100)",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    for key in args.tasks:
        print(run_task(key, args.seeds), flush=True)
        print()


if __name__ == "__main__":
    main()
