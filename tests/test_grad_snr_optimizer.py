"""GradSNR(decay="optimizer"): E g is the optimizer's own buffer (SGD momentum, Adam exp_avg).

The reference recomputes, from every step's stored gradient, the weighted means with the
weights the optimizer's recursion gives each past gradient (closed form, float64 loops):

* Adam / AdamW, β₁ per group, t = the tensor's steps: w_k = (1 − β₁) β₁^(t−k) / (1 − β₁ᵗ);
* SGD, momentum μ, dampening d: w_1 ∝ μ^(t−1), w_k ∝ (1 − d) μ^(t−k) for k ≥ 2, normalised
  by W_t = μ^(t−1) + (1 − d)(1 − μ^(t−1))/(1 − μ).
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from sgdlens import PhaseMonitor, lenses

STEPS, LOG = 20, 5
HAS_DECOUPLED = "decoupled_weight_decay" in torch.optim.Adam.__init__.__code__.co_varnames


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def two_groups(model, **kw):
    return [{"params": model[0].parameters(), **kw}, {"params": model[2].parameters()}]


OPTIMIZERS = {
    "adam_two_groups": lambda m: torch.optim.Adam(
        two_groups(m, betas=(0.8, 0.99)), lr=1e-2, betas=(0.95, 0.999)
    ),
    "adamw_weight_decay": lambda m: torch.optim.AdamW(
        m.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.85, 0.999)
    ),
    "adam_maximize_foreach": lambda m: torch.optim.Adam(
        m.parameters(), lr=1e-3, maximize=True, foreach=True
    ),
    "adam_fused": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, fused=True),
    "sgd_dampening": lambda m: torch.optim.SGD(
        two_groups(m, momentum=0.7), lr=0.05, momentum=0.9, dampening=0.1
    ),
    "sgd_fused": lambda m: torch.optim.SGD(
        m.parameters(), lr=0.05, momentum=0.9, dampening=0.2, fused=True
    ),
    "sgd_nesterov": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.8, nesterov=True),
    "sgd_maximize_foreach": lambda m: torch.optim.SGD(
        m.parameters(), lr=1e-3, momentum=0.9, dampening=0.3, maximize=True, foreach=True
    ),
}
if HAS_DECOUPLED:
    OPTIMIZERS["adam_decoupled"] = lambda m: torch.optim.Adam(
        m.parameters(), lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True
    )


def train(make_opt, lens=None, steps=STEPS, drop=(), monitor=True, seed=0, **kw):
    """Train an MLP on fresh random batches; ``drop``: steps (1-based) at which the last
    layer's bias has no gradient. Returns the model, optimizer, monitor and every step's
    gradients (None where absent)."""
    model = mlp(seed)
    opt = make_opt(model)
    lens = lens if lens is not None else lenses.GradSNR(decay="optimizer")
    mon = PhaseMonitor(opt, model=model, lenses=[lens], log_every=LOG, **kw) if monitor else None
    if mon is not None and "overhead_budget" in kw:
        mon.sampler.every = 3  # the other lenses would read steps 3, 5, 6, 9, 10, ...
    g = torch.Generator().manual_seed(seed + 1)
    grads = []
    for t in range(1, steps + 1):
        x = torch.randn(8, 4, generator=g, dtype=torch.float64)
        y = torch.randn(8, 3, generator=g, dtype=torch.float64)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        if t in drop:
            model[2].bias.grad = None
        grads.append([None if p.grad is None else p.grad.clone() for p in model.parameters()])
        opt.step()
    return model, opt, mon, grads


def coefficients(opt):
    """Per parameter: (kind, β₁ or μ, dampening), from the param groups."""
    out = []
    for group in opt.param_groups:
        for _ in group["params"]:
            if "betas" in group:
                out.append(("adam", group["betas"][0], 0.0))
            else:
                out.append(("sgd", group["momentum"], group["dampening"]))
    return out


def weighted(gs, kind, a, d):
    """E g and E‖g‖² of one tensor's gradients ``gs`` (its steps only), closed-form weights."""
    n = len(gs)
    if kind == "adam":
        w = [(1 - a) * a ** (n - k) for k in range(1, n + 1)]
        total = 1 - a**n
    else:
        w = [a ** (n - 1)] + [(1 - d) * a ** (n - k) for k in range(2, n + 1)]
        total = a ** (n - 1) + (1 - d) * (1 - a ** (n - 1)) / (1 - a)
    assert math.isclose(sum(w), total, rel_tol=1e-12)
    mean = sum(wk * g for wk, g in zip(w, gs)) / total
    second = sum(wk * float((g * g).sum()) for wk, g in zip(w, gs)) / total
    return mean, second, total


def reference(grads, coeffs, layer_of):
    """{key: value} at the end of ``grads``, per layer and whole model."""
    msq: dict[str, float] = {}
    sec: dict[str, float] = {}
    for i, (kind, a, d) in enumerate(coeffs):
        gs = [step[i] for step in grads if step[i] is not None]
        layer = layer_of[i]
        msq.setdefault(layer, 0.0)
        sec.setdefault(layer, 0.0)
        if gs:
            mean, second, _ = weighted(gs, kind, a, d)
            msq[layer] += float((mean * mean).sum())
            sec[layer] += second
    out = {}
    for name, (m2, s) in [
        *((k, (msq[k], sec[k])) for k in msq),
        ("", (sum(msq.values()), sum(sec.values()))),
    ]:
        mean, std = math.sqrt(m2), math.sqrt(max(s - m2, 0.0))
        suffix = f"/{name}" if name else ""
        out.update(
            {f"grad_mean{suffix}": mean, f"grad_std{suffix}": std, f"grad_snr{suffix}": mean / std}
        )
    return out


def layer_names(model):
    return [name.rsplit(".", 1)[0] for name, _ in model.named_parameters()]


def check_against_reference(model, opt, mon, grads):
    coeffs, layer_of = coefficients(opt), layer_names(model)
    records = mon.history.records
    assert [r["step"] for r in records] == list(range(LOG, STEPS + 1, LOG))
    for rec in records:
        want = reference(grads[: rec["step"]], coeffs, layer_of)
        assert {k for k in rec if k.startswith("grad_")} == set(want)
        for key, value in want.items():
            assert rec[key] == pytest.approx(value, rel=1e-9, abs=1e-14), key
    # the optimizer's buffer is the weighted mean the reference forms (torch as described)
    sign = -1.0 if opt.param_groups[0]["maximize"] else 1.0
    for i, (p, (kind, a, d)) in enumerate(zip(model.parameters(), coeffs)):
        gs = [step[i] for step in grads if step[i] is not None]
        mean, _, total = weighted(gs, kind, a, d)
        st = opt.state[p]
        if kind == "adam":
            assert float(st["step"]) == len(gs)
            buf = st["exp_avg"]
        else:
            buf = st["momentum_buffer"]
        torch.testing.assert_close(buf, sign * mean * total, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_matches_the_weighted_reference(name, mask_path):
    check_against_reference(*train(OPTIMIZERS[name]))


@pytest.mark.parametrize("name", ["adam_two_groups", "sgd_dampening", "sgd_nesterov"])
def test_a_parameter_without_a_gradient_is_skipped_as_the_optimizer_skips_it(name, mask_path):
    # the last bias has no gradient at step 1 (SGD creates its buffer later), 7 and 10-12
    model, opt, mon, grads = train(OPTIMIZERS[name], drop={1, 7, 10, 11, 12})
    assert grads[0][3] is None and grads[1][3] is not None
    check_against_reference(model, opt, mon, grads)


def test_reads_every_step_under_an_overhead_budget():
    check_against_reference(*train(OPTIMIZERS["sgd_dampening"], overhead_budget=0.001))


def test_equals_its_own_ema_under_adam():
    def adam(m):
        return torch.optim.Adam(m.parameters(), lr=1e-2, betas=(0.9, 0.999))

    _, _, mine, _ = train(adam, lenses.GradSNR(decay="optimizer"))
    _, _, own, _ = train(adam, lenses.GradSNR(decay=0.9))
    assert len(mine.history.records) == len(own.history.records) == STEPS // LOG
    for a, b in zip(mine.history.records, own.history.records):
        keys = {k for k in a if k.startswith("grad_")}
        assert keys == {k for k in b if k.startswith("grad_")} and keys
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=1e-9), k


def test_follows_a_beta_that_changes_during_the_run():
    """OneCycleLR cycles Adam's β₁ (cycle_momentum): the buffer's weights are the products of
    the β₁ of each step, which the lens reads at every step."""
    betas = []
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mon = PhaseMonitor(
        opt, model=model, lenses=[lenses.GradSNR(decay="optimizer")], log_every=STEPS
    )
    g = torch.Generator().manual_seed(1)
    grads = []
    for t in range(STEPS):
        b1 = 0.8 + 0.01 * t
        opt.param_groups[0]["betas"] = (b1, 0.999)
        betas.append(b1)
        opt.zero_grad()
        x = torch.randn(8, 4, generator=g, dtype=torch.float64)
        model(x).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    # weights: w_k = (1 − β_k) Π_{j>k} β_j, normalised by their sum
    w = [(1 - betas[k]) * math.prod(betas[k + 1 :]) for k in range(STEPS)]
    m2 = s = 0.0
    for i in range(4):
        mean = sum(wk * step[i] for wk, step in zip(w, grads)) / sum(w)
        m2 += float((mean * mean).sum())
        s += sum(wk * float(step[i].square().sum()) for wk, step in zip(w, grads)) / sum(w)
    rec = mon.history.records[-1]
    assert rec["grad_mean"] == pytest.approx(math.sqrt(m2), rel=1e-9)
    assert rec["grad_std"] == pytest.approx(math.sqrt(s - m2), rel=1e-9)


def test_keeps_no_parameter_sized_tensor():
    big = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).double()
    opt = torch.optim.SGD(big.parameters(), lr=0.1, momentum=0.9)
    mon = PhaseMonitor(opt, model=big, lenses=[lenses.GradSNR(decay="optimizer")], log_every=2)

    def numel(x):
        if isinstance(x, torch.Tensor):
            return x.numel()
        if isinstance(x, dict):
            return sum(numel(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(numel(v) for v in x)
        return 0

    n_tensors = len(list(big.parameters()))
    assert numel(mon.states[0]) <= 2 * n_tensors
    assert numel(lenses.GradSNR(decay=0.9).init(mon.view)) > 64 * 64  # today's EMA: a copy
    for _ in range(4):
        opt.zero_grad()
        big(torch.randn(3, 64, dtype=torch.float64)).sum().backward()
        opt.step()
    assert numel(mon.states[0]) <= 2 * n_tensors
    assert math.isfinite(mon.history.records[-1]["grad_mean"])


@pytest.mark.parametrize("name", ["adam_two_groups", "sgd_dampening"])
def test_training_is_bit_for_bit_unchanged(name):
    bare, bare_opt, _, _ = train(OPTIMIZERS[name], monitor=False, drop={3})
    watched, opt, mon, _ = train(OPTIMIZERS[name], drop={3})
    assert len(mon.history) == STEPS // LOG
    for a, b in zip(bare.parameters(), watched.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(bare.parameters(), watched.parameters()):
        for k, v in bare_opt.state[a].items():
            assert torch.equal(v, opt.state[b][k]), k


def test_repr_tells_it_from_the_ema_with_its_own_buffer():
    assert (
        repr(lenses.GradSNR(decay="optimizer")) == "GradSNR(decay='optimizer', weights_only=False)"
    )
    assert repr(lenses.GradSNR(decay=0.9)) == "GradSNR(decay=0.9, weights_only=False)"
    assert lenses.GradSNR(decay="optimizer").every_step
    assert not lenses.GradSNR(decay=0.9).every_step


# -- refusals ----------------------------------------------------------------------------------


def attach(opt, model, log_every=50):
    lens = lenses.GradSNR(decay="optimizer")
    return PhaseMonitor(opt, model=model, lenses=[lens], log_every=log_every)


def test_refuses_sgd_without_momentum():
    model = mlp()
    with pytest.raises(ValueError, match=r"momentum=0\.0.*GradSNR\(decay=0\.9\)"):
        attach(torch.optim.SGD(model.parameters(), lr=0.1), model)


def test_refuses_sgd_with_weight_decay():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    with pytest.raises(ValueError, match=r"weight_decay=0\.01.*GradSNR\(decay=0\.9\)"):
        attach(opt, model)


def test_refuses_adam_with_l2_weight_decay():
    model = mlp()
    opt = torch.optim.Adam(two_groups(model, weight_decay=0.0), lr=0.1, weight_decay=1e-4)
    with pytest.raises(ValueError, match=r"group 1 of Adam has weight_decay=0\.0001.*AdamW"):
        attach(opt, model)


@pytest.mark.parametrize("cls", [torch.optim.NAdam, torch.optim.RMSprop, torch.optim.Adagrad])
def test_refuses_other_optimizers(cls):
    model = mlp()
    with pytest.raises(ValueError, match=rf"optimizer is {cls.__name__}.*GradSNR\(decay=0\.9\)"):
        attach(cls(model.parameters(), lr=0.1), model)


def test_refuses_an_optimizer_that_already_holds_state():
    model, opt, _, _ = train(OPTIMIZERS["sgd_nesterov"], steps=2, monitor=False)
    with pytest.raises(ValueError, match=r"already holds state for 4 .*before the first step"):
        attach(opt, model)
    # nothing stays attached: a monitor with another lens attaches fine
    PhaseMonitor(opt, model=model, lenses=[lenses.GradSNR(decay=0.9)]).close()


def test_refuses_a_misspelt_decay():
    with pytest.raises(TypeError, match=r"float or 'optimizer', got 'optimiser'"):
        lenses.GradSNR(decay="optimiser")
    with pytest.raises(ValueError, match="one of window and decay"):
        lenses.GradSNR(5, decay="optimizer")


def test_refuses_a_group_that_drops_its_momentum_mid_run():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    attach(opt, model)
    model(torch.zeros(1, 4, dtype=torch.float64)).sum().backward()
    opt.step()
    opt.param_groups[0]["momentum"] = 0.0
    with pytest.raises(ValueError, match=r"momentum=0\.0"):
        opt.step()


# -- checkpoints and skipped steps -------------------------------------------------------------


@pytest.mark.parametrize("name", ["adam_two_groups", "sgd_dampening"])
def test_resume_from_checkpoint_gives_identical_records(name):
    make = OPTIMIZERS[name]

    def fresh():
        model = mlp()
        opt = make(model)
        mon = PhaseMonitor(
            opt, model=model, lenses=[lenses.GradSNR(decay="optimizer")], log_every=LOG
        )
        return model, opt, mon

    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(8, 4, generator=g, dtype=torch.float64),) for _ in range(30)]

    def run(model, opt, mon, chunk):
        for (x,) in chunk:
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()

    model, opt, mon = fresh()
    run(model, opt, mon, data)
    full = [{k: v for k, v in r.items() if k != "time"} for r in mon.history.records]

    model, opt, mon = fresh()
    run(model, opt, mon, data[:13])  # between log points
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "mon": mon.state_dict()}, buf)
    mon.close()
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model, opt, mon = fresh()  # attached before the optimizer's state is loaded
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    mon.load_state_dict(ckpt["mon"])
    run(model, opt, mon, data[13:])
    resumed = [{k: v for k, v in r.items() if k != "time"} for r in mon.history.records]
    assert resumed == full[2:]


@pytest.mark.parametrize("fused", [False, True])
def test_a_step_the_grad_scaler_skips_is_left_out(fused, mask_path):
    """An overflowing step under a GradScaler: the scaler skips a plain optimizer's step (no
    hooks run); a fused optimizer gets the step with found_inf set and leaves its buffers
    alone, and so does the lens (it leaves the non-finite gradients out)."""
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    mon = attach(opt, model, log_every=LOG)
    g = torch.Generator().manual_seed(1)
    kept = []
    for t in range(1, 12):
        opt.zero_grad()
        loss = model(torch.randn(8, 4, generator=g, dtype=torch.float64)).square().mean()
        scaler.scale(loss * (math.inf if t == 6 else 1.0)).backward()
        if t != 6:
            kept.append([p.grad.clone() / scaler.get_scale() for p in model.parameters()])
        scaler.step(opt)
        scaler.update()
    assert mon.step == (11 if fused else 10)
    rec = mon.history.records[-1]
    assert rec["step"] == 10 and rec["nonfinite_steps"] == (1 if fused else 0)
    assert float(opt.state[next(model.parameters())]["step"]) == 10
    want = reference(kept[: 9 if fused else 10], coefficients(opt), layer_names(model))
    for key in ("grad_mean", "grad_std", "grad_snr", "grad_std/0"):
        assert rec[key] == pytest.approx(want[key], rel=1e-9), key


def test_header_lists_exactly_the_keys_the_records_hold():
    from sgdlens.schema import key_index

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    seen: list = []
    lens = lenses.GradSNR(decay="optimizer", weights_only=True)
    mon = PhaseMonitor(opt, model=model, lenses=[lens], log_every=LOG, sinks=[seen.append])
    for _ in range(2 * LOG):
        opt.zero_grad()
        model(torch.randn(8, 4, dtype=torch.float64)).square().mean().backward()
        opt.step()
    mon.close()
    header, records = seen[0], [r for r in seen[1:] if "event" not in r]
    assert set(key_index(header)) == {k for r in records for k in r}
    assert header["schema"]["grad_snr"]["layers"] == ["0", "2"]


def test_attached_while_resuming_the_loaded_state_must_cover_the_held_buffers():
    from sgdlens.lenses._optimizer_moments import resuming

    def build():
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        return model, torch.optim.Adam(model.parameters(), lr=0.01)

    def step(model, opt):
        opt.zero_grad()
        model(torch.randn(4, 3)).square().sum().backward()
        opt.step()

    model, opt = build()
    mon = PhaseMonitor(opt, model=model, lenses=[lenses.GradSNR(decay="optimizer")], log_every=2)
    for _ in range(3):
        step(model, opt)
    saved, opt_state = mon.state_dict(), opt.state_dict()
    mon.close()
    with pytest.raises(ValueError, match="already holds state"):  # outside resuming()
        PhaseMonitor(opt, model=model, lenses=[lenses.GradSNR(decay="optimizer")])
    for load in (True, False):
        model2, opt2 = build()
        opt2.load_state_dict(opt_state)
        with resuming():
            again = PhaseMonitor(
                opt2, model=model2, lenses=[lenses.GradSNR(decay="optimizer")], log_every=2
            )
        if load:
            again.load_state_dict(saved)
            step(model2, opt2)
        else:
            with pytest.raises(ValueError, match="no monitor state for them was loaded"):
                step(model2, opt2)
        again.close()
