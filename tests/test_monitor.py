"""PhaseMonitor: the no-change guarantee, attaching, non-finite steps, checkpoints, sparse grads."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from torch import nn

from sgdlens import PhaseMonitor, lenses
from sgdlens.sinks import JSONLSink
from tests._reference import window_snr_fast
from tests._train import OPTIMIZERS, batches, make_model, train


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_training_is_bit_for_bit_unchanged(opt_name):
    bare, bare_opt, _, _ = train(opt_name, 50)
    watched, opt, mon, _ = train(opt_name, 50, {"log_every": 7})
    assert mon.step == 50 and len(mon.history) == 7
    for a, b in zip(bare.parameters(), watched.parameters()):
        assert torch.equal(a, b)
    assert _same(bare_opt.state_dict(), opt.state_dict())


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_layers_follow_modules_or_param_groups():
    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.LayerNorm(3), nn.Linear(3, 1)))
    opt = torch.optim.SGD(
        [{"params": model[0].parameters()}, {"params": model[1].parameters()}], lr=0.1
    )
    with PhaseMonitor(opt, model=model) as mon:
        assert mon.view.layers == ("0", "1.0", "1.1")
    with PhaseMonitor(opt) as mon:
        assert mon.view.layers == (
            "group0.0",
            "group0.1",
            "group1.0",
            "group1.1",
            "group1.2",
            "group1.3",
        )
    lin = nn.Linear(2, 2)
    with PhaseMonitor(torch.optim.SGD(lin.parameters(), lr=0.1), model=lin) as mon:
        assert mon.view.layers == ("model",)


def test_close_removes_every_hook_and_wrap_of_find_the_monitor():
    model = make_model()
    opt = PhaseMonitor.wrap(torch.optim.AdamW(model.parameters()), model=model, log_every=1)
    assert isinstance(opt, torch.optim.AdamW)
    mon = PhaseMonitor.of(opt)
    n_pre, n_post = len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)
    assert (n_pre, n_post) == (1, 1)
    with pytest.raises(ValueError, match="already has a PhaseMonitor"):
        PhaseMonitor(opt)
    mon.close()
    mon.close()  # idempotent
    assert len(opt._optimizer_step_pre_hooks) == 0 and len(opt._optimizer_step_post_hooks) == 0
    with pytest.raises(LookupError, match="no PhaseMonitor"):
        PhaseMonitor.of(opt)
    model(torch.randn(2, 5)).sum().backward()
    opt.step()
    assert mon.step == 0 and len(mon.history) == 0


def test_framework_wrappers_are_unwrapped():
    class Wrapper:  # like accelerate's AcceleratedOptimizer / Lightning's LightningOptimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

    model = make_model()
    real = torch.optim.SGD(model.parameters(), lr=0.1)
    with PhaseMonitor(Wrapper(Wrapper(real)), model=model) as mon:
        assert mon.optimizer is real
        assert PhaseMonitor.of(Wrapper(real)) is mon


def test_lr_scheduler_and_state_dict_unaffected():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=20)
    keys_before = set(opt.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with PhaseMonitor(opt, model=model, log_every=5) as mon:
            for x, y in batches(20):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                sched.step()
    assert set(opt.state_dict()) == keys_before and mon.step == 20


def _null_run(grad_seq, lens, log_every):
    """Feed a sequence of gradients through SGD(lr=0): weights never move."""
    p = nn.Parameter(torch.zeros(grad_seq[0].shape))
    opt = torch.optim.SGD([p], lr=0.0)
    with PhaseMonitor(opt, lenses=[lens], log_every=log_every) as mon:
        for g in grad_seq:
            p.grad = g.clone()
            opt.step()
    return mon


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_steps_are_counted_and_skipped(bad, mask_path):
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(6, generator=gen) + 1.0 for _ in range(10)]
    poisoned = [g.clone() for g in grads]
    poisoned[3][2] = bad
    mon = _null_run(poisoned + grads, lenses.GradSNR(window=10), 10)
    rec, after = mon.history.records
    m, s, snr = window_snr_fast([g.double() for i, g in enumerate(grads) if i != 3])
    assert rec["nonfinite_steps"] == after["nonfinite_steps"] == 1
    if mask_path == "host-branch":  # the CPU skips the step exactly
        assert rec["grad_mean"] == pytest.approx(m, rel=1e-6)
        assert rec["grad_std"] == pytest.approx(s, rel=1e-5)
    else:  # sync-free: the window holding it reports non-finite values
        assert not math.isfinite(rec["grad_snr"]) and not math.isfinite(rec["grad_std"])
    # the next window starts clean
    m, s, snr = window_snr_fast([g.double() for g in grads])
    assert after["grad_mean"] == pytest.approx(m, rel=1e-6)
    assert after["grad_std"] == pytest.approx(s, rel=1e-5)
    ema, ema_after = _null_run(poisoned + grads, lenses.GradSNR(decay=0.9), 10).history.records
    if mask_path == "host-branch":  # the EMA skips it too: as if that step never was
        ref = _null_run([g for i, g in enumerate(grads) if i != 3], lenses.GradSNR(decay=0.9), 9)
        assert ema["grad_snr"] == pytest.approx(ref.history.records[-1]["grad_snr"], rel=1e-6)
    else:  # one fused lerp per step: the next log point reports it, and the EMA restarts
        assert not math.isfinite(ema["grad_snr"]) and not math.isfinite(ema["grad_std"])
        ref = _null_run(grads, lenses.GradSNR(decay=0.9), 10).history.records[-1]
        assert ema_after["grad_snr"] == pytest.approx(ref["grad_snr"], rel=1e-6)
        assert ema_after["grad_std"] == pytest.approx(ref["grad_std"], rel=1e-6)


def test_nonfinite_gradient_norm_is_reported_not_hidden():
    grads = [torch.ones(3), torch.tensor([1.0, float("inf"), 0.0])]
    mon = _null_run(grads, lenses.GradNorm(), 1)
    assert mon.history.records[0]["grad_norm"] == pytest.approx(math.sqrt(3))
    assert mon.history.records[1]["grad_norm"] == math.inf
    assert mon.history.records[1]["nonfinite_steps"] == 1


def test_missing_gradient_counts_as_zero():
    p, q = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p, q], lr=0.0)
    with PhaseMonitor(opt, lenses=[lenses.GradSNR(window=2)], log_every=2) as mon:
        p.grad, q.grad = torch.ones(2), torch.ones(2)
        opt.step()
        q.grad = None
        opt.step()
    rec = mon.history.records[-1]
    m, s, _ = window_snr_fast(
        [torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)]
    )
    assert rec["grad_mean/group0.1"] == pytest.approx(m) and rec[
        "grad_std/group0.1"
    ] == pytest.approx(s)


@pytest.mark.parametrize("decay", [None, 0.9])
def test_sparse_gradients(decay, mask_path):
    torch.manual_seed(0)
    emb = nn.Embedding(20, 4, sparse=True)
    opt = torch.optim.SparseAdam(list(emb.parameters()), lr=0.01)
    lens = lenses.GradSNR(window=4) if decay is None else lenses.GradSNR(decay=decay)
    grads = []
    with PhaseMonitor(
        opt, model=emb, lenses=[lens, lenses.GradNorm(), lenses.WeightNorms()], log_every=4
    ) as mon:
        for _ in range(8):
            opt.zero_grad()
            idx = torch.randint(0, 20, (6,))
            emb(idx).pow(2).sum().backward()
            assert emb.weight.grad.is_sparse
            grads.append(emb.weight.grad.to_dense().double().reshape(-1))
            opt.step()
    rec = mon.history.records[-1]
    if decay is None:
        m, s, _ = window_snr_fast(grads[4:])
        assert rec["grad_mean/model"] == pytest.approx(m, rel=1e-6)
        assert rec["grad_std/model"] == pytest.approx(s, rel=1e-5)
    assert rec["grad_norm"] == pytest.approx(float(grads[-1].norm()), rel=1e-6)


@pytest.mark.parametrize(
    "lens_list", [None, [lenses.GradSNR(decay=0.95), lenses.WeightNorms()], "full"]
)
def test_resume_from_checkpoint_gives_identical_records(lens_list):
    """Everything a lens carries across steps is in its state: a fresh monitor with fresh
    lenses ("full": every lens, per-sample ones included) resumes mid-window exactly."""
    data = batches(60)

    def run(model, opt, mon, chunk):
        for x, y in chunk:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            mon.observe(loss=loss)
            opt.step()

    def fresh():
        model = make_model()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        chosen = lenses.full() if lens_list == "full" else lens_list
        return model, opt, PhaseMonitor(opt, model=model, lenses=chosen, log_every=10)

    torch.manual_seed(5)
    model, opt, mon = fresh()
    run(model, opt, mon, data)
    full = [{k: v for k, v in r.items() if k != "time"} for r in mon.history.records]

    torch.manual_seed(5)
    model, opt, mon = fresh()
    run(model, opt, mon, data[:35])  # mid-window
    buf = io.BytesIO()
    rng = torch.get_rng_state()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "mon": mon.state_dict()}, buf)
    mon.close()
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model, opt, mon = fresh()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    mon.load_state_dict(ckpt["mon"])
    torch.set_rng_state(rng)
    run(model, opt, mon, data[35:])
    resumed = [{k: v for k, v in r.items() if k != "time"} for r in mon.history.records]
    assert resumed == full[3:]


def test_load_state_dict_rejects_other_monitors():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with PhaseMonitor(opt, model=model, lenses=[lenses.GradNorm()]) as mon:
        sd = mon.state_dict()
    with PhaseMonitor(opt, model=model) as other:
        with pytest.raises(ValueError, match="lenses"):
            other.load_state_dict(sd)
        with pytest.raises(ValueError, match="state_dict"):
            other.load_state_dict({"step": 3})


def test_jsonl_sink_appends_and_load_reads_back(tmp_path):
    import sgdlens

    path = tmp_path / "runs" / "a.jsonl"
    for _ in range(2):  # a second run appends to the same file
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with PhaseMonitor(opt, model=model, sinks=[JSONLSink(path)], log_every=5) as mon:
            for x, y in batches(10):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
    run = sgdlens.load(path)  # the last run; each run has its own id
    assert len(run) == 2 and run["step"].tolist() == [5, 10] and len(sgdlens.runs(path)) == 2
    assert run.records == mon.history.records and run.header == mon.history.header
    with open(path, "a") as f:  # a crash mid-write leaves a truncated line
        f.write('{"step": 15, "grad_sn')
    assert len(sgdlens.load(path)) == 2


def test_broken_sink_warns_and_training_continues():
    def broken(record):
        raise OSError("disk full")

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with PhaseMonitor(opt, model=model, sinks=[broken], log_every=1) as mon:
        with pytest.warns(UserWarning, match="disk full"):
            for x, y in batches(3):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
    assert len(mon.history) == 3


def test_observe_averages_between_records_and_validates():
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.0)
    with PhaseMonitor(opt, lenses=[], log_every=2) as mon:
        for v in [1.0, torch.tensor(3.0), 5.0, 7.0]:
            p.grad = torch.ones(2)
            mon.observe(loss=v)  # before step(): the loss of the batch that drives this step
            opt.step()
        with pytest.raises(ValueError, match="single number"):
            mon.observe(loss=torch.ones(3))
        with pytest.raises(TypeError, match="loss"):
            mon.observe(loss="high")
    assert mon.history["loss"].tolist() == [2.0, 6.0]


def test_param_group_added_later_warns():
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.0)
    with PhaseMonitor(opt, log_every=1) as mon:
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})
        p.grad = torch.ones(2)
        with pytest.warns(UserWarning, match="add_param_group"):
            opt.step()
    assert mon.step == 1


def test_phase_events_reach_history_sinks_and_callbacks(tmp_path):
    import sgdlens

    gen = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.zeros(8))
    opt = torch.optim.SGD([p], lr=0.0)
    seen = []
    path = tmp_path / "run.jsonl"
    with PhaseMonitor(
        opt, lenses=[lenses.GradSNR(window=20)], log_every=20, sinks=[JSONLSink(path)]
    ) as mon:
        mon.on_phase_change(seen.append)
        for t in range(40 * 20):
            mean = 1.0 if t < 20 * 20 else 0.02  # SNR ≈ 2.8 for 20 records, then ≈ 0.06
            p.grad = mean + 0.35 * torch.randn(8, generator=gen)
            mon.observe(loss=1.0 / (1 + t))
            opt.step()
    kinds = [(e.layer, e.old, e.new) for e in mon.events]
    assert kinds == [
        ("group0.0", "warmup", "drift"),
        ("", "warmup", "drift"),
        ("group0.0", "drift", "diffusion"),
        ("", "drift", "diffusion"),
    ]
    assert (
        seen == mon.events and mon.phase == "diffusion" and mon.phases == {"group0.0": "diffusion"}
    )
    switch = mon.events[-1].step
    # the first record past the change (step 420) plus the documented delay at 20-step records:
    # ((n - 1) // 2) * k + ceil(dwell / k) * k = 120 + 100 steps (window 250, dwell 100)
    assert switch == 20 * 20 + 20 + 220
    assert mon.history.records[-1]["phase"] == "diffusion"
    run = sgdlens.load(path)
    assert len(run) == 40 and [e["event"] for e in run.events] == [
        "drift",
        "drift",
        "diffusion",
        "diffusion",
    ]
    last = run.events[-1]
    assert last["trace/step"] == list(range(switch - 19, switch + 1))
    assert last["trace/loss"][-1] == pytest.approx(1.0 / switch)
    assert all(v > 0 for v in last["trace/grad_norm"])
    assert "evidence/snr_median" in last
