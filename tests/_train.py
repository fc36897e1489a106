"""A tiny training setup shared by the tests: one table of optimizers drives parametrize."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from sgdlens import PhaseMonitor

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "sgd_foreach": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam_foreach_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True),
    "adamax": lambda p: torch.optim.Adamax(p, lr=1e-2),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-2),
    "radam": lambda p: torch.optim.RAdam(p, lr=1e-2),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05),
    "adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5),
    "rprop": lambda p: torch.optim.Rprop(p, lr=1e-2),
    "asgd": lambda p: torch.optim.ASGD(p, lr=0.05),
    "lbfgs": lambda p: torch.optim.LBFGS(p, lr=0.5, max_iter=3),
}


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(5, 7),
            act=nn.Tanh(),
            drop=nn.Dropout(0.1),
            fc2=nn.Linear(7, 3),
        )
    )


def batches(n: int, seed: int = 2, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 5, generator=g), torch.randint(0, 3, (size,), generator=g))
        for _ in range(n)
    ]


def train(opt_name, steps, monitor_kwargs=None, record=False, model=None, data_seed=2):
    """Train ``steps`` steps; with ``record`` keep float64 grads and weights around each step."""
    model = model if model is not None else make_model()
    opt = OPTIMIZERS[opt_name](model.parameters())
    mon = None if monitor_kwargs is None else PhaseMonitor(opt, model=model, **monitor_kwargs)
    torch.manual_seed(1)  # dropout masks
    trace = {
        "grads": [],
        "before": [],
        "after": [],
        "init": [p.detach().double().clone() for p in model.parameters()],
    }
    for x, y in batches(steps, data_seed):

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        before = [p.detach().double().clone() for p in model.parameters()] if record else None
        if opt_name == "lbfgs":
            opt.step(closure)
        else:
            loss = closure()
            if mon is not None:
                mon.observe(loss=loss)
            opt.step()
        if record:
            trace["before"].append(before)
            trace["grads"].append([p.grad.detach().double().clone() for p in model.parameters()])
            trace["after"].append([p.detach().double().clone() for p in model.parameters()])
    return model, opt, mon, trace
