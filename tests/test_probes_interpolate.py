"""Interpolation, barriers and the basin verdict against direct evaluation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sgdlens import probes

D = torch.float64


def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(D)


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 3, generator=g, dtype=D), torch.randint(0, 2, (32,), generator=g)


def ce(m, b):
    return nn.functional.cross_entropy(m(b[0]), b[1])


def err(m, b):
    return (m(b[0]).argmax(-1) != b[1]).to(D).mean()


def direct(a, b, alpha, fn, batch):
    m = copy.deepcopy(a)
    sa, sb = a.state_dict(), b.state_dict()
    m.load_state_dict({k: (1 - alpha) * sa[k] + alpha * sb[k] for k in sa})
    m.eval()
    with torch.no_grad():
        return float(fn(m, batch))


def test_matches_direct_evaluation_and_barrier_definitions():
    a, b = mlp(0), mlp(1)
    batch = data()
    res = probes.interpolate(a, b, ce, batch, steps=7, metric_fn=err)
    assert res.alphas.tolist() == pytest.approx([i / 6 for i in range(7)])
    for alpha, loss, met in zip(res.alphas.tolist(), res.losses.tolist(), res.metrics.tolist()):
        assert loss == pytest.approx(direct(a, b, alpha, ce, batch), abs=1e-12)
        assert met == pytest.approx(direct(a, b, alpha, err, batch), abs=1e-12)
    chord = (1 - res.alphas) * res.losses[0] + res.alphas * res.losses[-1]
    assert res.barrier == pytest.approx(float((res.losses - chord).max()), abs=1e-15)
    assert res.error_barrier == pytest.approx(
        float(res.metrics.max() - (res.metrics[0] + res.metrics[-1]) / 2)
    )
    assert set(res.to_dict()) >= {"alphas", "losses", "barrier", "error_barrier"}


def test_state_dicts_and_default_steps():
    a, b = mlp(0), mlp(1)
    batch = data()
    r1 = probes.interpolate(a, b.state_dict(), ce, batch)
    r2 = probes.interpolate(a.state_dict(), b.state_dict(), ce, batch, model=mlp(5))
    assert len(r1.alphas) == 30
    torch.testing.assert_close(r1.losses, r2.losses, rtol=0, atol=1e-14)
    with pytest.raises(TypeError, match="model="):
        probes.interpolate(a.state_dict(), b.state_dict(), ce, batch)
    with pytest.raises(ValueError, match="same architecture"):
        probes.interpolate(a, nn.Linear(3, 2).double().state_dict(), ce, batch)
    with pytest.raises(ValueError, match="steps"):
        probes.interpolate(a, b, ce, batch, steps=1)
    with pytest.raises(ValueError, match="bn"):
        probes.interpolate(a, b, ce, batch, bn="reset")


def test_convex_loss_has_no_barrier():
    torch.manual_seed(0)
    a, b = nn.Linear(3, 1).double(), nn.Linear(3, 1).double()
    x, y = torch.randn(64, 3, dtype=D), torch.randn(64, 1, dtype=D)

    def mse(m, batch):
        return nn.functional.mse_loss(m(batch[0]), batch[1])

    res = probes.interpolate(a, b, mse, (x, y))
    assert res.barrier <= 1e-12
    verdict = probes.basin_test(a, b, mse, (x, y))
    assert verdict.same_basin and verdict.verdict == "same basin"
    assert "loss barrier" in str(verdict)


class DoubleWell(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w], dtype=D))

    def forward(self, _):
        return ((self.w**2 - 1) ** 2).sum()


def test_double_well_is_two_basins():
    res = probes.basin_test(DoubleWell(-1.0), DoubleWell(1.0), lambda m, b: m(b), None, steps=31)
    assert not res.same_basin and res.verdict == "different basins"
    assert res.value == pytest.approx(1.0) and res.result.barrier_alpha == pytest.approx(0.5)
    near = probes.basin_test(DoubleWell(0.9), DoubleWell(1.1), lambda m, b: m(b), None)
    assert near.same_basin


class BNNet(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(3, 6)
        self.bn = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.fc(x))))


def reset_bn_reference(model, state, batches):
    m = copy.deepcopy(model)
    m.load_state_dict(state)
    m.bn.reset_running_stats()
    m.bn.momentum = None
    m.train()
    with torch.no_grad():
        for b in batches:
            m(b[0])
    m.eval()
    return m


def test_bn_recompute_matches_reset_running_stats():
    a, b = BNNet(0).double(), BNNet(1).double()
    batches = [data(1), data(2), data(3)]
    for m in (a, b):  # give the endpoints running statistics of their own
        m.train()
        with torch.no_grad():
            m(batches[0][0] * 3)
        m.eval()
    held = data(9)
    res = probes.interpolate(a, b, ce, held, steps=5, bn="recompute", bn_data=batches)
    carry = probes.interpolate(a, b, ce, held, steps=5)
    sa, sb = a.state_dict(), b.state_dict()
    for alpha, loss in zip(res.alphas.tolist(), res.losses.tolist()):
        mixed = {
            k: (1 - alpha) * sa[k] + alpha * sb[k] if v.is_floating_point() else v
            for k, v in sa.items()
        }
        ref = reset_bn_reference(a, mixed, batches)
        with torch.no_grad():
            assert loss == pytest.approx(float(ce(ref, held)), rel=1e-9)
    assert not torch.allclose(res.losses, carry.losses)
    assert res.bn == "recompute"


def test_bn_recompute_with_momentum_default():
    # momentum=0.1 (not None): the recovery r/m must still give the exact batch statistic
    a, b = BNNet(0).double(), BNNet(1).double()
    batch = data(4)
    res = probes.interpolate(a, b, ce, batch, steps=3, bn="recompute")
    ref = reset_bn_reference(a, a.state_dict(), [batch])
    assert res.losses[0].item() == pytest.approx(float(ce(ref, batch).detach()), rel=1e-9)


def test_progress_bar_runs():
    import tqdm  # noqa: F401 - installed with the test extra; fails loudly if missing

    a, b = mlp(0), mlp(1)
    res = probes.interpolate(a, b, ce, data(), steps=4, progress=True)
    assert res.losses.shape == (4,)
