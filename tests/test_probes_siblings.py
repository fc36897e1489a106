"""Regression tests for three probe siblings of issue 16 that the hardening pass left open.

1. ``sharpness_probe`` with an Adam holding part of the model read Adam state for parameters
   it does not hold and failed at every log point; it now takes the Hessian over the
   optimizer's parameters (the rest held fixed).
2. ``barrier_probe`` with a reference of another architecture failed at every log point; it is
   now refused once (an error when the scheduler has the model, else one warning).
3. ``eos_ratio`` was left out for SGD with per-group learning rates; it is now the exact
   stability ratio ``λ_max(η^{1/2} (H + diag w) η^{1/2})`` over the threshold at unit rate.

The numbers are checked against float64 closed forms on a quadratic whose Hessian is known.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sgdlens import PhaseMonitor, lenses, probes
from sgdlens.probes.scheduled import ProbeScheduler
from tests._train import batches, make_model

D = torch.float64
DATA = torch.zeros(1, dtype=D)  # the quadratic ignores its batch


class Quadratic(nn.Module):
    """``L(a, b) = ½ θᵀ H θ - cᵀ θ`` with ``θ = (a, b)``: the Hessian is ``H`` everywhere."""

    def __init__(self, H: torch.Tensor, c: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(2, dtype=D))
        self.b = nn.Parameter(torch.zeros(2, dtype=D))
        self.register_buffer("H", H)
        self.register_buffer("c", c)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        theta = torch.cat([self.a, self.b])
        return 0.5 * theta @ self.H @ theta - self.c @ theta + 0 * batch.sum()


def qloss(model, batch):
    return model(batch)


def quadratic(scale: float = 1.0) -> Quadratic:
    A = torch.tensor(
        [[3.0, 1.0, 0.5, 0.2], [1.0, 2.0, 0.3, 0.1], [0.5, 0.3, 1.5, 0.4], [0.2, 0.1, 0.4, 1.0]],
        dtype=D,
    )
    return Quadratic(scale * A, torch.tensor([1.0, -2.0, 0.5, 1.5], dtype=D))


def run_probe(probe, model, opt, steps=(1, 2)):
    """The probe's records at ``steps``, with every warning an error (a failed probe warns)."""
    sched = ProbeScheduler([probe], budget=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return [sched.run(s, False, model, opt) for s in steps]


def descend(model, opt, steps=3):
    for _ in range(steps):
        opt.zero_grad()
        qloss(model, DATA).backward()
        opt.step()


def top(M: torch.Tensor) -> float:
    return float(torch.linalg.eigvalsh(M)[-1])


# ----------------------------------------------------------------------------- 1


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_over_part_of_the_model_preconditions_its_own_parameters(cls):
    """Adam over ``a`` only (``b`` trainable, left to another optimizer): the preconditioned
    sharpness is ``λ_max(P^{-1/2} H_aa P^{-1/2})``, ``P`` from Adam's state for ``a``."""
    model = quadratic()
    opt = cls([model.a], lr=0.01, betas=(0.9, 0.99), eps=1e-8)
    other = torch.optim.SGD([model.b], lr=0.1)
    for _ in range(3):
        opt.zero_grad(), other.zero_grad()
        qloss(model, DATA).backward()
        opt.step(), other.step()
    st = opt.state[model.a]
    P = (st["exp_avg_sq"] / (1 - 0.99 ** float(st["step"]))).sqrt() + 1e-8
    Haa = model.H[:2, :2]
    want = top(Haa / P.sqrt()[:, None] / P.sqrt()[None, :])
    out = run_probe(probes.sharpness_probe(qloss, DATA, every=1, tol=1e-10), model, opt)
    for o in out:
        assert o["sharpness"] == pytest.approx(want, rel=1e-8)
        assert o["eos_ratio"] == pytest.approx(want / ((2 + 2 * 0.9) / (0.1 * 0.01)), rel=1e-8)
    res = probes.sharpness(model, qloss, DATA, preconditioner=opt, tol=1e-10)
    assert res.names == ("a",) and res.value == pytest.approx(want, rel=1e-8)


def test_adam_holding_a_parameter_it_never_moved_preconditions_the_others():
    """Adam holds ``a`` and ``b``, but ``b`` never got a gradient (no Adam state): the probe
    takes ``λ_max(P^{-1/2} H_aa P^{-1/2})`` over ``a``, ``b`` held fixed."""
    model = quadratic()
    opt = torch.optim.Adam([model.a, model.b], lr=0.01, betas=(0.9, 0.99), eps=1e-8)
    for _ in range(3):
        opt.zero_grad()
        qloss(model, DATA).backward()
        model.b.grad = None  # b gets no gradient: Adam skips it and keeps no state for it
        opt.step()
    assert not opt.state.get(model.b)
    st = opt.state[model.a]
    P = (st["exp_avg_sq"] / (1 - 0.99 ** float(st["step"]))).sqrt() + 1e-8
    want = top(model.H[:2, :2] / P.sqrt()[:, None] / P.sqrt()[None, :])
    out = run_probe(probes.sharpness_probe(qloss, DATA, every=1, tol=1e-10), model, opt)
    assert all(o["sharpness"] == pytest.approx(want, rel=1e-8) for o in out)


def test_sgd_over_part_of_the_model_takes_the_hessian_of_its_parameters():
    """The plain sharpness too is the block the optimizer moves: ``λ_max(H_bb)``."""
    model = quadratic()
    opt = torch.optim.SGD([model.b], lr=0.1)
    out = run_probe(probes.sharpness_probe(qloss, DATA, every=1, tol=1e-10), model, opt)
    want = top(model.H[2:, 2:])
    assert out[0]["sharpness"] == pytest.approx(want, rel=1e-8)
    assert out[0]["eos_ratio"] == pytest.approx(want * 0.1 / 2, rel=1e-8)


def test_adam_over_the_head_in_a_monitor_records_sharpness():
    """The case of the report: a network whose body Adam does not hold, inside a monitor."""
    model = make_model()
    opt = torch.optim.Adam(model.fc2.parameters(), lr=1e-2)
    data = batches(1, seed=9)

    def loss_fn(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    probe = probes.sharpness_probe(loss_fn, data, every=2, per_decade=None, on_event=False)
    mon = PhaseMonitor(opt, model=model, log_every=2, probes=[probe], probe_budget=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in batches(4):
            opt.zero_grad()
            loss_fn(model, (x, y)).backward()
            opt.step()
    mon.close()
    recs = [r for r in mon.history.records if "sharpness" in r]
    assert [r["step"] for r in recs] == [2, 4] and all("eos_ratio" in r for r in recs)


# ----------------------------------------------------------------------------- 2


def other_width() -> nn.Module:
    return nn.Sequential(
        OrderedDict(fc1=nn.Linear(5, 9), act=nn.Tanh(), drop=nn.Dropout(0.1), fc2=nn.Linear(9, 3))
    )


def loss_ce(m, b):
    return F.cross_entropy(m(b[0]), b[1])


@pytest.mark.parametrize(
    ("reference", "pattern"),
    [
        (other_width, r"'fc1.weight' is \(9, 5\) in the reference and \(7, 5\) in the model"),
        (lambda: nn.Linear(5, 3), r"'fc1.weight' is absent in the reference"),
    ],
)
def test_barrier_reference_of_another_architecture_is_refused_with_the_model(reference, pattern):
    probe = probes.barrier_probe(loss_ce, batches(1), reference().state_dict(), every=1)
    with pytest.raises(ValueError, match=r"barrier_probe\(reference=\.\.\.\).*" + pattern):
        ProbeScheduler([probe], budget=1.0, model=make_model())


def test_barrier_reference_of_another_architecture_is_refused_by_the_monitor():
    """The monitor hands its model to the probe schedule before it attaches any hook: the
    wrong reference is refused at construction and leaves no hook behind (it warned at every
    log point before)."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = probes.barrier_probe(loss_ce, batches(1), other_width().state_dict(), every=2)
    with pytest.raises(ValueError, match=r"barrier_probe\(reference=\.\.\.\).*\(9, 5\)"):
        PhaseMonitor(
            opt,
            model=model,
            lenses=[lenses.NoiseScale("per_sample")],
            log_every=2,
            probes=[probe],
            probe_budget=1.0,
        )
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_barrier_reference_of_another_architecture_warns_once_without_the_model():
    """A schedule built without the model refuses it at its first run: one warning, then the
    probe leaves the schedule."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = probes.barrier_probe(loss_ce, batches(1), other_width().state_dict(), every=1)
    schedule = ProbeScheduler([probe], budget=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in (1, 2, 3):
            assert not any(k.startswith("barrier") for k in schedule.run(step, False, model, opt))
    msgs = [str(w.message) for w in caught if "barrier" in str(w.message)]
    assert len(msgs) == 1 and "dropped from the schedule" in msgs[0] and "(9, 5)" in msgs[0]


def test_barrier_reference_of_the_architecture_still_runs():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = probes.barrier_probe(loss_ce, batches(1), make_model(3).state_dict(), every=1)
    ProbeScheduler([probe], budget=1.0, model=model)  # accepted
    assert "barrier/init" in run_probe(probe, model, opt, steps=(1,))[0]


# ----------------------------------------------------------------------------- 3


def rate_ratio(H, lrs, wds, threshold_at_unit_rate):
    """``λ_max(η^{1/2} (H + diag w) η^{1/2})`` over the threshold at η = 1, in float64."""
    eta = torch.tensor([lrs[0]] * 2 + [lrs[1]] * 2, dtype=D)
    w = torch.tensor([wds[0]] * 2 + [wds[1]] * 2, dtype=D)
    M = eta.sqrt()[:, None] * (H + torch.diag(w)) * eta.sqrt()[None, :]
    return top(M) / threshold_at_unit_rate


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_eos_ratio_with_per_group_learning_rates_is_the_closed_form(momentum):
    model = quadratic()
    lrs, wds = (0.1, 0.02), (0.0, 0.05)
    opt = torch.optim.SGD(
        [
            {"params": [model.a], "lr": lrs[0], "weight_decay": wds[0]},
            {"params": [model.b], "lr": lrs[1], "weight_decay": wds[1]},
        ],
        momentum=momentum,
    )
    out = run_probe(probes.sharpness_probe(qloss, DATA, every=1, tol=1e-10), model, opt)
    want = rate_ratio(model.H, lrs, wds, 2 + 2 * momentum)
    for o in out:
        assert o["eos_ratio"] == pytest.approx(want, rel=1e-8)
        assert o["sharpness"] == pytest.approx(top(model.H), rel=1e-8)  # still the plain one
    # neither group's own ratio is it: the top eigenvector mixes the groups
    for lr in lrs:
        assert abs(top(model.H) * lr / (2 + 2 * momentum) - want) > 0.01 * want


@pytest.mark.parametrize("side", [0.97, 1.03])
def test_per_group_eos_ratio_is_the_stability_boundary(side):
    """Scaled to a ratio of 0.97 the two-rate descent converges; at 1.03 it diverges."""
    lrs = (0.1, 0.02)
    model = quadratic()
    ratio = rate_ratio(model.H, lrs, (0.0, 0.0), 2.0)
    model = quadratic(side / ratio)
    model.c.zero_()
    with torch.no_grad():
        model.a.fill_(1.0), model.b.fill_(1.0)
    opt = torch.optim.SGD(
        [{"params": [model.a], "lr": lrs[0]}, {"params": [model.b], "lr": lrs[1]}]
    )
    got = run_probe(probes.sharpness_probe(qloss, DATA, every=1, tol=1e-10), model, opt, (1,))
    assert got[0]["eos_ratio"] == pytest.approx(side, rel=1e-8)
    descend(model, opt, 3000)
    norm = float(torch.cat([model.a, model.b]).detach().norm())
    assert (norm < 1.0) == (side < 1)


def test_eos_ratio_with_per_group_adam_rates():
    """Adam's per-parameter rate is η_g / P: ``λ_max(r^{1/2} P^{-1/2} H P^{-1/2} r^{1/2})``
    over the threshold at the largest rate."""
    model = quadratic()
    opt = torch.optim.Adam(
        [
            {"params": [model.a], "lr": 0.01, "weight_decay": 0.0},
            {"params": [model.b], "lr": 0.002, "weight_decay": 0.1},
        ]
    )
    descend(model, opt)
    P = torch.cat(
        [
            (opt.state[p]["exp_avg_sq"] / (1 - 0.999 ** float(opt.state[p]["step"]))).sqrt() + 1e-8
            for p in (model.a, model.b)
        ]
    )
    d = (torch.tensor([1.0, 1.0, 0.2, 0.2], dtype=D) / P).sqrt()
    want = top(d[:, None] * model.H * d[None, :]) / (3.8 / (0.1 * 0.01))
    out = run_probe(probes.sharpness_probe(qloss, DATA, every=1, tol=1e-10), model, opt)
    assert out[0]["eos_ratio"] == pytest.approx(want, rel=1e-8)


def test_groups_differing_in_momentum_leave_eos_ratio_out_with_one_warning():
    model = quadratic()
    opt = torch.optim.SGD(
        [{"params": [model.a], "momentum": 0.9}, {"params": [model.b], "momentum": 0.5}], lr=0.1
    )
    sched = ProbeScheduler([probes.sharpness_probe(qloss, DATA, every=1)], budget=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [sched.run(s, False, model, opt) for s in (1, 2, 3)]
    assert all("sharpness" in o and "eos_ratio" not in o for o in outs)
    assert len(caught) == 1 and "'momentum'" in str(caught[0].message)
