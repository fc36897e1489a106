"""Curvature probes against float64 closed forms and dense Hessians."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sgdlens import probes
from sgdlens.probes.sharpness import adam_preconditioner

D = torch.float64


def mse(m, b):
    return (m(b[0]).squeeze(-1) - b[1]).square().mean()


def lsq(n=40, p=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=D)
    y = torch.randn(n, generator=g, dtype=D)
    model = nn.Linear(p, 1, bias=False).to(D)
    return model, x, y


class Quadratic(nn.Module):
    """loss = ½ θᵀAθ + bᵀθ; the Hessian is A."""

    def __init__(self, A, b):
        super().__init__()
        self.theta = nn.Parameter(torch.randn(A.shape[0], dtype=D))
        self.register_buffer("A", A)
        self.register_buffer("b", b)

    def forward(self, _):
        return 0.5 * self.theta @ self.A @ self.theta + self.b @ self.theta


def quad_loss(m, batch):
    return m(batch)


def sym(n, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=D)
    return (M + M.T) / 2 + shift * torch.eye(n, dtype=D)


def small_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(D)


def dense_hessian(model, loss_fn, batch):
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for _, p in model.named_parameters()]
    shapes = [p.shape for p in params]
    flat = torch.cat([p.reshape(-1) for p in params])

    def f(v):
        ps, i = {}, 0
        for n, s in zip(names, shapes):
            k = math.prod(s)
            ps[n] = v[i : i + k].reshape(s)
            i += k
        return loss_fn(_Call(model, ps), batch)

    return torch.autograd.functional.hessian(f, flat)


class _Call:
    def __init__(self, model, ps):
        self.model, self.ps = model, ps

    def __call__(self, x):
        return torch.func.functional_call(self.model, self.ps, (x,))


def mlp_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(20, 3, generator=g, dtype=D), torch.randn(20, 2, generator=g, dtype=D)


def mlp_loss(m, b):
    return (m(b[0]) - b[1]).square().mean()


def test_hvp_least_squares_exact():
    model, x, y = lsq()
    H = 2 * x.T @ x / x.shape[0]
    v = torch.randn(5, dtype=D)
    out = probes.hvp(model, mse, (x, y), v)
    assert out.method == "double-backward"
    torch.testing.assert_close(out.value, H @ v, rtol=1e-12, atol=1e-12)
    d = probes.hvp(model, mse, (x, y), {"weight": v.reshape(1, 5)})
    torch.testing.assert_close(d.value["weight"].reshape(-1), H @ v, rtol=1e-12, atol=1e-12)


def test_hvp_averages_batches_equally():
    model, x, y = lsq(n=30)
    b1, b2 = (x[:10], y[:10]), (x[10:], y[10:])  # unequal sizes: per-batch weights are equal
    H = (2 * b1[0].T @ b1[0] / 10 + 2 * b2[0].T @ b2[0] / 20) / 2
    v = torch.randn(5, dtype=D)
    out = probes.hvp(model, mse, [b1, b2], v)
    torch.testing.assert_close(out.value, H @ v, rtol=1e-12, atol=1e-12)


def test_hvp_quadratic_and_fd():
    A = sym(6, 0)
    model = Quadratic(A, torch.randn(6, dtype=D))
    v = torch.randn(6, dtype=D)
    torch.testing.assert_close(probes.hvp(model, quad_loss, None, v).value, A @ v)
    fd = probes.hvp(model, quad_loss, None, v, method="fd")
    assert fd.method == "finite-difference" and fd.fd_step is not None
    torch.testing.assert_close(fd.value, A @ v, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_lanczos_quadratic_indefinite(which):
    A = sym(12, 3)
    model = Quadratic(A, torch.zeros(12, dtype=D))
    ev = torch.linalg.eigvalsh(A)
    want = {"LA": ev.flip(0), "SA": ev, "LM": ev[ev.abs().argsort(descending=True)]}[which]
    res = probes.sharpness(
        model,
        quad_loss,
        None,
        k=3,
        which=which,
        tol=1e-10,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(res.eigenvalues, want[:3], rtol=1e-8, atol=1e-10)
    assert res.converged and res.hvps <= 12


def test_lanczos_repeated_eigenvalues():
    A = torch.diag(torch.tensor([5.0, 5.0, 5.0, 1.0, 0.5, 0.1], dtype=D))
    model = Quadratic(A, torch.zeros(6, dtype=D))
    res = probes.sharpness(model, quad_loss, None, k=3, tol=1e-10)
    torch.testing.assert_close(res.eigenvalues, torch.full((3,), 5.0, dtype=D))


def test_lanczos_and_trace_match_dense_hessian_of_mlp():
    model = small_mlp()
    batch = mlp_batch()
    H = dense_hessian(model, mlp_loss, batch)
    ev = torch.linalg.eigvalsh(H)
    n = H.shape[0]
    res = probes.sharpness(
        model,
        mlp_loss,
        batch,
        k=3,
        tol=1e-9,
        return_vectors=True,
        generator=torch.Generator().manual_seed(1),
    )
    rel = ((res.eigenvalues - ev.flip(0)[:3]).abs() / ev.abs().max()).max()
    assert rel < 1e-6, (res.eigenvalues, ev.flip(0)[:3])
    # eigenvector property: H y = λ y
    y = res.eigenvectors[0]
    torch.testing.assert_close(H @ y, res.value * y, rtol=1e-5, atol=1e-6)
    assert set(res.vector(0)) == {n for n, _ in model.named_parameters()}
    # smallest (negative curvature away from a minimum)
    low = probes.sharpness(model, mlp_loss, batch, k=2, which="SA", tol=1e-9)
    assert ((low.eigenvalues - ev[:2]).abs() / ev.abs().max()).max() < 1e-6
    # Hutch++ with a budget covering the space is exact
    tr = probes.hessian_trace(
        model,
        mlp_loss,
        batch,
        method="hutch++",
        samples=3 * n + 3,
        generator=torch.Generator().manual_seed(0),
    )
    assert abs(tr.trace - float(torch.trace(H))) / float(H.diagonal().abs().sum()) < 1e-6
    # Hutchinson is unbiased within its standard error
    hu = probes.hessian_trace(
        model, mlp_loss, batch, samples=200, generator=torch.Generator().manual_seed(0)
    )
    assert hu.stderr > 0 and hu.hvps == 200 and hu.method == "hutchinson"
    assert abs(hu.trace - float(torch.trace(H))) < 4 * hu.stderr


def test_hutchinson_stderr_is_calibrated():
    A = sym(30, 5)
    model = Quadratic(A, torch.zeros(30, dtype=D))
    exact = float(torch.trace(A))
    z = []
    for s in range(20):
        r = probes.hessian_trace(
            model, quad_loss, None, samples=20, generator=torch.Generator().manual_seed(s)
        )
        z.append((r.trace - exact) / r.stderr)
    zt = torch.tensor(z)
    assert zt.abs().max() < 5 and 0.4 < zt.std() < 2.0


def test_power_iteration_is_largest_magnitude():
    A = torch.diag(torch.tensor([-6.0, 3.0, 1.0, 0.5], dtype=D))
    model = Quadratic(A, torch.zeros(4, dtype=D))
    p = probes.sharpness(model, quad_loss, None, algorithm="power", tol=1e-10, max_iter=500)
    assert p.algorithm == "power" and abs(p.value + 6.0) < 1e-6
    la = probes.sharpness(model, quad_loss, None, tol=1e-10)
    assert abs(la.value - 3.0) < 1e-9


def test_warm_start_converges_immediately():
    model, x, y = lsq()
    first = probes.sharpness(model, mse, (x, y), tol=1e-8, return_vectors=True)
    again = probes.sharpness(model, mse, (x, y), tol=1e-6, v0=first.vector(0))
    assert again.hvps <= 2


# --------------------------------------------------------------------- fallbacks


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        h, _ = self.att(x, x, x, need_weights=False)
        return self.out(torch.tanh(h)).mean(dim=1).squeeze(-1)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 2e-2)])
def test_fd_fallback_matches_math_kernel_on_attention(dtype, tol):
    torch.manual_seed(0)
    model = Attn().to(dtype)
    x, y = torch.randn(4, 6, 8, dtype=dtype), torch.randn(4, dtype=dtype)
    n = sum(p.numel() for p in model.parameters())
    v = torch.randn(n, dtype=dtype)
    auto = probes.hvp(model, mse, (x, y), v)
    # the fused CPU kernel has no double backward: retried under the math kernel
    assert auto.method in ("double-backward (math sdpa)", "double-backward")
    if auto.method != "double-backward":
        assert auto.fallback_reason
    fd = probes.hvp(model, mse, (x, y), v, method="fd")
    assert fd.method == "finite-difference"
    err = (fd.value - auto.value).norm() / auto.value.norm()
    assert err < tol, err
    s = probes.sharpness(
        model, mse, (x, y), method="fd", tol=1e-4, generator=torch.Generator().manual_seed(0)
    )
    e = probes.sharpness(model, mse, (x, y), tol=1e-4, generator=torch.Generator().manual_seed(0))
    assert abs(s.value - e.value) / abs(e.value) < tol * 5


class _Deriv(torch.autograd.Function):
    """tanh'(x) * g, whose own derivative is missing (as for a fused kernel)."""

    @staticmethod
    def forward(ctx, x, g):
        return g * (1 - torch.tanh(x) ** 2)

    @staticmethod
    def backward(ctx, gg):
        raise RuntimeError("derivative for fused_tanh_backward is not implemented")


class _Tanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _Deriv.apply(x, g)


class NoDouble(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 1)

    def forward(self, x):
        return self.b(_Tanh.apply(self.a(x)))


def test_auto_falls_back_to_finite_differences():
    torch.manual_seed(0)
    model = NoDouble().to(D)
    ref = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(D)
    ref[0].load_state_dict(model.a.state_dict())
    ref[2].load_state_dict(model.b.state_dict())
    x, y = torch.randn(16, 3, dtype=D), torch.randn(16, dtype=D)
    v = torch.randn(21, dtype=D)
    out = probes.hvp(model, mse, (x, y), v)
    assert out.method == "finite-difference" and out.fallback_reason
    want = probes.hvp(ref, mse, (x, y), v).value
    torch.testing.assert_close(out.value, want, rtol=1e-6, atol=1e-8)
    with pytest.raises(RuntimeError, match="method='exact'"):
        probes.hvp(model, mse, (x, y), v, method="exact")


# --------------------------------------------------------------------- EoS


def test_eos_thresholds():
    p = [nn.Parameter(torch.zeros(1))]
    assert probes.eos_threshold(torch.optim.SGD(p, lr=0.1)) == pytest.approx(20.0)
    assert probes.eos_threshold(torch.optim.SGD(p, lr=0.1, momentum=0.9)) == pytest.approx(38.0)
    nes = torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True)
    assert probes.eos_threshold(nes) == pytest.approx(3.8 / (2.8 * 0.1))
    assert probes.eos_threshold(torch.optim.Adam(p, lr=0.01)) == pytest.approx(3800.0)
    assert probes.eos_threshold(torch.optim.AdamW(p, lr=0.01, betas=(0.5, 0.9))) == (
        pytest.approx(3 / (0.5 * 0.01))
    )
    assert probes.eos_ratio(10.0, torch.optim.SGD(p, lr=0.1)) == pytest.approx(0.5)
    with pytest.raises(TypeError, match="RMSprop"):
        probes.eos_threshold(torch.optim.RMSprop(p))


@settings(max_examples=12)
@given(
    lr=st.floats(0.01, 1.0),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    nesterov=st.booleans(),
    side=st.sampled_from([0.97, 1.03]),
)
def test_thresholds_are_the_stability_boundary(lr, momentum, nesterov, side):
    nesterov = nesterov and momentum > 0
    w = nn.Parameter(torch.ones(1, dtype=D))
    opt = torch.optim.SGD([w], lr=lr, momentum=momentum, nesterov=nesterov)
    lam = side * probes.eos_threshold(opt)
    for _ in range(2000):
        opt.zero_grad()
        (0.5 * lam * w.square()).sum().backward()
        opt.step()
    stable = float(w.detach().abs()) < 1.0
    assert stable == (side < 1)


def test_adam_preconditioned_sharpness_matches_dense():
    model = small_mlp(2)
    batch = mlp_batch(3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        mlp_loss(model, batch).backward()
        opt.step()
    opt.zero_grad()
    H = dense_hessian(model, mlp_loss, batch)
    P = adam_preconditioner(model, opt)
    d = torch.cat([P[n].reshape(-1) for n, _ in model.named_parameters()]).rsqrt()
    ev = torch.linalg.eigvalsh(d[:, None] * H * d[None, :])
    res = probes.sharpness(model, mlp_loss, batch, preconditioner=opt, tol=1e-9)
    assert res.preconditioned
    assert abs(res.value - float(ev[-1])) / float(ev.abs().max()) < 1e-6
    assert probes.eos_ratio(res, opt) == pytest.approx(res.value / probes.eos_threshold(opt))
    plain = probes.sharpness(model, mlp_loss, batch)
    with pytest.raises(ValueError, match="preconditioner=optimizer"):
        probes.eos_ratio(plain, opt)


def test_sgd_weight_decay_adds_to_curvature():
    p = [nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD(p, lr=0.1, weight_decay=0.5)
    assert probes.eos_ratio(9.5, opt) == pytest.approx(0.5)


def test_differing_groups_need_group_argument():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.2}])
    with pytest.raises(ValueError, match="group="):
        probes.eos_threshold(opt)
    assert probes.eos_threshold(opt, group=1) == pytest.approx(10.0)


def test_argument_validation():
    model, x, y = lsq()
    with pytest.raises(ValueError, match="k must be"):
        probes.sharpness(model, mse, (x, y), k=0)
    with pytest.raises(ValueError, match="which"):
        probes.sharpness(model, mse, (x, y), which="largest")
    with pytest.raises(ValueError, match="method"):
        probes.hvp(model, mse, (x, y), torch.zeros(5, dtype=D), method="magic")
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        probes.hvp(model, mse, (x, y), torch.zeros(4, dtype=D))
    with pytest.raises(TypeError, match="loss_fn"):
        probes.sharpness(model, "mse", (x, y))
    with pytest.raises(TypeError, match="scalar tensor"):
        probes.sharpness(model, lambda m, b: 1.0, (x, y))
    with pytest.raises(ValueError, match="samples"):
        probes.hessian_trace(model, mse, (x, y), method="hutch++", samples=2)
    with pytest.raises(ValueError, match="mode"):
        probes.sharpness(model, mse, (x, y), mode="training")
    with pytest.raises(ValueError, match="step"):
        probes.sharpness(model, mse, (x, y), preconditioner=torch.optim.Adam(model.parameters()))
