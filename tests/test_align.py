"""probes.align: the aligned copy is the same function, a permuted copy aligns back exactly,
the models are left untouched, and what cannot be aligned says which module stops it."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sgdlens import probes
from sgdlens.probes._matching import apply_perms as _apply
from sgdlens.probes._matching import record_shapes as _shapes
from sgdlens.probes._perm import permutation_groups, trace
from sgdlens.probes.restore import same_bits
from tests._align_models import ARCHS, D, mlp

pytest.importorskip("scipy")  # the [align] extra, part of [test]


def pair(name, seed=0):
    """Two independently initialised models of one architecture, with BatchNorm statistics."""
    make, inp = ARCHS[name]
    torch.manual_seed(seed)
    a, b = make().to(D), make().to(D)
    for m in (a, b):
        m.train()
        with torch.no_grad():
            m(inp(torch.Generator().manual_seed(5)))
        m.eval()
    return a, b, inp(torch.Generator().manual_seed(1))


def snapshot(m):
    return {n: t.detach().clone() for n, t in list(m.named_parameters()) + list(m.named_buffers())}


def unchanged(m, snap):
    now = dict(list(m.named_parameters()) + list(m.named_buffers()))
    return all(same_bits(now[n].detach(), t) for n, t in snap.items())


def permuted(model, x, seed=3):
    """A copy of ``model`` with every permutation group shuffled at random."""
    gm = trace(model)
    _shapes(gm, (x,))
    groups, _ = permutation_groups(model, gm)
    g = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(grp.size, generator=g) for grp in groups]
    new = _apply(snapshot(model), groups, perms)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for n, t in list(out.named_parameters()) + list(out.named_buffers()):
            t.copy_(new[n])
    return out


def distance(a, b):
    return sum(
        float((p - q).detach().square().sum()) for p, q in zip(a.parameters(), b.parameters())
    )


@pytest.mark.parametrize("method", ["weights", "activations"])
@pytest.mark.parametrize("name", sorted(ARCHS))
def test_aligned_copy_is_the_same_function_and_models_are_untouched(name, method):
    a, b, x = pair(name)
    sa, sb = snapshot(a), snapshot(b)
    with torch.no_grad():
        want = b(x)
    c = probes.align(a, b, method=method, data=(x,))
    assert c is not b
    with torch.no_grad():
        torch.testing.assert_close(c(x), want, rtol=0, atol=1e-10)
    assert unchanged(a, sa) and unchanged(b, sb)
    assert not a.training and not b.training  # their flags as they were (eval, set above)
    assert distance(a, c) < distance(a, b)  # and it moved toward a


@pytest.mark.parametrize("method", ["weights", "activations"])
@pytest.mark.parametrize("name", sorted(ARCHS))
def test_permuted_copy_aligns_back_exactly(name, method):
    a, _, x = pair(name)
    p = permuted(a, x)
    with torch.no_grad():  # the shuffle is a symmetry: same function, other weights
        torch.testing.assert_close(p(x), a(x), rtol=0, atol=1e-10)
    assert distance(a, p) > 1.0
    back = probes.align(a, p, method=method, data=(x,))
    for (n, t), u in zip(a.named_parameters(), back.parameters()):
        assert torch.equal(t, u), n
    for (n, t), u in zip(a.named_buffers(), back.buffers()):
        assert torch.equal(t, u), n


def test_hand_permuted_mlp_round_trip_and_barrier():
    """An MLP permuted by hand (independently of the library's own groups): the barrier
    between the copies is large unaligned and 0 aligned, through interpolate and basin_test."""
    torch.manual_seed(0)
    a = mlp().to(D)
    b = copy.deepcopy(a)
    p1, p2 = torch.randperm(16), torch.randperm(16)
    with torch.no_grad():
        b[0].weight.copy_(a[0].weight[p1])
        b[0].bias.copy_(a[0].bias[p1])
        b[2].weight.copy_(a[2].weight[p2][:, p1])
        b[2].bias.copy_(a[2].bias[p2])
        b[4].weight.copy_(a[4].weight[:, p2])
    x = torch.randn(64, 4, dtype=D)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    plain = probes.interpolate(a, b, loss_fn, (x, y), steps=11)
    aligned = probes.interpolate(a, b, loss_fn, (x, y), steps=11, align=True)
    assert plain.barrier > 0.01
    assert abs(aligned.barrier) <= 1e-6
    assert float((aligned.losses - aligned.losses[0]).abs().max()) <= 1e-12
    acts = probes.interpolate(a, b, loss_fn, (x, y), steps=11, align="activations")
    assert abs(acts.barrier) <= 1e-6
    assert probes.basin_test(a, b, loss_fn, (x, y), align=True).value <= 1e-6
    # state dicts, evaluated by model=, align too
    sd = probes.interpolate(
        a.state_dict(), b.state_dict(), loss_fn, (x, y), steps=5, model=mlp().to(D), align=True
    )
    assert abs(sd.barrier) <= 1e-6


def test_landscape_plane_with_alignment():
    make, _ = ARCHS["mlp"]
    torch.manual_seed(0)
    a, b, c = (make().to(D) for _ in range(3))
    x = torch.randn(32, 4, dtype=D)
    y = torch.randint(0, 3, (32,))

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    plain = probes.landscape_plane(a, b, c, loss_fn, (x, y), steps=3)
    aligned = probes.landscape_plane(a, b, c, loss_fn, (x, y), steps=3, align=True)
    assert aligned.points["b"][0] < plain.points["b"][0]  # |b' - a| < |b - a|
    assert aligned.points["a"] == plain.points["a"] == (0.0, 0.0)


@settings(max_examples=10)
@given(widths=st.lists(st.integers(2, 24), min_size=1, max_size=3), seed=st.integers(0, 99))
def test_any_permutation_of_an_mlp_is_undone(widths, seed):
    torch.manual_seed(seed)
    sizes = [5, *widths, 3]
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.Tanh()]
    a = nn.Sequential(*layers[:-1]).to(D)
    x = torch.randn(8, 5, dtype=D)
    p = permuted(a, x, seed=seed)
    back = probes.align(a, p)
    assert all(torch.equal(t, u) for t, u in zip(a.parameters(), back.parameters()))


# ----------------------------------------------------------------------------- refusals


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(16, 2)

    def forward(self, x):
        return self.out(torch.cat([self.a(x), self.b(x)], dim=1))


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.out = nn.GRU(4, 8, batch_first=True), nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.rnn(x)[0])


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else x


@pytest.mark.parametrize(
    ("model", "pattern"),
    [
        (Concat(), r"'cat'"),
        (Recurrent(), r"module 'rnn' \(GRU\)"),
        (Branchy(), r"torch.fx cannot trace Branchy"),
        (
            nn.Sequential(
                nn.Conv2d(4, 8, 3, groups=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)
            ),
            r"module '0' \(Conv2d\) is a grouped convolution \(groups=2\)",
        ),
    ],
)
def test_unsupported_models_name_the_module(model, pattern):
    with pytest.raises(ValueError, match=pattern):
        probes.align(model, copy.deepcopy(model))


def test_models_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match=r"'0.bias' is \(16,\) in a and \(8,\) in b"):
        probes.align(
            mlp(),
            nn.Sequential(
                nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)
            ),
        )
    with pytest.raises(ValueError, match="one architecture"):
        probes.align(mlp(), nn.Linear(4, 3))


def test_parametrized_weights_are_refused():
    from torch.nn.utils import parametrizations

    a = mlp()
    parametrizations.weight_norm(a[0])
    with pytest.raises(ValueError, match=r"0\.weight is computed, not stored"):
        probes.align(a, copy.deepcopy(a))


def test_bad_arguments():
    a, b = mlp(), mlp()
    with pytest.raises(ValueError, match="method must be"):
        probes.align(a, b, method="sinkhorn")
    with pytest.raises(ValueError, match="needs data="):
        probes.align(a, b, method="activations")
    with pytest.raises(TypeError, match=r"b must be a torch\.nn\.Module"):
        probes.align(a, b.state_dict())
    with pytest.raises(ValueError, match="align must be"):
        probes.interpolate(a, b, lambda m, bt: m(bt).sum(), torch.zeros(2, 4), align="yes")


def test_missing_scipy_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # import fails
    with pytest.raises(ImportError, match=r'pip install "sgdlens\[align\]"'):
        probes.align(mlp(), mlp())
