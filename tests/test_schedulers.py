"""PhaseLR: torch's scheduler protocol, decays at diffusion entries, clear errors."""

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
    torch.save({"opt": opt.state_dict(), "mon": mon.state_dict(), "sched": sched.state_dict(),
                "step": step_lr.state_dict(), "gen": gen.get_state()}, buf)  # fmt: skip
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
    other = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match="another optimizer"):
        PhaseLR(other, mon)
    mon.close()
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
