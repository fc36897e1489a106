"""Filter-normalised slices, planes, trajectories and flatness."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sgdlens import probes

D = torch.float64


def relu_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    ).to(D)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, 4, generator=g, dtype=D), torch.randint(0, 3, (64,), generator=g)


def ce(m, b):
    return nn.functional.cross_entropy(m(b[0]), b[1])


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_filter_normalisation_matches_li_et_al():
    m = relu_mlp()
    conv = nn.Conv2d(3, 5, 3).double()
    for model in (m, conv):
        d = probes.random_direction(model, generator=gen())
        for n, p in model.named_parameters():
            if p.dim() <= 1:
                assert float(d[n].abs().sum()) == 0.0
            else:
                torch.testing.assert_close(d[n].flatten(1).norm(dim=1), p.flatten(1).norm(dim=1))
    d = probes.random_direction(m, generator=gen(), ignore=None)
    torch.testing.assert_close(d["0.bias"], m[0].bias.detach())


@settings(max_examples=10)
@given(c=st.floats(0.05, 20.0), layer=st.sampled_from([0, 2]), vmap=st.booleans())
def test_1d_curve_invariant_to_relu_rescaling(c, layer, vmap):
    m = relu_mlp()
    s = copy.deepcopy(m)
    with torch.no_grad():
        s[layer].weight.mul_(c)
        s[layer].bias.mul_(c)
        s[layer + 2].weight.div_(c)
    b = batch()
    r1 = probes.landscape_1d(m, ce, b, steps=9, generator=gen(), vmap=vmap)
    r2 = probes.landscape_1d(s, ce, b, steps=9, generator=gen(), vmap=vmap)
    assert (r1.losses - r2.losses).abs().max() < 1e-12
    if c > 2:  # an unnormalised direction sees the rescaling
        u1 = probes.landscape_1d(m, ce, b, steps=9, generator=gen(), norm="none")
        u2 = probes.landscape_1d(s, ce, b, steps=9, generator=gen(), norm="none")
        assert (u1.losses - u2.losses).abs().max() > 1e-3


def point_loss(model, d1, d2, x, y, b):
    m = copy.deepcopy(model).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.add_(x * d1.get(n, torch.zeros_like(p)) + y * d2.get(n, torch.zeros_like(p)))
        return float(ce(m, b))


def test_2d_grid_matches_direct_evaluation_vmapped_and_looped():
    m = relu_mlp()
    b = batch()
    v = probes.landscape_2d(
        m, ce, b, steps=(5, 4), span=0.5, generator=gen(), chunk_size=7, vmap=True
    )
    lp = probes.landscape_2d(m, ce, b, steps=(5, 4), span=0.5, generator=gen(), vmap=False)
    auto = probes.landscape_2d(m, ce, b, steps=(5, 4), span=0.5, generator=gen(), chunk_size=3)
    assert v.vmapped and not lp.vmapped and v.losses.shape == (5, 4)
    torch.testing.assert_close(v.losses, lp.losses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(auto.losses, lp.losses, rtol=1e-12, atol=1e-12)
    d1, d2 = v.directions
    for i, j in [(0, 0), (4, 3), (2, 1)]:
        want = point_loss(m, d1, d2, float(v.xs[i]), float(v.ys[j]), b)
        assert float(v.losses[i, j]) == pytest.approx(want, abs=1e-12)
    # the middle of an odd grid is the model itself
    assert float(v.losses[2, 0 if False else 1]) == pytest.approx(
        point_loss(m, d1, d2, 0.0, float(v.ys[1]), b), abs=1e-12
    )


def test_loss_fn_that_does_not_vmap_falls_back_to_loop():
    m = relu_mlp()
    b = batch()

    def branchy(model, bb):
        loss = ce(model, bb)
        if loss.item() > 1e9:  # .item(): not vmappable
            raise AssertionError
        return loss

    r = probes.landscape_1d(m, branchy, b, steps=5, generator=gen(), vmap=True)
    ref = probes.landscape_1d(m, ce, b, steps=5, generator=gen())
    assert not r.vmapped
    torch.testing.assert_close(r.losses, ref.losses, rtol=1e-12, atol=1e-12)


def test_plane_through_three_models():
    a, b, c = relu_mlp(0), relu_mlp(1), relu_mlp(2)
    data = batch()
    surf = probes.landscape_plane(a, b, c, ce, data, steps=(3, 2), margin=0.0)
    (ax, ay), (bx, by), (cx, cy) = surf.points["a"], surf.points["b"], surf.points["c"]
    assert (ax, ay, by) == (0.0, 0.0, 0.0) and bx > 0 and cy > 0
    with torch.no_grad():
        assert float(surf.losses[0, 0]) == pytest.approx(float(ce(a.eval(), data)), abs=1e-12)
        if 0 <= cx <= bx:
            assert float(surf.losses[-1, 0]) == pytest.approx(float(ce(b.eval(), data)), abs=1e-12)
    d1, d2 = surf.directions
    for n, p in c.named_parameters():  # c is reconstructed from its plane coordinates
        rebuilt = dict(a.named_parameters())[n] + cx * d1[n] + cy * d2[n]
        torch.testing.assert_close(rebuilt, p, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="collinear"):
        probes.landscape_plane(a, b, a, ce, data, steps=3)


def test_trajectory_plane_projects_the_path():
    m = relu_mlp()
    data = batch()
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    states = []
    for _ in range(8):
        opt.zero_grad()
        ce(m, data).backward()
        opt.step()
        states.append({k: v.clone() for k, v in m.state_dict().items()})
    surf = probes.landscape_trajectory(states, ce, data, model=m, steps=5)
    assert surf.trajectory.shape == (8, 2)
    torch.testing.assert_close(surf.trajectory[-1], torch.zeros(2, dtype=D))
    assert 0.5 < float(surf.explained_variance.sum()) <= 1.0 + 1e-12
    x0, y0 = surf.trajectory[0].tolist()
    assert float(surf.xs.min()) <= x0 <= float(surf.xs.max())
    assert float(surf.ys.min()) <= y0 <= float(surf.ys.max())
    with pytest.raises(ValueError, match="at least 3"):
        probes.landscape_trajectory(states[:2], ce, data, model=m)


def test_flatness_matches_quadratic_closed_form():
    torch.manual_seed(0)
    model = nn.Linear(5, 1, bias=False).double()
    x, y = torch.randn(64, 5, dtype=D), torch.randn(64, 1, dtype=D)
    with torch.no_grad():  # move to the least-squares minimum
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T)

    def mse(m, b):
        return nn.functional.mse_loss(m(b[0]), b[1])

    eps = 0.05
    res = probes.flatness(
        model, mse, (x, y), epsilon=eps, directions=3, generator=gen(3), rtol=1e-3
    )
    g = gen(3)
    for r in res.radii.tolist():
        d = probes.random_direction(model, generator=g)["weight"].reshape(-1)
        curv = float(d @ (x.T @ x / 64) @ d)
        assert r == pytest.approx(math.sqrt(eps / curv), rel=2e-3)
    assert res.evaluations > 3 and res.radius > 0
    flat = probes.flatness(model, lambda m, b: mse(m, b) * 0, (x, y), directions=2)
    assert math.isinf(flat.radius)


def test_validation_messages():
    m = relu_mlp()
    b = batch()
    with pytest.raises(ValueError, match="span"):
        probes.landscape_1d(m, ce, b, span=-1.0)
    with pytest.raises(ValueError, match="norm"):
        probes.landscape_1d(m, ce, b, norm="unit")
    with pytest.raises(TypeError, match="generator"):
        probes.landscape_1d(m, ce, b, generator=0)
    with pytest.raises(ValueError, match="direction"):
        probes.landscape_1d(m, ce, b, direction={"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="epsilon"):
        probes.flatness(m, ce, b, epsilon=0)
    with pytest.raises(ValueError, match="no batches"):
        probes.landscape_1d(m, ce, [])
