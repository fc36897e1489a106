"""BatchSNR against per-example gradients from torch.func (float64), and Adam's own moments."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sgdlens import PhaseMonitor
from sgdlens.lenses import BatchSNR
from sgdlens.lenses.base import Step
from sgdlens.lenses.batch_snr import batch_snr_from_sums
from tests.test_noise_scale import REL, build, layer_of, loss_fn, per_sample_grads, rel_err

EPS = 1e-5


def reference(model, x, y, eps=EPS):
    """Per layer and global ``(‖ḡ‖² / tr Var (ddof 1), mean GSNR)`` from per-example grads."""
    ref = per_sample_grads(model, x, y)
    lay = layer_of(model)
    out = {}
    groups = {name: [n for n in ref if lay[n] == name] for name in dict.fromkeys(lay.values())}
    for name, names in [*groups.items(), ("", list(ref))]:
        if not names:  # a tied parameter belongs to its first owner's layer
            continue
        g = torch.cat([ref[n].reshape(ref[n].shape[0], -1) for n in names], 1)
        gbar = g.mean(0)
        snr = gbar.square().sum() / g.var(0, correction=1).sum()
        gsnr = (gbar.square() / (g.var(0, correction=0) + eps)).mean()
        out[name] = (float(snr), float(gsnr))
    return out


def _hooks(model):
    """Forward hooks on the model's modules (the lens's only way in)."""
    return sum(len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("kind", ["mlp", "cnn", "convs", "attention", "gpt2ish", "tied"])
@pytest.mark.parametrize("per_sample", ["auto", "func"])
def test_batch_snr_and_gsnr_match_reference(kind, per_sample):
    model, x, y = build(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = PhaseMonitor(
        opt, model=model, lenses=[BatchSNR(per_sample=per_sample)], log_every=2, detector=False
    )
    engine = mon.lenses[0]._engine
    for step in range(1, 5):
        want = reference(model, x, y) if step % 2 == 0 else None
        opt.zero_grad()
        # hooks are registered only for the forward and backward of a logged step
        assert (_hooks(model) > 0) == (step % 2 == 0)
        loss_fn(model(x), y).backward()
        assert (max(engine.count) > 0) == (step % 2 == 0)
        opt.step()
        if want is None:
            continue
        rec = mon.history.records[-1]
        assert rec["step"] == step
        for name, (snr, gsnr) in want.items():
            key = f"/{name}" if name else ""
            assert rel_err(rec[f"batch_snr{key}"], snr) < REL, name
            assert rel_err(rec[f"gsnr{key}"], gsnr) < REL, name
    mon.close()
    assert _hooks(model) == 0


def test_sum_reduction_and_eps():
    model, x, y = build("mlp")
    want = reference(model, x, y, eps=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = PhaseMonitor(
        opt, model=model, lenses=[BatchSNR(eps=0.0, reduction="sum")], log_every=1, detector=False
    )
    (loss_fn(model(x), y) * x.shape[0]).backward()
    opt.step()
    rec = mon.history.records[-1]
    assert rel_err(rec["batch_snr"], want[""][0]) < REL
    assert rel_err(rec["gsnr"], want[""][1]) < REL
    mon.close()


def test_batch_snr_from_sums_is_the_ddof1_ratio():
    g = torch.randn(7, 4, dtype=torch.float64)
    snr, var = batch_snr_from_sums(g.square().sum(), g.mean(0).square().sum(), 7)
    assert rel_err(var, g.var(0, correction=1).sum()) < 1e-12
    assert rel_err(snr, g.mean(0).square().sum() / g.var(0, correction=1).sum()) < 1e-12


@pytest.mark.parametrize("opt_name", ["adam", "adamw", "nadam", "radam", "adam_amsgrad"])
def test_optimizer_source_reads_adam_moments(opt_name):
    make = {
        "adam": lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.9)),
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        "nadam": lambda p: torch.optim.NAdam(p, lr=1e-2),
        "radam": lambda p: torch.optim.RAdam(p, lr=1e-2),
        "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, foreach=True),
    }[opt_name]
    model, x, y = build("mlp")
    opt = make(model.parameters())
    mon = PhaseMonitor(
        opt, model=model, lenses=[BatchSNR("optimizer")], log_every=3, detector=False
    )
    for _ in range(6):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    rec = mon.history.records[-1]
    b1, b2 = opt.param_groups[0]["betas"]
    lay = layer_of(model)
    per: dict[str, list[float]] = {}
    for (n, p), st in zip(model.named_parameters(), (opt.state[p] for p in model.parameters())):
        t = float(st["step"])
        m = st["exp_avg"].double() / (1 - b1**t)
        v = st["exp_avg_sq"].double() / (1 - b2**t)
        var = (v - m.square()).clamp_min(0)
        acc = per.setdefault(lay[n], [0.0, 0.0, 0.0, 0])
        acc[0] += float(m.square().sum())
        acc[1] += float(var.sum())
        acc[2] += float((m.square() / (var + EPS)).sum())
        acc[3] += p.numel()
    for name, (ms, vs, rs, size) in per.items():
        assert rel_err(rec[f"adam_snr/{name}"], ms / vs) < REL
        assert rel_err(rec[f"adam_gsnr/{name}"], rs / size) < REL
    tot = [sum(v[i] for v in per.values()) for i in range(4)]
    assert rel_err(rec["adam_snr"], tot[0] / tot[1]) < REL
    assert rel_err(rec["adam_gsnr"], tot[2] / tot[3]) < REL
    mon.close()


def test_optimizer_source_before_state_logs_nothing_and_needs_adam():
    model = nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters())
    mon = PhaseMonitor(opt, lenses=[BatchSNR("optimizer")], log_every=1, detector=False)
    assert mon.lenses[0].compute(mon.states[0], Step(mon.view, 0, True)) == {}
    mon.close()
    with pytest.raises(ValueError, match="betas"):
        PhaseMonitor(torch.optim.SGD(model.parameters(), lr=0.1), lenses=[BatchSNR("optimizer")])


def test_nonfinite_logged_step_keeps_the_previous_values(mask_path):
    model, x, y = build("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mon = PhaseMonitor(opt, model=model, lenses=[BatchSNR()], log_every=1, detector=False)
    for bad in (False, True):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        if bad:
            model[0].weight.grad[0, 0] = float("nan")
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        opt.step()
        model.load_state_dict(saved)
    a, b = mon.history.records
    assert math.isfinite(b["batch_snr"]) and b["batch_snr"] == a["batch_snr"]
    assert b["gsnr"] == a["gsnr"]
    mon.close()


def test_validation():
    with pytest.raises(ValueError, match="source='adam'"):
        BatchSNR("adam")
    with pytest.raises(TypeError, match="eps"):
        BatchSNR(eps="small")
    with pytest.raises(ValueError, match="eps=-1"):
        BatchSNR(eps=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        BatchSNR(reduction="none")
    with pytest.raises(ValueError, match="per_sample"):
        BatchSNR(per_sample="vmap")
    opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="needs the model"):
        PhaseMonitor(opt, lenses=[BatchSNR()])
    assert repr(BatchSNR()).startswith("BatchSNR('per_sample'")


def test_close_removes_the_hooks_while_they_are_registered():
    model, x, y = build("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = PhaseMonitor(opt, model=model, lenses=[BatchSNR()], log_every=1, detector=False)
    loss_fn(model(x), y).backward()
    opt.step()
    assert _hooks(model) > 0  # every step logs: always registered
    mon.close()
    assert _hooks(model) == 0
