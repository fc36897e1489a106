"""Yaida's relation for torch.optim.SGD (sgdlens.stationarity) and SASA's stationarity test."""

from __future__ import annotations

import math

import pytest
import torch

from sgdlens.stationarity import SGDStationarity, StationarityTest, batch_means, t_quantile

CONFIGS = [
    {"momentum": 0.9},
    {"momentum": 0.9, "dampening": 0.5},
    {"momentum": 0.9, "nesterov": True},
    {"momentum": 0.9, "weight_decay": 0.1},
    {"momentum": 0.5, "nesterov": True, "weight_decay": 0.1},
    {},
    {"weight_decay": 0.3},
]


def quadratic_run(steps, lr, seed=0, start=3.0, **kw):
    """SGD on ½ Σ h_i (θ_i − 1)² with unit Gaussian gradient noise, in float64."""
    h = torch.linspace(0.5, 2.0, 20, dtype=torch.float64)
    p = torch.nn.Parameter(torch.full((20,), start, dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=lr, **kw)
    stream = SGDStationarity(opt, capacity=steps)
    gen = torch.Generator().manual_seed(seed)
    norms = [float(p.detach().square().sum())]
    for _ in range(steps):
        p.grad = h * (p.detach() - 1.0) + torch.randn(20, generator=gen, dtype=torch.float64)
        opt.step()
        norms.append(float(p.detach().square().sum()))
    return p, opt, stream, norms


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_the_relation_holds_at_stationarity_on_a_noisy_quadratic(kw):
    """Run long at a fixed rate: the time average of Δ = ⟨θ, g̃⟩ − c‖b‖² (or its Nesterov /
    plain-SGD form) is ≈ 0, i.e. E⟨θ, g̃⟩ equals the dissipation term to within ~3 %."""
    lr = 0.05 if kw.get("momentum") else 0.1
    p, opt, stream, _ = quadratic_run(20000, lr, **kw)
    delta, v = stream.window(10000)  # the second half: the transient is long gone
    mean, var, _ = batch_means(delta)
    assert abs(mean) < 0.03 * float(v.mean())
    assert abs(mean) < 4 * math.sqrt(var)
    if kw.get("momentum") and not kw.get("nesterov"):  # c = α (1 + μ) / (2 (1 − τ))
        c = lr * (1 + kw["momentum"]) / (2 * (1 - kw.get("dampening", 0.0)))
        buf = opt.state[p]["momentum_buffer"]
        assert float(v[-1]) == pytest.approx(c * float(buf.square().sum()))


def test_delta_sums_exactly_to_the_change_of_the_squared_norm():
    """Heavy ball (τ = 0, any gradients, transient included): Σ_{k=1..n} Δ_k =
    (1 − μ)(‖θ_1‖² − ‖θ_{n+1}‖²)/(2α) + μ E_n − μ (α/2)‖b_n‖², E_n = (‖θ_n‖² − ‖θ_{n+1}‖²)/(2α).
    This pins which step's θ, g and b enter Δ_k."""
    lr, mu, n = 0.03, 0.9, 300
    p, opt, stream, norms = quadratic_run(n, lr, start=5.0, momentum=mu, weight_decay=0.01)
    delta, _ = stream.window(n)
    b = opt.state[p]["momentum_buffer"]
    e_n = (norms[n - 1] - norms[n]) / (2 * lr)
    expected = (
        (1 - mu) * (norms[0] - norms[n]) / (2 * lr)
        + mu * e_n
        - mu * lr / 2 * float(b.square().sum())
    )
    assert float(delta.sum()) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert abs(float(delta[:50].mean())) > 10 * abs(float(delta[-100:].mean()))  # transient


def test_the_test_passes_a_stationary_stream_and_rejects_a_transient_one():
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(2000, generator=gen, dtype=torch.float64)
    ar = torch.zeros(2000, dtype=torch.float64)
    for i in range(1, 2000):  # AR(1), strongly correlated like Δ along a trajectory
        ar[i] = 0.8 * ar[i - 1] + noise[i]
    test = StationarityTest()
    assert test(ar[-1000:]).stationary
    drift = ar - 3.0 * torch.exp(-torch.arange(2000, dtype=torch.float64) / 2000.0)
    r = test(drift[-1000:])
    assert not r.stationary and r.upper < 0
    assert test.window(1999) == 0 and test.window(2000) == 1000 and test.window(2001) == 1000


def test_batch_means_and_t_quantile():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10000, generator=gen, dtype=torch.float64)
    mean, var, dof = batch_means(x)
    assert dof == 99 and abs(mean) < 0.04 and var == pytest.approx(1e-4, rel=0.3)
    for dof, exact in ((5, 2.5706), (9, 2.2622), (30, 2.0423), (1000, 1.9623)):
        assert t_quantile(0.975, dof) == pytest.approx(exact, abs=1e-3)
    with pytest.raises(ValueError, match="too few"):
        batch_means(x[:1])


def test_stationary_phaselr_cuts_after_the_transient_only():
    """End to end: PhaseLR(trigger='stationary') on a slow noisy quadratic (time constant
    ~250 steps, started far away). With the defaults (window ≥ 1000 steps) the first test is
    at step 2000, when the iterates have settled, and it cuts there; each cut starts a new
    stretch. With a 100-step window the interval is so wide that it cuts in the transient."""
    from sgdlens import PhaseMonitor
    from sgdlens.schedulers import PhaseLR

    def run(trigger, steps):
        h = torch.linspace(0.02, 2.0, 50)
        p = torch.nn.Parameter(torch.full((50,), 10.0))
        opt = torch.optim.SGD([p], lr=0.02, momentum=0.9)
        mon = PhaseMonitor(opt, log_every=10, detector=False)
        sched = PhaseLR(opt, mon, trigger=trigger)
        gen = torch.Generator().manual_seed(0)
        lrs = []
        for _ in range(steps):
            p.grad = h * (p.detach() - 1.0) + torch.randn(50, generator=gen)
            opt.step()
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        mon.close()
        return [r for r in mon.history.events if r["event"] == "lr_decay"], lrs

    cuts, lrs = run("stationary", 4500)
    assert [r["step"] for r in cuts] == [2000, 4000]  # no detector: the events are in history
    assert cuts[0]["old"] == "stationary" and cuts[0]["evidence/n"] == 1000
    assert abs(cuts[0]["evidence/mean"]) < cuts[0]["evidence/half_width"]
    assert lrs[1998] == 0.02 and lrs[1999] == pytest.approx(0.002)
    assert lrs[-1] == pytest.approx(0.0002)
    cuts, _ = run(StationarityTest(min_samples=100), 300)
    assert [r["step"] for r in cuts][:1] == [200]  # low power: a cut in the transient


def test_bad_test_arguments_name_themselves():
    for kw, match in (
        ({"confidence": 1.0}, "confidence"),
        ({"confidence": 0.0}, "confidence"),
        ({"keep": 0.0}, "keep"),
        ({"test_every": 0}, "test_every"),
        ({"min_samples": 3}, "min_samples"),
    ):
        with pytest.raises(ValueError, match=match):
            StationarityTest(**kw)
    with pytest.raises(TypeError, match="confidence"):
        StationarityTest(confidence="0.95")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="test_every"):
        StationarityTest(test_every=1.5)  # type: ignore[arg-type]
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="SGD"):
        SGDStationarity(torch.optim.Adam([p]))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="maximize"):
        SGDStationarity(torch.optim.SGD([p], lr=0.1, maximize=True))


def test_a_deleted_scheduler_leaves_no_hook_on_the_optimizer():
    import gc

    from sgdlens import PhaseMonitor
    from sgdlens.schedulers import PhaseLR

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    mon = PhaseMonitor(opt, log_every=10, detector=False)
    hooks = len(opt._optimizer_step_post_hooks)
    for _ in range(3):  # a scheduler rebuilt, e.g. at each stage of a run
        sched = PhaseLR(opt, mon, trigger="stationary")
        assert len(opt._optimizer_step_post_hooks) == hooks + 1
        del sched
        gc.collect()
    assert len(opt._optimizer_step_post_hooks) == hooks  # each left a dead hook behind
    stream = SGDStationarity(opt)
    stream.remove()
    del stream
    gc.collect()  # a hook removed by hand and then by the finalizer: no error
    assert len(opt._optimizer_step_post_hooks) == hooks
    mon.close()
