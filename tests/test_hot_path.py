"""The per-step path: its aten operations do not grow with the number of parameters."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sgdlens import PhaseMonitor, lenses


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _step_ops(n_layers: int, lens_list, budget=None, skipped=False) -> int:
    """The aten ops of ``opt.step()`` at the 3rd step (not a log step) of a monitored MLP with
    ``2 * n_layers`` parameter tensors."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(n_layers)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mon = PhaseMonitor(
        opt, model=model, lenses=lens_list, log_every=50, layers="params", overhead_budget=budget
    )
    x = torch.randn(4, 3)
    for i in range(3):
        opt.zero_grad()
        model(x).square().sum().backward()
        if i == 2:
            if skipped:
                mon.sampler.every = 7  # step 3 is neither sampled nor due nor a log step
            with _Ops() as ops:
                opt.step()
        else:
            opt.step()
    mon.close()
    return len(ops.names)


def _bare_ops(n_layers: int) -> int:
    """The same for an unmonitored step: the optimizer's own ops, counted out."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(n_layers)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).square().sum().backward()
    opt.step()
    with _Ops() as ops:
        opt.step()
    return len(ops.names)


@pytest.mark.parametrize("path", ["host", "device"])
@pytest.mark.parametrize(
    ("name", "make", "budget", "skipped", "most"),
    [  # most: a ceiling a little above today's counts (host / device path: 7/9, 9/11,
        # 27/47, 10/12, 10/14, 0/0), so that a regression shows
        ("lenses=[]", lambda: [], None, False, 10),
        ("default", lambda: None, None, False, 12),
        ("every lens", lenses.full, None, False, 50),
        ("GradSNR(decay)", lambda: [lenses.GradSNR(decay=0.9)], None, False, 13),
        (
            "GradSNR(decay='optimizer')",
            lambda: [lenses.GradSNR(decay="optimizer")],
            None,
            False,
            15,
        ),
        ("sampled out", lambda: None, 0.03, True, 0),
    ],
)
def test_monitor_ops_per_step_do_not_grow_with_the_parameters(
    path, name, make, budget, skipped, most, monkeypatch
):
    from sgdlens import _torch

    if path == "device":  # the accelerator path: no host reads of device flags
        monkeypatch.setattr(_torch, "FREE_HOST_READ", set())
    counts = []
    for n_layers in (2, 8, 32):
        counts.append(_step_ops(n_layers, make(), budget, skipped) - _bare_ops(n_layers))
    assert counts[0] == counts[1] == counts[2], f"{name} ({path}): {counts}"
    assert counts[0] <= most, f"{name} ({path}): {counts[0]} ops per step"


def test_per_sample_hooks_build_no_wrappers_per_step(monkeypatch):
    """The per-sample engine wraps its hooks for ``torch.compile`` once, when it attaches them:
    building a ``torch.compiler.disable`` wrapper costs about 0.3 ms, and one per module output
    per step cost more than the per-sample arithmetic (it used to be built in every forward)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = PhaseMonitor(opt, model=model, lenses=[lenses.NoiseScale("per_sample")], log_every=2)
    built = []
    real = torch.compiler.disable
    monkeypatch.setattr(torch.compiler, "disable", lambda *a, **k: built.append(a) or real(*a, **k))
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(8, 3)).square().mean().backward()
        opt.step()
    assert mon.history.records[-1]["noise_scale"] > 0  # the hooks ran and gave a statistic
    assert built == []
    mon.close()


def test_observe_takes_two_ops_and_keeps_no_graph():
    """``observe(loss=...)`` adds the value in float64 in place (and keeps it as the trace's last
    loss): two ops per call after the first, no copy, no cast, no autograd graph kept."""
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = PhaseMonitor(opt, model=model, log_every=50)
    losses = [model(torch.randn(4, 3)).square().mean() for _ in range(3)]  # float32, with grad
    mon.observe(loss=losses[0], acc=0.25)
    with _Ops() as ops:
        mon.observe(loss=losses[1])
    mon.observe(loss=losses[2].reshape(1), acc=0.5)  # a 1-element tensor counts too
    assert ops.names == ["aten.copy_.default", "aten.add_.Tensor"]
    total, count = mon.tally.observed["loss"]
    assert not total.requires_grad and total.grad_fn is None and count == 3
    want = sum(float(x) for x in losses)  # each float32 value, added in float64
    assert total.dtype == torch.float64 and float(total) == want
    assert float(mon.tally.observed["acc"][0]) == 0.75
    assert float(mon.tally.last_loss) == float(losses[2])
    mon.close()


def _python_lines(n_layers: int, lens_list) -> int:
    """Lines of sgdlens's Python run by ``opt.step()`` at the 3rd step (not a log step) of a
    monitored MLP with ``2 * n_layers`` parameter tensors (a loop body counts once per pass)."""
    import sys

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(n_layers)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mon = PhaseMonitor(opt, model=model, lenses=lens_list, log_every=50, layers="params")
    x = torch.randn(4, 3)
    lines = 0

    def local(frame, event, arg):
        nonlocal lines
        lines += event == "line"
        return local

    def trace(frame, event, arg):
        return local if "/sgdlens/" in frame.f_code.co_filename.replace("\\", "/") else None

    for i in range(3):
        opt.zero_grad()
        model(x).square().sum().backward()
        if i == 2:
            sys.settrace(trace)
            try:
                opt.step()
            finally:
                sys.settrace(None)
        else:
            opt.step()
    mon.close()
    return lines


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("lenses=[]", lambda: []),
        ("default", lambda: None),
        ("GradSNR(decay)", lambda: [lenses.GradSNR(decay=0.9)]),
        ("GradSNR(decay='optimizer')", lambda: [lenses.GradSNR(decay="optimizer")]),
    ],
)
def test_monitor_python_per_step_does_not_grow_with_the_parameters(name, make):
    """The host work of a step: reading each ``.grad`` and checking that every gradient is
    there and dense run in C loops (``map``); no line of sgdlens runs once per parameter."""
    counts = [_python_lines(n, make()) for n in (2, 8, 32)]
    assert counts[0] == counts[1] == counts[2], f"{name}: {counts}"
