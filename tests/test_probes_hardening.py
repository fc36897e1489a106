"""Regression tests for the probe faults of the hardening pass (issue 16, items 10, 11, 13, 14).

Each test failed before its fix: a probe that cannot run must say so at construction, not warn
at every log point; a resumed run must give the records of an uninterrupted one; a call
without a generator must leave the global RNG alone.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sgdlens import PhaseMonitor, probes
from sgdlens.probes.scheduled import Probe, ProbeScheduler
from tests._train import OPTIMIZERS, batches, make_model

DATA = batches(2, seed=9)


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x).float(), y)


def run_scheduler(probe, model, opt, steps=(1, 2, 3)):
    """Run ``probe`` at each step with every warning an error (a failed probe warns)."""
    sched = ProbeScheduler([probe], budget=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return [sched.run(s, False, model, opt) for s in steps]


def step_once(model, opt):
    opt.zero_grad()
    loss_fn(model, DATA[0]).backward()
    opt.step()


# ----------------------------------------------------------------------------- item 10


@pytest.mark.parametrize("name", ["nadam", "radam", "adamax", "adagrad", "rmsprop", "adam"])
def test_sharpness_probe_runs_for_adaptive_optimizers(name):
    """NAdam/RAdam keep ``exp_avg_sq`` too; the probe took that for Adam and asked for Adam's
    preconditioner, which refused them at every log point."""
    model = make_model()
    opt = OPTIMIZERS[name](model.parameters())
    step_once(model, opt)
    probe = probes.sharpness_probe(loss_fn, DATA, every=1, per_decade=None)
    outs = run_scheduler(probe, model, opt)
    for out in outs:
        assert out["sharpness"] > 0 and out["sharpness_hvps"] >= 1
    plain = probes.sharpness(model, loss_fn, DATA).value
    if name == "adam":  # preconditioned, with the edge-of-stability ratio
        assert "eos_ratio" in outs[0] and outs[0]["sharpness"] != pytest.approx(plain, rel=1e-2)
    else:  # the plain sharpness, and no threshold to compare it with
        assert "eos_ratio" not in outs[0]
        assert outs[0]["sharpness"] == pytest.approx(plain, rel=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
def test_trace_on_low_precision_models(dtype, method):
    """Hutch++'s QR has no bfloat16/float16 kernel on CPU (``geqrf``); it runs in float32.
    With the same probe vectors the estimate matches the float32 model's to bf16 precision."""
    model, full = make_model().to(dtype), make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = DATA[0]
    data = (x.to(dtype), y)
    torch.manual_seed(0)  # the probe draws its vectors' seed from the global RNG
    out = run_scheduler(probes.trace_probe(loss_fn, data, samples=9, every=1), model, opt)[0]
    torch.manual_seed(0)
    ref = probes.hessian_trace(full, loss_fn, (x, y), samples=9, method="hutch++")
    assert out["hessian_trace"] == pytest.approx(ref.trace, rel=0.03)
    g = torch.Generator().manual_seed(1)
    res = probes.hessian_trace(model, loss_fn, data, method=method, samples=9, generator=g)
    g = torch.Generator().manual_seed(1)
    ref = probes.hessian_trace(full, loss_fn, (x, y), method=method, samples=9, generator=g)
    assert res.trace == pytest.approx(ref.trace, rel=0.03)


# ----------------------------------------------------------------------------- item 11


def test_checkpoint_carries_the_lanczos_warm_start():
    """Records after a resume equal those of the uninterrupted run (the warm start is saved)."""

    def train(resume_at=None, steps=30):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

        def monitor():
            probe = probes.sharpness_probe(loss_fn, DATA, every=5, per_decade=None, on_event=False)
            return PhaseMonitor(opt, model=model, log_every=5, probes=[probe], probe_budget=1.0)

        mon = monitor()
        torch.manual_seed(1)
        for i, (x, y) in enumerate(batches(steps)):
            if i == resume_at:
                buf = io.BytesIO()
                torch.save({"mon": mon.state_dict(), "rng": torch.get_rng_state()}, buf)
                mon.close()
                buf.seek(0)
                ckpt = torch.load(buf, weights_only=False)
                mon = monitor()
                mon.load_state_dict(ckpt["mon"])
                torch.set_rng_state(ckpt["rng"])
            opt.zero_grad()
            loss = loss_fn(model, (x, y))
            loss.backward()
            mon.observe(loss=loss)
            opt.step()
        mon.close()
        keys = ("step", "sharpness", "sharpness_hvps")
        return [tuple(r[k] for k in keys) for r in mon.history.records if "sharpness" in r]

    whole = train()
    resumed = train(resume_at=15)
    assert len(whole) == 6
    assert resumed[-3:] == whole[-3:]


def test_checkpoint_carries_the_barrier_reference():
    """A barrier probe rebuilt on resume from the resumed weights (the natural code) keeps the
    reference of the original run: the checkpoint carries it."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    start = copy.deepcopy(model.state_dict())
    probe = probes.barrier_probe(loss_fn, DATA, start, every=1, steps=3)
    sched = ProbeScheduler([probe], budget=1.0)
    for _ in range(3):
        step_once(model, opt)
    state = sched.state_dict()
    rebuilt = probes.barrier_probe(loss_fn, DATA, model.state_dict(), every=1, steps=3)
    resumed = ProbeScheduler([rebuilt], budget=1.0)
    resumed.load_state_dict(state)
    want = probes.interpolate(start, model, loss_fn, DATA, steps=3, model=model).error_barrier
    assert sched.run(4, False, model, opt)["error_barrier/init"] == pytest.approx(want)
    assert resumed.run(4, False, model, opt)["error_barrier/init"] == pytest.approx(want)
    assert want > 1e-3  # a reference equal to the model would give 0


def test_scheduler_state_holds_probe_state():
    probe = probes.sharpness_probe(loss_fn, DATA, every=1, per_decade=None)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = ProbeScheduler([probe], budget=1.0)
    sched.run(1, False, model, opt)
    state = sched.state_dict()
    assert set(state["probe_state"][probe.name]["v"]) == {n for n, _ in model.named_parameters()}
    fresh = probes.sharpness_probe(loss_fn, DATA, every=1, per_decade=None)
    other = ProbeScheduler([fresh], budget=1.0)
    other.load_state_dict(state)
    a, b = sched.run(2, False, model, opt), other.run(2, False, model, opt)
    assert (a["sharpness"], a["sharpness_hvps"]) == (b["sharpness"], b["sharpness_hvps"])
    # a checkpoint from before probes kept state still loads
    old = {k: v for k, v in state.items() if k != "probe_state"}
    ProbeScheduler([probes.sharpness_probe(loss_fn, DATA, every=1)], 1.0).load_state_dict(old)


# ----------------------------------------------------------------------------- item 13


def test_random_direction_leaves_the_global_rng_alone():
    model = make_model()
    torch.manual_seed(3)
    before = torch.get_rng_state()
    d1 = probes.random_direction(model)
    assert torch.equal(torch.get_rng_state(), before)
    d2 = probes.random_direction(model)  # the documented behaviour: identical repeats
    for k in d1:
        assert torch.equal(d1[k], d2[k])
    torch.manual_seed(4)
    d3 = probes.random_direction(model)
    assert not torch.equal(d1["fc1.weight"], d3["fc1.weight"])


def test_landscape_2d_without_generator_uses_two_directions():
    model = make_model()
    surf = probes.landscape_2d(model, loss_fn, DATA[0], steps=3)
    d1, d2 = surf.directions
    assert not torch.equal(d1["fc1.weight"], d2["fc1.weight"])


def test_flatness_without_generator_uses_distinct_directions():
    model = make_model()
    res = probes.flatness(model, loss_fn, DATA[0], directions=3, epsilon=0.05)
    assert len(set(res.radii.tolist())) > 1


# ----------------------------------------------------------------------------- item 14

REF = make_model().state_dict()
BAD = [
    (lambda: probes.sharpness_probe(None, DATA), TypeError, "loss_fn"),
    (lambda: probes.sharpness_probe(loss_fn, DATA, tol=-1), ValueError, "tol"),
    (lambda: probes.sharpness_probe(loss_fn, DATA, tol=0), ValueError, "tol"),
    (lambda: probes.sharpness_probe(loss_fn, "data.pt"), TypeError, "data"),
    (lambda: probes.sharpness_probe(loss_fn, []), ValueError, "data"),
    (lambda: probes.trace_probe(None, DATA), TypeError, "loss_fn"),
    (lambda: probes.trace_probe(loss_fn, DATA, samples=0), ValueError, "samples"),
    (lambda: probes.trace_probe(loss_fn, DATA, samples=2), ValueError, "samples"),
    (lambda: probes.trace_probe(loss_fn, DATA, samples=5.0), TypeError, "samples"),
    (lambda: probes.barrier_probe(loss_fn, DATA, reference=None), TypeError, "reference"),
    (lambda: probes.barrier_probe(loss_fn, DATA, {"w": 1.0}), TypeError, "reference"),
    (lambda: probes.barrier_probe(None, DATA, REF), TypeError, "loss_fn"),
    (lambda: probes.barrier_probe(loss_fn, DATA, REF, steps=1), ValueError, "steps"),
    (lambda: probes.barrier_probe(loss_fn, DATA, REF, name=""), ValueError, "name"),
]


@pytest.mark.parametrize(("make", "exc", "pattern"), BAD)
def test_probe_factories_validate_at_construction(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make()


def test_barrier_probe_accepts_a_module_and_a_one_shot_iterator():
    """A module as the reference is snapshotted; a generator of batches is read once, so the
    second run does not see an exhausted iterator."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = make_model(seed=1)
    probe = probes.barrier_probe(loss_fn, (b for b in DATA), ref, every=1, steps=3)
    with torch.no_grad():
        ref.fc1.weight.add_(1.0)  # changed after construction: the snapshot is used
    outs = run_scheduler(probe, model, opt, steps=(1, 2))
    assert outs[0]["barrier/init"] == outs[1]["barrier/init"]
    want = probes.interpolate(make_model(seed=1), model, loss_fn, DATA, steps=3).barrier
    assert outs[0]["barrier/init"] == pytest.approx(want)
    sharp = probes.sharpness_probe(loss_fn, iter(DATA), every=1, per_decade=None)
    assert len(run_scheduler(sharp, model, opt)) == 3


def test_probe_reports_its_state_argument():
    with pytest.raises(TypeError, match="state="):
        Probe(lambda m, o: {}, name="a", every=1, state=[1])
    assert isinstance(nn.Module, type)
