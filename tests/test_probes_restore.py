"""The restore guarantee: bit-for-bit state after every probe, on return and on exception."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from sgdlens import probes
from sgdlens.probes.restore import same_bits


class Net(nn.Module):
    """BatchNorm, Dropout, tied weights, a frozen parameter and mixed train/eval flags."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(4, 6, bias=False)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.3)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 4, bias=False)  # unused: its Hessian block is zero
        self.dec = nn.Linear(6, 6)
        self.dec.weight = self.mid.weight  # tied (same Parameter twice)
        self.frozen = nn.Parameter(torch.ones(6), requires_grad=False)

    def forward(self, x):
        h = self.drop(torch.relu(self.bn(self.emb(x))))
        h = torch.tanh(self.mid(h)) * self.frozen
        return self.dec(h).sum(-1)


def make():
    torch.manual_seed(0)
    net = Net().double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    net.train()
    for _ in range(2):
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
    net.drop.eval()  # mixed flags
    net.emb.weight.grad = None  # a None grad next to filled ones
    return net, opt, (x, y)


def snapshot(net, opt):
    return {
        "params": [
            (n, p.detach().clone(), p) for n, p in net.named_parameters(remove_duplicate=False)
        ],
        "grads": [
            (n, None if p.grad is None else p.grad.clone(), p.grad)
            for n, p in net.named_parameters(remove_duplicate=False)
        ],
        "buffers": [(n, b.clone(), b) for n, b in net.named_buffers()],
        "training": [m.training for m in net.modules()],
        "requires_grad": [p.requires_grad for p in net.parameters()],
        "rng": torch.get_rng_state().clone(),
        "py": random.getstate(),
        "np": np.random.get_state()[1].copy(),
        "opt_state": {
            id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
            for p, s in opt.state.items()
        },
        "opt_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
    }


def assert_same(before, net, opt):
    after = dict(net.named_parameters(remove_duplicate=False))
    for n, val, obj in before["params"]:
        assert after[n] is obj, n
        assert same_bits(obj.detach(), val), n
    for (n, val, obj), (_, p) in zip(before["grads"], net.named_parameters(remove_duplicate=False)):
        if val is None:
            assert p.grad is None, n
        else:
            assert p.grad is obj and same_bits(p.grad, val), n
    bufs = dict(net.named_buffers())
    for n, val, obj in before["buffers"]:
        assert bufs[n] is obj and same_bits(obj, val), n
    assert [m.training for m in net.modules()] == before["training"]
    assert [p.requires_grad for p in net.parameters()] == before["requires_grad"]
    assert torch.equal(torch.get_rng_state(), before["rng"])
    assert random.getstate() == before["py"]
    assert np.array_equal(np.random.get_state()[1], before["np"])
    for p, s in opt.state.items():
        for k, v in s.items():
            ref = before["opt_state"][id(p)][k]
            assert same_bits(v, ref) if torch.is_tensor(v) else v == ref
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == (
        before["opt_groups"]
    )


def loss_fn(m, b):
    return ((m(b[0]) - b[1]) ** 2).mean()


class Boom(Exception):
    pass


def raising_on(call):
    count = {"n": 0}

    def fn(m, b):
        count["n"] += 1
        out = loss_fn(m, b)
        if count["n"] == call:
            raise Boom(f"injected on call {call}")
        return out

    return fn


def other(net, seed=1):
    """Another net of the same architecture: alignment permutes it (tied weights included).
    Built under fork_rng: the global RNG the checks compare is the probe's to keep."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Net().double().eval()


PROBES = {
    "hvp": lambda net, fn, data: probes.hvp(
        net,
        fn,
        data,
        {n: torch.ones_like(p) for n, p in net.named_parameters() if p.requires_grad},
        mode="train",
    ),
    "hvp_fd": lambda net, fn, data: probes.hvp(
        net,
        fn,
        data,
        {n: torch.ones_like(p) for n, p in net.named_parameters() if p.requires_grad},
        method="fd",
    ),
    "sharpness": lambda net, fn, data: probes.sharpness(
        net, fn, data, k=2, max_iter=8, mode="train"
    ),
    "trace": lambda net, fn, data: probes.hessian_trace(net, fn, data, samples=4),
    "hutch++": lambda net, fn, data: probes.hessian_trace(
        net, fn, data, samples=6, method="hutch++"
    ),
    "interpolate": lambda net, fn, data: probes.interpolate(
        net, {k: v + 0.1 for k, v in net.state_dict().items()}, fn, data, steps=5, bn="recompute"
    ),
    "interpolate_align": lambda net, fn, data: probes.interpolate(
        net, other(net), fn, data, steps=3, align=True
    ),
    "interpolate_align_activations": lambda net, fn, data: probes.interpolate(
        net, other(net), fn, data, steps=3, align="activations"
    ),
    "plane_align": lambda net, fn, data: probes.landscape_plane(
        net, other(net), other(net, 2), fn, data, steps=2, align=True
    ),
    "landscape_1d": lambda net, fn, data: probes.landscape_1d(net, fn, data, steps=5),
    "landscape_1d_train": lambda net, fn, data: probes.landscape_1d(
        net, fn, data, steps=5, mode="train", bn="recompute"
    ),
    "landscape_2d": lambda net, fn, data: probes.landscape_2d(net, fn, data, steps=3),
    "flatness": lambda net, fn, data: probes.flatness(net, fn, data, directions=2),
}


@pytest.mark.parametrize("name", sorted(PROBES))
def test_probe_restores_on_return(name):
    net, opt, data = make()
    before = snapshot(net, opt)
    PROBES[name](net, loss_fn, [data, data])
    assert_same(before, net, opt)


@pytest.mark.parametrize("name", sorted(PROBES))
def test_probe_restores_on_exception(name):
    net, opt, data = make()
    before = snapshot(net, opt)
    with pytest.raises(Boom):
        PROBES[name](net, raising_on(3), [data, data, data])
    assert_same(before, net, opt)


def test_preserved_undoes_everything_a_block_does():
    net, opt, (x, y) = make()
    before = snapshot(net, opt)
    with pytest.raises(Boom), probes.preserved(net, opt):
        net.train()
        opt.zero_grad(set_to_none=False)
        loss_fn(net, (x, y)).backward()  # BN stats move, dropout draws, grads change
        opt.step()  # weights and momentum change
        opt.param_groups[0]["lr"] = 5.0
        net.emb.weight.grad = torch.ones_like(net.emb.weight)  # None -> tensor
        net.mid.weight.grad = None  # tensor -> None
        net.frozen.requires_grad_(True)
        net.bn.running_mean.data = torch.zeros(6, dtype=torch.float64)  # storage swap
        net.head.weight = nn.Parameter(torch.zeros(4, 6, dtype=torch.float64))  # object swap
        random.random()
        np.random.rand()
        torch.rand(3)
        raise Boom
    assert_same(before, net, opt)


def test_preserved_leaves_unchanged_tensors_unwritten():
    net, _, (x, y) = make()
    versions = [p._version for p in net.parameters()]
    with probes.preserved(net):
        probes.sharpness(net, loss_fn, (x, y), max_iter=3)
    assert [p._version for p in net.parameters()] == versions


def test_preserved_validates():
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"), probes.preserved({"w": 1}):
        pass
    with pytest.raises(TypeError, match="Optimizer"), probes.preserved(nn.Linear(1, 1), object()):
        pass
