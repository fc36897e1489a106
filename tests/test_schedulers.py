"""PhaseLR: torch's scheduler protocol, decays at drift → diffusion entries or at a
stationarity test's verdict, clear errors."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import ChainedScheduler, LinearLR, StepLR

from sgdlens import PhaseDetector, PhaseMonitor, lenses
from sgdlens.schedulers import PhaseLR


def level(t: int, switches: tuple[int, ...]) -> float:
    """Mean gradient: 1.0 (SNR ≈ 2.8, drift) and 0.02 (SNR ≈ 0.06, diffusion), alternating."""
    return 0.02 if sum(t >= s for s in switches) % 2 else 1.0


def setup(lr: float = 0.5, detector: bool = True):
    p = nn.Parameter(torch.zeros(8))
    opt = torch.optim.SGD([p], lr=lr)
    det = PhaseDetector(window=30, dwell=10, warmup=30) if detector else False
    mon = PhaseMonitor(opt, lenses=[lenses.GradSNR(window=10)], log_every=10, detector=det)
    return p, opt, mon


def drive(p, opt, mon, scheds, steps, switches=(200,), start=0, gen=None):
    """Set gradients whose SNR follows ``level``; step the optimizer and the schedulers."""
    gen = gen or torch.Generator().manual_seed(0)
    lrs = []
    for t in range(start, steps):
        p.grad = level(t, switches) + 0.35 * torch.randn(8, generator=gen)
        opt.step()
        for s in scheds:
            s.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def decays(mon):
    return [e for e in mon.events if e.new == "lr_decay"]


def test_decays_once_when_the_model_enters_diffusion_and_logs_it():
    p, opt, mon = setup()
    sched = PhaseLR(opt, mon, factor=0.1)
    lrs = drive(p, opt, mon, [sched], 400)
    entry = next(e.step for e in mon.events if e.layer == "" and e.new == "diffusion")
    assert 200 < entry < 300
    assert lrs[entry - 2] == 0.5 and lrs[entry - 1] == pytest.approx(0.05)  # lrs[t-1]: step t
    assert lrs[-1] == pytest.approx(0.05) and sched.get_last_lr() == [lrs[-1]]
    (event,) = decays(mon)
    assert (event.step, event.layer, event.old) == (entry, "", "diffusion")
    assert event.evidence == pytest.approx({"lr": 0.05, "old_lr": 0.5, "factor": 0.1})
    logged = [r for r in mon.history.events if r["event"] == "lr_decay"]
    assert len(logged) == 1 and logged[0]["step"] == entry and logged[0]["evidence/lr"] == 0.05
    mon.close()


def test_each_later_entry_decays_again_after_the_cooldown():
    switches = (200, 500, 700)  # diffusion, drift, diffusion again
    p, opt, mon = setup()
    sched = PhaseLR(opt, mon, factor=0.5)
    drive(p, opt, mon, [sched], 1000, switches)
    entries = [e.step for e in mon.events if e.layer == "" and e.new == "diffusion"]
    assert len(entries) == 2 and [e.step for e in decays(mon)] == entries
    assert opt.param_groups[0]["lr"] == pytest.approx(0.125)
    mon.close()
    # the same run with a cooldown longer than the gap: the second decay waits for it
    p, opt, mon = setup()
    sched = PhaseLR(opt, mon, factor=0.5, cooldown_steps=600)
    drive(p, opt, mon, [sched], 1000, switches)
    first, second = [e.step for e in decays(mon)]
    assert first == entries[0] and second == first + 600 > entries[1]
    mon.close()


def whole_model(mon, new="diffusion"):
    return [(e.step, e.old) for e in mon.events if e.layer == "" and e.new == new]


def test_no_decay_when_the_run_enters_diffusion_straight_from_the_warm_up():
    """SNR below 1 from the first record: warmup → diffusion is no transition the run showed."""
    p, opt, mon = setup()
    sched = PhaseLR(opt, mon, factor=0.1)
    lrs = drive(p, opt, mon, [sched], 400, switches=(0,))
    ((entry, old),) = whole_model(mon)
    assert old == "warmup" and entry <= 50
    assert decays(mon) == [] and set(lrs) == {0.5} and sched.decays == 0
    assert sched.entered_from == "warmup"
    mon.close()
    # from_warmup=True: the earlier rule, a cut at the warm-up's end
    p, opt, mon = setup()
    sched = PhaseLR(opt, mon, factor=0.1, from_warmup=True)
    lrs = drive(p, opt, mon, [sched], 400, switches=(0,))
    assert [e.step for e in decays(mon)] == [entry]
    assert lrs[entry - 2] == 0.5 and lrs[entry - 1] == pytest.approx(0.05)
    mon.close()


def test_warm_up_entry_then_drift_then_diffusion_decays_at_the_drift_entry_only():
    p, opt, mon = setup()
    sched = PhaseLR(opt, mon, factor=0.1)
    lrs = drive(p, opt, mon, [sched], 800, switches=(0, 300, 500))
    entries = whole_model(mon)
    assert [old for _, old in entries] == ["warmup", "drift"]
    second = entries[1][0]
    assert 500 < second < 600 and [e.step for e in decays(mon)] == [second]
    assert lrs[second - 2] == 0.5 and lrs[second - 1] == pytest.approx(0.05)
    mon.close()


def test_the_return_to_diffusion_after_a_loss_spike_kick_decays():
    """A spike kicks the whole model from diffusion to drift; its return is a drift entry."""
    p = nn.Parameter(torch.zeros(8))
    opt = torch.optim.SGD([p], lr=0.5)
    det = PhaseDetector(window=30, dwell=10, warmup=30, spike_window=200)
    mon = PhaseMonitor(opt, lenses=[lenses.GradSNR(window=10)], log_every=10, detector=det)
    sched = PhaseLR(opt, mon, factor=0.1)
    gen = torch.Generator().manual_seed(0)
    for t in range(600):
        p.grad = 0.02 + 0.35 * torch.randn(8, generator=gen)  # diffusion throughout
        loss = 1.0 + 0.01 * float(torch.randn((), generator=gen))
        mon.observe(loss=loss * (30.0 if 300 <= t < 310 else 1.0))  # one record's jump
        opt.step()
        sched.step()
    spike = next(e.step for e in mon.events if e.new == "spike")
    entries = whole_model(mon)
    assert [old for _, old in entries] == ["warmup", "drift"] and entries[1][0] > spike
    assert whole_model(mon, "drift") == [(spike, "diffusion")]
    assert [e.step for e in decays(mon)] == [entries[1][0]]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    mon.close()


def test_patience_and_min_lr():
    p, opt, mon = setup()
    sched = PhaseLR(opt, mon, factor=0.1, min_lr=0.1, patience_steps=50)
    lrs = drive(p, opt, mon, [sched], 400)
    entry = next(e.step for e in mon.events if e.layer == "" and e.new == "diffusion")
    assert lrs[entry + 49 - 1] == 0.5 and lrs[entry + 50 - 1] == 0.1  # floored at min_lr
    mon.close()


def test_chains_with_warm_up_like_any_chainable_scheduler():
    """LinearLR warm-up stepped beside PhaseLR, or both in a ChainedScheduler: same rates."""
    runs = []
    for chained in (False, True):
        p, opt, mon = setup()
        warm = LinearLR(opt, start_factor=0.1, total_iters=100)
        phase = PhaseLR(opt, mon, factor=0.1)
        scheds = [ChainedScheduler([warm, phase])] if chained else [warm, phase]
        runs.append(drive(p, opt, mon, scheds, 400))
        entry = next(e.step for e in mon.events if e.layer == "" and e.new == "diffusion")
        mon.close()
    assert runs[0] == runs[1]
    lrs = runs[0]
    for t in range(1, 401):  # rate after step t: warm-up factor times 0.1 from the entry on
        warm_factor = min(1.0, 0.1 + 0.9 * t / 100)
        assert lrs[t - 1] == pytest.approx(0.5 * warm_factor * (0.1 if t >= entry else 1.0))


def test_checkpoint_resume_gives_identical_rates_and_events():
    steps, cut, switches = 1000, 350, (200, 500, 700)
    p, opt, mon = setup()
    sched = PhaseLR(opt, mon, factor=0.5, cooldown_steps=600)
    step_lr = StepLR(opt, step_size=300, gamma=0.9)
    gen = torch.Generator().manual_seed(0)
    ref = drive(p, opt, mon, [sched, step_lr], steps, switches, gen=gen)
    ref_events = mon.events
    mon.close()

    p, opt, mon = setup()
    sched = PhaseLR(opt, mon, factor=0.5, cooldown_steps=600)
    step_lr = StepLR(opt, step_size=300, gamma=0.9)
    gen = torch.Generator().manual_seed(0)
    head = drive(p, opt, mon, [sched, step_lr], cut, switches, gen=gen)
    buf = io.BytesIO()
    torch.save(
        {
            "opt": opt.state_dict(),
            "mon": mon.state_dict(),
            "sched": sched.state_dict(),
            "step": step_lr.state_dict(),
            "gen": gen.get_state(),
        },
        buf,
    )
    mon.close()
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    p, opt, mon = setup(lr=123.0)  # a fresh run: every rate comes from the checkpoint
    sched = PhaseLR(opt, mon, factor=0.5, cooldown_steps=600)
    step_lr = StepLR(opt, step_size=300, gamma=0.9)
    opt.load_state_dict(ckpt["opt"])
    mon.load_state_dict(ckpt["mon"])
    sched.load_state_dict(ckpt["sched"])
    step_lr.load_state_dict(ckpt["step"])
    gen = torch.Generator()
    gen.set_state(ckpt["gen"])
    tail = drive(p, opt, mon, [sched, step_lr], steps, switches, start=cut, gen=gen)
    assert head + tail == ref
    assert mon.events == ref_events and len(decays(mon)) >= 2
    assert sched.get_last_lr() == [ref[-1]]
    mon.close()


def test_resume_inside_a_warm_up_episode_and_from_an_older_state_dict():
    """A checkpoint taken inside a warm-up episode (no cut due) resumes to the same rates;
    so does a state saved before ``entered_from``/``from_warmup`` existed."""
    steps, cut, switches = 800, 200, (0, 300, 500)
    p, opt, mon = setup()
    sched = PhaseLR(opt, mon, factor=0.1)
    ref = drive(p, opt, mon, [sched], steps, switches, gen=torch.Generator().manual_seed(1))
    ref_events = mon.events
    mon.close()
    assert len(decays(mon)) == 1
    for old_format in (False, True):
        p, opt, mon = setup()
        sched = PhaseLR(opt, mon, factor=0.1)
        gen = torch.Generator().manual_seed(1)
        head = drive(p, opt, mon, [sched], cut, switches, gen=gen)
        state = {"opt": opt.state_dict(), "mon": mon.state_dict(), "sched": sched.state_dict()}
        assert state["sched"]["entered_from"] == "warmup"
        if old_format:
            del state["sched"]["entered_from"], state["sched"]["from_warmup"]
        buf = io.BytesIO()
        torch.save(state, buf)
        mon.close()
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True)
        p, opt, mon = setup(lr=123.0)
        sched = PhaseLR(opt, mon, factor=0.1)
        opt.load_state_dict(ckpt["opt"])
        mon.load_state_dict(ckpt["mon"])
        sched.load_state_dict(ckpt["sched"])
        tail = drive(p, opt, mon, [sched], steps, switches, start=cut, gen=gen)
        assert head + tail == ref and mon.events == ref_events
        mon.close()


def test_bad_arguments_name_themselves():
    p, opt, mon = setup()
    for factor in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"factor=.*\(0, 1\)"):
            PhaseLR(opt, mon, factor=factor)
    with pytest.raises(TypeError, match="factor"):
        PhaseLR(opt, mon, factor="0.1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"monitor.*PhaseMonitor"):
        PhaseLR(opt, object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_lr"):
        PhaseLR(opt, mon, min_lr=[0.0, 0.0])
    with pytest.raises(ValueError, match="patience_steps"):
        PhaseLR(opt, mon, patience_steps=-1)
    with pytest.raises(TypeError, match="cooldown_steps"):
        PhaseLR(opt, mon, cooldown_steps=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="from_warmup"):
        PhaseLR(opt, mon, from_warmup="yes")  # type: ignore[arg-type]
    other = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match="another optimizer"):
        PhaseLR(other, mon)
    mon.close()
    with pytest.raises(ValueError, match=r"monitor is closed.*PhaseMonitor\(opt"):
        PhaseLR(opt, mon)  # said: "watches another optimizer (NoneType at 0x...)"
    p, opt, mon = setup(detector=False)
    with pytest.raises(ValueError, match="no phase detector"):
        PhaseLR(opt, mon)
    mon.close()


def test_monitor_log_event_reaches_sinks_with_or_without_a_detector():
    from sgdlens import PhaseEvent

    for detector in (True, False):
        p, opt, mon = setup(detector=detector)
        event = PhaseEvent(7, "", "diffusion", "lr_decay", {"lr": 0.05})
        mon.log_event(event)
        assert [r["event"] for r in mon.history.events] == ["lr_decay"]
        assert mon.history.events[0]["evidence/lr"] == 0.05
        assert mon.events == ([event] if detector else [])
        with pytest.raises(TypeError, match="PhaseEvent"):
            mon.log_event({"step": 7})  # type: ignore[arg-type]
        mon.close()


# -- trigger="stationary": SASA's test of Yaida's relation (sgdlens.stationarity) --------------


def quadratic(lr=0.05, detector=False):
    p = nn.Parameter(torch.full((16,), 4.0))
    opt = torch.optim.SGD([p], lr=lr, momentum=0.9)
    mon = PhaseMonitor(opt, lenses=[lenses.GradSNR(window=10)], log_every=10, detector=detector)
    return p, opt, mon


def stationary(opt, mon):
    from sgdlens.stationarity import StationarityTest

    return PhaseLR(opt, mon, factor=0.5, trigger=StationarityTest(test_every=20, min_samples=40))


def drive_quadratic(p, opt, scheds, steps, start=0, gen=None):
    h = torch.linspace(0.1, 1.0, 16)
    gen = gen or torch.Generator().manual_seed(0)
    lrs = []
    for _ in range(start, steps):
        p.grad = h * (p.detach() - 1.0) + 0.5 * torch.randn(16, generator=gen)
        opt.step()
        for s in scheds:
            s.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_stationary_trigger_resumes_with_identical_rates():
    steps, cut = 1200, 430
    p, opt, mon = quadratic()
    sched = stationary(opt, mon)
    ref = drive_quadratic(p, opt, [sched], steps, gen=torch.Generator().manual_seed(0))
    ref_events = [r for r in mon.history.events if r["event"] == "lr_decay"]
    mon.close()
    assert len(ref_events) >= 2 and any(0 < r["step"] - cut < 200 for r in ref_events)

    p, opt, mon = quadratic()
    sched = stationary(opt, mon)
    gen = torch.Generator().manual_seed(0)
    head = drive_quadratic(p, opt, [sched], cut, gen=gen)
    buf = io.BytesIO()
    torch.save(
        {
            "p": p.detach().clone(),
            "opt": opt.state_dict(),
            "mon": mon.state_dict(),
            "sched": sched.state_dict(),
            "gen": gen.get_state(),
        },
        buf,
    )
    mon.close()
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    p, opt, mon = quadratic(lr=123.0)
    sched = stationary(opt, mon)
    with torch.no_grad():
        p.copy_(ckpt["p"])
    opt.load_state_dict(ckpt["opt"])
    mon.load_state_dict(ckpt["mon"])
    sched.load_state_dict(ckpt["sched"])
    gen = torch.Generator()
    gen.set_state(ckpt["gen"])
    tail = drive_quadratic(p, opt, [sched], steps, start=cut, gen=gen)
    assert head + tail == ref
    events = [r for r in mon.history.events if r["event"] == "lr_decay"]
    assert [r["step"] for r in events] == [r["step"] for r in ref_events if r["step"] > cut]
    mon.close()


def test_stationary_trigger_chains_and_waits_for_the_warm_up():
    """Beside a LinearLR warm-up or inside a ChainedScheduler: the same rates; no test while
    another scheduler changes the rate (a change starts a new stretch at the current rates)."""
    runs = []
    for chained in (False, True):
        p, opt, mon = quadratic()
        warm = LinearLR(opt, start_factor=0.1, total_iters=100)
        phase = stationary(opt, mon)
        scheds = [ChainedScheduler([warm, phase])] if chained else [warm, phase]
        runs.append(drive_quadratic(p, opt, scheds, 600))
        cuts = [r["step"] for r in mon.history.events if r["event"] == "lr_decay"]
        mon.close()
    assert runs[0] == runs[1] and cuts
    assert cuts[0] >= 100 + 80  # the warm-up, then a window of at least 40 (half of 80) steps
    lrs = runs[0]
    for t in range(1, 601):
        warm_factor = min(1.0, 0.1 + 0.9 * t / 100)
        assert lrs[t - 1] == pytest.approx(0.05 * warm_factor * 0.5 ** sum(t >= c for c in cuts))


def test_stationary_trigger_bad_arguments():
    from sgdlens.stationarity import StationarityTest

    p, opt, mon = quadratic()
    with pytest.raises(ValueError, match=r"trigger='bogus'.*'drift', 'stationary'"):
        PhaseLR(opt, mon, trigger="bogus")
    with pytest.raises(ValueError, match="min_samples"):
        PhaseLR(opt, mon, trigger=StationarityTest(min_samples=2))
    assert PhaseLR(opt, mon, trigger="stationary").trigger == "stationary"  # no detector needed
    with pytest.raises(ValueError, match="no phase detector"):
        PhaseLR(opt, mon)  # the drift trigger needs one
    mon.close()


def test_stationary_trigger_refuses_other_optimizers_and_mismatched_states():
    p = nn.Parameter(torch.zeros(4))
    adam = torch.optim.Adam([p], lr=0.1)
    mon = PhaseMonitor(adam, log_every=10, detector=False)
    with pytest.raises(ValueError, match=r"trigger='stationary'.*torch.optim.SGD"):
        PhaseLR(adam, mon, trigger="stationary")
    mon.close()
    p, opt, mon = setup()
    sched = PhaseLR(opt, mon, trigger="stationary")
    with pytest.raises(ValueError, match="trigger='drift'"):
        sched.load_state_dict(PhaseLR(opt, mon).state_dict())
    mon.close()
    sgd = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1, maximize=True)
    mon = PhaseMonitor(sgd, log_every=10, detector=False)
    with pytest.raises(ValueError, match="maximize"):
        PhaseLR(sgd, mon, trigger="stationary")
    mon.close()


@pytest.mark.parametrize("trigger", ["drift", "stationary"])
def test_a_closed_monitor_holds_the_rate(trigger):
    """After ``monitor.close()`` no step reaches the monitor: the scheduler holds the rate
    (the stationary test kept cutting, its events lost)."""
    if trigger == "stationary":
        p, opt, mon = quadratic()
        sched = stationary(opt, mon)
        lrs = drive_quadratic(p, opt, [sched], 100)
        mon.close()
        lrs += drive_quadratic(p, opt, [sched], 1200, start=100)
    else:
        p, opt, mon = setup()
        sched = PhaseLR(opt, mon, factor=0.1)
        lrs = drive(p, opt, mon, [sched], 150)
        mon.close()
        lrs += drive(p, opt, mon, [sched], 400, start=150)
    assert set(lrs[100:]) == {lrs[99]}
