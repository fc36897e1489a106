"""Hypothesis properties of the gradient SNR, and the functional maths against a reference."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from sgdlens import PhaseMonitor, lenses
from sgdlens.lenses.grad_snr import gradient_snr, snr_from_moments
from tests._reference import window_snr

seeds = st.integers(0, 2**31 - 1)


def run(grad_seq, lens, log_every):
    p = nn.Parameter(torch.zeros(grad_seq.shape[1:], dtype=grad_seq.dtype))
    opt = torch.optim.SGD([p], lr=0.0)
    with PhaseMonitor(opt, lenses=[lens], log_every=log_every) as mon:
        for g in grad_seq:
            p.grad = g.clone()
            opt.step()
    return mon.history.records[-1]


@given(seed=seeds, k=st.integers(2, 12), d=st.integers(1, 20), c=st.floats(1e-3, 1e3))
def test_snr_is_invariant_to_scaling_all_gradients(seed, k, d, c):
    g = torch.randn(k, d, generator=torch.Generator().manual_seed(seed)) + 0.3
    for lens in (lenses.GradSNR(window=k), lenses.GradSNR(decay=0.9)):
        a = run(g, lens, k)["grad_snr"]
        b = run(g * c, lens, k)["grad_snr"]
        # float32 running sums: tr Var = E‖g‖² − ‖E g‖² loses about 1e-7·SNR² of relative
        # accuracy to cancellation (documented in docs/lenses/grad_snr.md)
        assert math.isclose(a, b, rel_tol=1e-4 + 1e-7 * a * a), (a, b)


@given(
    g=st.lists(st.floats(-1e3, 1e3).filter(lambda v: abs(v) > 1e-3), min_size=1, max_size=8),
    k=st.integers(2, 10),
)
def test_identical_gradients_give_large_or_infinite_snr_never_nan(g, k):
    seq = torch.tensor([g] * k)
    for lens in (lenses.GradSNR(window=k), lenses.GradSNR(decay=0.9)):
        snr = run(seq, lens, k)["grad_snr"]
        assert not math.isnan(snr)
        assert snr > 1e3


@given(seed=seeds, snr=st.floats(0.5, 4.0), d=st.integers(4, 16))
def test_window_and_ema_agree_on_stationary_gaussian_streams(seed, snr, d):
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(d, generator=gen, dtype=torch.float64)
    mu *= snr * math.sqrt(d) / mu.norm()  # sigma = 1, so the true SNR is ‖μ‖/√d = snr
    n = 2000
    seq = mu + torch.randn(n, d, generator=gen, dtype=torch.float64)
    window = run(seq, lenses.GradSNR(window=n), n)["grad_snr"]
    ema = run(seq, lenses.GradSNR(decay=1 - 1 / 500), n)["grad_snr"]
    # sampling error: ≈ 1/sqrt(K) on the mean and sqrt(2/(K d)) on the std; the EMA's
    # effective sample is about 1000 steps, so 15 % is several standard errors
    assert math.isclose(window, snr, rel_tol=0.1), (window, snr)
    assert math.isclose(ema, window, rel_tol=0.15), (ema, window)


@given(seed=seeds, k=st.integers(1, 6), d=st.integers(1, 6))
def test_functional_forms_match_the_python_reference(seed, k, d):
    g = torch.randn(k, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref = window_snr([row for row in g])
    mean, std, _ = gradient_snr(g)
    assert math.isclose(float(mean), ref[0], rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(float(std), ref[1], rel_tol=1e-9, abs_tol=1e-12)
    m2 = g.mean(0).square().sum()
    mean2, std2, _ = snr_from_moments(m2, g.square().sum(1).mean())
    assert math.isclose(float(mean2), ref[0], rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(float(std2), ref[1], rel_tol=1e-6, abs_tol=1e-7)


@given(
    seed=seeds,
    sizes=st.lists(st.integers(1, 7), min_size=1, max_size=6),
    bad=st.sampled_from([None, math.nan, math.inf, -math.inf]),
    half=st.booleans(),
)
def test_window_add_and_lerp_match_a_loop(seed, sizes, bad, half):
    """``window_add_`` and ``lerp_`` (mixed dtypes, a weight that is not a float32) equal a
    plain loop, a non-finite entry included (skipping such a step is the caller's job)."""
    from sgdlens import _torch

    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(n, 2, generator=g, dtype=torch.float64) for n in sizes]
    if half:  # a low-precision gradient accumulated into a float32 buffer
        ts[0] = ts[0].to(torch.bfloat16)
    if bad is not None:
        ts[-1][0, 0] = bad
    start = [torch.randn(n, 2, generator=g, dtype=torch.float64) for n in sizes]
    start[0] = start[0].float() if half else start[0]
    added = [b.clone() for b in start]
    _torch.window_add_(added, ts)
    for a, b, t in zip(added, start, ts):
        assert torch.equal(a, b + t.to(b.dtype)) or (bad is not None and a is added[-1])
    if bad is not None:  # the poisoned tensor's sum is non-finite
        assert not torch.isfinite(added[-1]).all()
    lerped = [b.clone() for b in start]
    _torch.lerp_(lerped, ts, 0.1)  # 0.1: not a float32
    for a, b, t in zip(lerped, start, ts):  # against float64 arithmetic, to the buffer's dtype
        want = (b.double() + 0.1 * (t.to(b.dtype).double() - b.double())).to(b.dtype)
        tol = 1e-6 if b.dtype == torch.float32 else 1e-12
        torch.testing.assert_close(a, want, rtol=tol, atol=tol, equal_nan=True)
