"""PhaseMonitor(overhead_budget=...): the lenses read a sample of the steps."""

import copy
import math

import pytest
import torch
from torch import nn

from sgdlens import PhaseMonitor, lenses
from sgdlens._sampler import Sampler
from tests._reference import window_snr_fast


def _fixed(every):
    """A sampler that reads every ``every``-th step from the start (no timing)."""

    def adapt(self):
        self.every = every

    return adapt


def _null_run(grads, every, log_every, monkeypatch, lens=None):
    monkeypatch.setattr(Sampler, "adapt", _fixed(every))
    p = nn.Parameter(torch.zeros(grads[0].shape))
    opt = torch.optim.SGD([p], lr=0.0)
    mon = PhaseMonitor(
        opt,
        lenses=[lens or lenses.GradSNR()],
        log_every=log_every,
        overhead_budget=0.05,
        trace_steps=log_every,
    )
    mon.sampler.every = every
    for g in grads:
        p.grad = g.clone()
        opt.step()
    mon.close()
    return mon


def test_window_statistics_are_exact_over_the_steps_read(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(6, generator=gen) + 0.5 for _ in range(40)]
    mon = _null_run(grads, 5, 20, monkeypatch)
    assert [r["step"] for r in mon.history] == [20, 40]
    for rec, first in zip(mon.history, (0, 20)):
        read = [grads[first + i - 1].double() for i in (5, 10, 15, 20)]
        m, s, snr = window_snr_fast(read)
        assert rec["update_every"] == 5
        assert rec["grad_mean"] == pytest.approx(m, rel=1e-6)
        assert rec["grad_std"] == pytest.approx(s, rel=1e-5)
        assert rec["grad_snr"] == pytest.approx(snr, rel=1e-5)


def test_a_window_end_off_the_sample_is_read(monkeypatch):
    """GradSNR(window=12) closes windows at 12, 24, ...: read even when 5 does not divide."""
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(4, generator=gen) + 1.0 for _ in range(24)]
    mon = _null_run(grads, 5, 24, monkeypatch, lens=lenses.GradSNR(window=12))
    read = [grads[i - 1].double() for i in (15, 20, 24)]  # the second window: 13..24
    m, s, _ = window_snr_fast(read)
    assert mon.history.records[-1]["grad_mean"] == pytest.approx(m, rel=1e-6)
    assert mon.history.records[-1]["grad_std"] == pytest.approx(s, rel=1e-5)


def test_trace_and_nonfinite_count_cover_the_steps_read(monkeypatch):
    grads = [torch.ones(3) for _ in range(20)]
    grads[9][0] = float("nan")  # step 10: read
    grads[11][0] = float("nan")  # step 12: not read
    mon = _null_run(grads, 5, 20, monkeypatch)
    assert mon.history.records[-1]["nonfinite_steps"] == 1
    trace = mon.tally.trace_lists()
    assert trace["trace/step"] == [5, 10, 15, 20]


def test_sampling_leaves_training_unchanged():
    def run(budget):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 3))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        mon = PhaseMonitor(opt, model=model, log_every=8, overhead_budget=budget)
        gen = torch.Generator().manual_seed(1)
        for _ in range(40):
            x, y = torch.randn(16, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            mon.observe(loss=loss)
            opt.step()
        mon.close()
        return [p.detach().clone() for p in model.parameters()], mon

    bare, _ = run(None)
    with pytest.warns(UserWarning, match=r"overhead_budget=1e-06\) cannot be met"):
        params, mon = run(1e-6)  # a budget nothing meets: read as rarely as allowed
    assert all(torch.equal(a, b) for a, b in zip(bare, params))
    # the first interval reads every step; from its end on at most log_every // 4 apart
    assert [r["update_every"] for r in mon.history.records] == [1, 2, 2, 2, 2]
    assert all(math.isfinite(r["grad_snr"]) for r in mon.history.records)


def test_the_controller_sets_every_from_the_timing(monkeypatch):
    clock = iter([0.0, 1.0])
    monkeypatch.setattr("sgdlens._sampler.time.perf_counter", lambda: next(clock))
    s = Sampler(0.05, log_every=400)
    s.begin()  # the first step starts the interval
    # 100 steps in 1 s, 0.2 s of it in the hooks, all 100 read: 2 ms per read against 8 ms
    # per step outside the hooks; 5 % of 8 ms is 0.4 ms, so read every 5th step
    s._busy, s._read_time, s._reads, s._steps = 0.2, 0.2, 100, 100
    s.adapt()
    assert s.every == 5


def _adapted(monkeypatch, end, busy, read_time, reads, steps, ended, probes=0.0):
    """``every`` after one interval from time 0 to ``end`` (the clock is mocked)."""
    clock = iter([0.0, end])  # the interval's start; its end, after the log work
    monkeypatch.setattr("sgdlens._sampler.time.perf_counter", lambda: next(clock))
    s = Sampler(0.05, log_every=400)
    s.begin()
    s._busy, s._read_time, s._reads, s._steps = busy, read_time, reads, steps
    s._ended = ended  # the last step's per-step work ended here; the log work came after
    s.exclude(probes)
    s.adapt()
    return s.every


def test_the_controller_counts_skipped_steps_and_the_log_work(monkeypatch):
    # 100 steps in 1 s: 20 reads of 2 ms, 80 skipped steps of 0.1 ms, 12 ms of log work, so
    # 9.4 ms per step outside the monitor; 5 % of it is 0.47 ms, of which skips and the log
    # take 0.1 + 0.12 ms: the reads get 0.25 ms a step, read one step in ceil(1.9 / 0.25) = 8
    assert _adapted(monkeypatch, 1.0, 0.048, 0.04, 20, 100, ended=0.988) == 8
    # the same interval with 0.5 s of scheduled probes in the log work: left out, same answer
    assert _adapted(monkeypatch, 1.5, 0.048, 0.04, 20, 100, ended=0.988, probes=0.5) == 8
    # a budget the skipped steps and the log already spend: as rarely as allowed (limit 100)
    with pytest.warns(UserWarning, match="cannot be met"):
        assert _adapted(monkeypatch, 1.0, 0.1, 0.05, 10, 100, ended=0.5) == 100


def test_time_between_a_log_point_and_the_next_step_is_not_a_step(monkeypatch):
    """An evaluation after a log point must not make the steps look longer (and the reads
    cheaper): the next interval starts at its first step."""
    clock = iter([0.0, 1.0, 11.0, 12.0])  # interval, 10 s of evaluation, the same interval
    monkeypatch.setattr("sgdlens._sampler.time.perf_counter", lambda: next(clock))
    s = Sampler(0.05, log_every=400)
    every = []
    for _ in range(2):
        s.begin()
        s._busy, s._read_time, s._reads, s._steps = 0.2, 0.2, 100, 100
        s.adapt()
        every.append(s.every)
    assert every == [5, 5]  # counting the evaluation as steps would read every step


def test_a_budget_the_sparsest_sampling_cannot_meet_is_reported(monkeypatch):
    import warnings

    with warnings.catch_warnings():  # met (the first interval above): nothing said
        warnings.simplefilter("error")
        _adapted(monkeypatch, 1.0, 0.048, 0.04, 20, 100, ended=0.988)
    # 5 ms of log work per 4 ms step: no sampling can bring that under 5 %
    with pytest.warns(
        UserWarning,
        match=r"overhead_budget=0.05\) cannot be met here: even "
        r"reading one step in 100 .* 123.8% of it the log point's own work .*"
        r"raise log_every",
    ):
        assert _adapted(monkeypatch, 1.0, 0.1, 0.05, 10, 100, ended=0.5) == 100


@pytest.mark.parametrize("budget", [0, -0.1, 1.5, "3%", True])
def test_a_bad_budget_is_refused(budget):
    with pytest.raises(ValueError, match="overhead_budget"):
        PhaseMonitor(torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1), overhead_budget=budget)


def test_per_sample_lenses_still_update_every_step(monkeypatch):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    gen = torch.Generator().manual_seed(2)
    data = [
        (torch.randn(8, 4, generator=gen), torch.randint(0, 2, (8,), generator=gen))
        for _ in range(16)
    ]

    def run(sampled):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        kwargs = {"overhead_budget": 0.05} if sampled else {}
        mon = PhaseMonitor(
            opt,
            model=model,
            log_every=8,
            lenses=[lenses.NoiseScale("per_sample", decay=0.5)],
            **kwargs,
        )
        mon.sampler.every = 4 if sampled else 1
        for x, y in data:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        mon.close()
        return mon.history.records[-1]

    monkeypatch.setattr(Sampler, "adapt", _fixed(4))
    plain, sampled = run(False), run(True)
    assert sampled["noise_scale"] == pytest.approx(plain["noise_scale"], rel=1e-12)


def test_a_monitor_without_a_budget_reads_every_step_after_a_sampled_checkpoint():
    def make(budget):
        model = nn.Linear(3, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return model, opt, PhaseMonitor(opt, model=model, log_every=20, overhead_budget=budget)

    _, _, sampled = make(0.01)
    sampled.sampler.every = 5  # as a log point of a sampled run sets it
    model, opt, mon = make(None)
    mon.load_state_dict(sampled.state_dict())
    for _ in range(40):
        opt.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
    assert mon.tally.updates == 40  # it read 8 of the 40 steps, and its records did not say so
    assert "update_every" not in mon.history.records[-1]
