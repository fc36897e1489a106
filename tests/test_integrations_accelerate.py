"""accelerate: PhaseMonitor on an ``Accelerator.prepare``d optimizer (the documented recipe)."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sgdlens import PhaseMonitor


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons; give each test its own."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _run(monitored: bool, accumulate: int = 2):
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulate)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 6, generator=g)
    loader = DataLoader(TensorDataset(x, (x[:, :3].sum(1) > 0).long()), batch_size=8)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    monitor = None
    if monitored:  # the recipe: the prepared optimizer, the unwrapped model
        monitor = PhaseMonitor(opt, model=accelerator.unwrap_model(model), log_every=4)
    for xb, yb in loader:
        with accelerator.accumulate(model):
            loss = nn.functional.cross_entropy(model(xb), yb)
            accelerator.backward(loss)
            if monitor is not None:
                monitor.observe(loss=loss)
            opt.step()  # AcceleratedOptimizer: a real step only when gradients sync
            opt.zero_grad()
    return model, opt, monitor


def test_monitor_unwraps_the_accelerated_optimizer_and_sees_real_steps_only():
    model, opt, monitor = _run(monitored=True)
    assert monitor is not None
    assert type(opt).__name__ == "AcceleratedOptimizer"
    assert monitor.optimizer is opt.optimizer and isinstance(monitor.optimizer, torch.optim.SGD)
    assert PhaseMonitor.of(opt) is monitor
    assert monitor.step == 8  # 16 batches, accumulation 2
    assert [r["step"] for r in monitor.history.records] == [4, 8]
    assert "grad_snr/0" in monitor.history.records[0] and "grad_snr/2" in monitor.history.records[0]
    monitor.close()


def test_training_is_bitwise_identical_with_and_without_the_monitor():
    plain, _, _ = _run(monitored=False)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    watched, _, monitor = _run(monitored=True)
    assert monitor is not None
    for a, b in zip(plain.parameters(), watched.parameters()):
        assert torch.equal(a, b)
    monitor.close()
