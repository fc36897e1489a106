"""Probes inside the monitor: schedule, records, budget, and training still bit-for-bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sgdlens import PhaseDetector, PhaseMonitor, probes
from sgdlens.probes.scheduled import Probe
from tests._train import batches, make_model

DATA = batches(2, seed=9)


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def train(probe_list, steps=40, budget=1.0, model=None, detector=True):
    model = model or make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mon = PhaseMonitor(
        opt, model=model, log_every=5, probes=probe_list, probe_budget=budget, detector=detector
    )
    torch.manual_seed(1)
    for x, y in batches(steps):
        opt.zero_grad()
        loss = loss_fn(model, (x, y))
        loss.backward()
        mon.observe(loss=loss)
        opt.step()
    mon.close()
    return model, mon


def test_scheduled_probes_write_records_and_leave_training_unchanged():
    bare, _ = train([])
    ref = {k: v.clone() for k, v in make_model().state_dict().items()}
    watched, mon = train(
        [
            probes.sharpness_probe(loss_fn, DATA, every=10, per_decade=None, on_event=False),
            probes.trace_probe(loss_fn, DATA, samples=4, every=20, per_decade=None),
            probes.barrier_probe(
                loss_fn, DATA, ref, name="init", every=20, per_decade=None, on_event=False
            ),
        ]
    )
    for a, b in zip(bare.parameters(), watched.parameters()):
        assert torch.equal(a, b)
    h = mon.history
    sharp = [r["step"] for r in h.records if "sharpness" in r]
    assert sharp == [10, 20, 30, 40]
    assert [r["step"] for r in h.records if "hessian_trace" in r] == [20, 40]
    last = h.records[-1]
    assert last["eos_ratio"] == pytest.approx(last["sharpness"] * 0.1 / (2 + 2 * 0.9))
    assert "barrier/init" in last and "error_barrier/init" in last
    assert 0 < last["probe_time_fraction"] <= 1
    # the probe's sharpness is the one the function gives at those weights
    direct = probes.sharpness(watched, loss_fn, DATA).value
    assert last["sharpness"] == pytest.approx(direct, rel=1e-2)


def test_budget_postpones_probes_and_holds_the_fraction(monkeypatch):
    from sgdlens.probes import scheduled

    clock = [0.0]
    monkeypatch.setattr(scheduled.time, "perf_counter", lambda: clock[0])

    def probe(model, opt):
        clock[0] += 1.0  # each run costs 1 s
        return {"p": 1.0}

    sched = scheduled.ProbeScheduler([Probe(probe, name="p", every=1)], budget=0.1)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ran = []
    for step in range(1, 201):
        clock[0] += 2.0  # 2 s of training between log points
        out = sched.run(step, False, model, opt)
        if "p" in out:
            ran.append(step)
        assert out["probe_time_fraction"] <= 0.1 + 1.0 / clock[0] + 1e-12
    assert ran[0] == 1  # the first run measures the cost
    assert 40 <= len(ran) <= 45  # n = 0.1 (400 + n) runs of 1 s: 44 of the 200 due runs
    assert out["probe_time_fraction"] == pytest.approx(0.1, abs=0.01)


def test_probe_runs_when_the_detector_fires():
    quick = PhaseDetector(window=10, dwell=5, warmup=10)  # events within 60 steps
    _, mon = train(
        [Probe(lambda m, o: {"x": 1.0}, name="x", on_event=True)], steps=60, detector=quick
    )
    ran = [r["step"] for r in mon.history.records if "x" in r]
    assert ran and ran == sorted({e.step for e in mon.events})


def test_probe_log_spaced_steps():
    p = Probe(lambda m, o: {"x": 1.0}, name="x", per_decade=1)
    assert [p.next_after(s) for s in (0, 1, 9, 10, 99)] == [1, 10, 10, 100, 100]
    q = Probe(lambda m, o: {"x": 1.0}, name="x", every=7, per_decade=2)
    assert q.next_after(7) == 10 and q.next_after(10) == 14


def test_failing_probe_warns_and_training_continues():
    def broken(model, opt):
        next(model.parameters()).data.add_(1.0)  # even a probe that mutates the model
        raise RuntimeError("boom")

    bare, _ = train([], steps=10)
    with pytest.warns(UserWarning, match="boom"):
        watched, mon = train([Probe(broken, name="broken", every=5)], steps=10)
    for a, b in zip(bare.parameters(), watched.parameters()):
        assert torch.equal(a, b)
    assert mon.step == 10


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"probes": [lambda m, o: {}]}, TypeError, "probes=.*Probe"),
        (
            {"probes": [Probe(lambda m, o: {}, name="a", every=1)], "model": None},
            ValueError,
            "needs model=",
        ),
        ({"probe_budget": 0}, ValueError, r"probe_budget=0.*\(0, 1\]"),
    ],
)
def test_monitor_probe_arguments(kwargs, exc, pattern):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs = {"model": model, **kwargs}
    with pytest.raises(exc, match=pattern):
        PhaseMonitor(opt, **kwargs)


def test_probe_arguments():
    with pytest.raises(ValueError, match="no schedule"):
        Probe(lambda m, o: {}, name="a")
    with pytest.raises(ValueError, match="every=0"):
        Probe(lambda m, o: {}, name="a", every=0)
    with pytest.raises(TypeError, match="fn="):
        Probe(3, name="a", every=1)


def test_probe_model_is_only_for_fsdp():
    """probe_model= is the unsharded copy probes need under FSDP (tests/test_distributed.py);
    without FSDP the probes run on model= itself, so it is refused, as is a non-module."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    probe = probes.sharpness_probe(lambda m, b: F.cross_entropy(m(b[0]), b[1]), batch)
    with pytest.raises(ValueError, match=r"probe_model=.*is for probes= under FSDP"):
        PhaseMonitor(opt, model=model, probes=[probe], probe_model=torch.nn.Linear(3, 2))
    with pytest.raises(TypeError, match=r"probe_model=\.\.\.\) must be a plain"):
        PhaseMonitor(opt, model=model, probes=[probe], probe_model="copy")
