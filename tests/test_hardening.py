"""Regression tests for faults an adversarial pass found (each fails on the code before its fix)."""

import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

from sgdlens import PhaseMonitor, probes
from sgdlens.lenses import BatchSNR, GradNorm, NoiseScale


def _mlp(width=32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, 3))


def _batch(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _train(model, opt, steps, batch=None):
    x, y = batch or _batch()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _live_tensors():
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


PER_SAMPLE = [
    pytest.param(lambda: [NoiseScale("per_sample")], id="noise_scale"),
    pytest.param(lambda: [BatchSNR()], id="batch_snr"),
]


# -- 1: leaks ----------------------------------------------------------------------------


@pytest.mark.parametrize("make", PER_SAMPLE)
def test_per_sample_hooks_do_not_keep_the_graphs(make):
    """The output-gradient hooks once referenced their outputs: a cycle through the autograd
    graph that Python cannot collect, so every step's graph (and activations) leaked."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = PhaseMonitor(opt, model=model, lenses=make(), log_every=1)
    _train(model, opt, 20)
    before = _live_tensors()
    _train(model, opt, 200)
    grown = _live_tensors() - before
    monitor.close()
    assert grown <= 10, f"{grown} tensors more after 200 steps"


@pytest.mark.parametrize("make", [*PER_SAMPLE, pytest.param(lambda: None, id="default")])
def test_model_and_optimizer_collectable_after_close(make):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = PhaseMonitor(opt, model=model, lenses=make(), log_every=5)
    _train(model, opt, 12)
    monitor.close()
    refs = weakref.ref(model), weakref.ref(opt)
    del model, opt
    gc.collect()
    assert all(r() is None for r in refs), "the closed monitor keeps the model or optimizer"
    assert len(monitor.history) == 2  # what it recorded stays readable


# -- 2: a step without gradients ----------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        *PER_SAMPLE,
        pytest.param(lambda: None, id="default"),
        pytest.param(lambda: [NoiseScale("accumulation")], id="accumulation"),
    ],
)
def test_step_with_no_gradient_at_all(make):
    """``zero_grad(); step()`` (a GAN step that trains the other network) must not raise."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = PhaseMonitor(opt, model=model, lenses=make(), log_every=2)
    for _ in range(4):
        opt.zero_grad()
        opt.step()
    _train(model, opt, 2)
    assert monitor.step == 6 and len(monitor.history) == 3
    monitor.close()


def test_step_with_no_gradient_counts_as_a_zero_gradient():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    monitor = PhaseMonitor(opt, model=model, lenses=[GradNorm()], log_every=1)
    opt.zero_grad()
    opt.step()
    assert monitor.history.records[-1]["grad_norm"] == 0.0
    monitor.close()


# -- 3: frozen parameters -----------------------------------------------------------------


@pytest.mark.parametrize("make", PER_SAMPLE)
def test_frozen_parameter_in_the_optimizer(make):
    model = _mlp()
    model[0].weight.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = PhaseMonitor(opt, model=model, lenses=make(), log_every=2)
    _train(model, opt, 6)
    record = monitor.history.records[-1]
    metric = "noise_scale" if "noise_scale" in record else "batch_snr"
    assert all(torch.isfinite(torch.tensor(record[f"{metric}/{layer}"])) for layer in ("0", "2"))
    monitor.close()
    assert not model[0].bias._backward_hooks and not model[2].weight._backward_hooks
    assert not model[0]._forward_hooks and not model._forward_pre_hooks


# -- 4: the gradients are read before the update ------------------------------------------


class _Rescaling(torch.optim.SGD):
    """An optimizer that rewrites ``.grad`` in place inside ``step()`` (as some do)."""

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(1000.0)
        return super().step(closure)


def test_gradients_are_read_before_step_rewrites_them():
    model = _mlp()
    opt = _Rescaling(model.parameters(), lr=1e-6)
    monitor = PhaseMonitor(opt, model=model, lenses=[GradNorm()], log_every=1)
    x, y = _batch()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        want = torch.linalg.vector_norm(
            torch.cat([p.grad.double().flatten() for p in model.parameters()])
        ).item()
        opt.step()
        assert monitor.history.records[-1]["grad_norm"] == pytest.approx(want, rel=1e-6)
    monitor.close()


def test_a_later_sanitising_pre_hook_does_not_hide_a_nonfinite_step():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = PhaseMonitor(opt, model=model, log_every=4)

    def sanitise(optimizer, args, kwargs):
        for p in model.parameters():
            p.grad.nan_to_num_(0.0, 0.0, 0.0)

    opt.register_step_pre_hook(sanitise)
    x, y = _batch()
    for i in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if i == 1:
            model[0].weight.grad[0, 0] = float("nan")
        opt.step()
    assert monitor.history.records[-1]["nonfinite_steps"] == 1
    monitor.close()


# -- 5: a subclass calling super().step() ----------------------------------------------------


def test_subclass_calling_super_step_counts_one_step():
    torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)  # patches SGD.step for this process
    model = _mlp()
    opt = _Rescaling(model.parameters(), lr=1e-6)
    monitor = PhaseMonitor(opt, model=model, log_every=5)
    _train(model, opt, 10)
    assert monitor.step == 10 and [r["step"] for r in monitor.history] == [5, 10]
    monitor.close()


def test_a_step_that_raised_does_not_swallow_the_next():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = PhaseMonitor(opt, model=model, log_every=1)

    def fail(optimizer, args, kwargs):
        raise RuntimeError("boom")

    handle = opt.register_step_pre_hook(fail)
    opt.zero_grad()
    nn.functional.cross_entropy(model(_batch()[0]), _batch()[1]).backward()
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    handle.remove()
    _train(model, opt, 3)
    assert monitor.step == 3
    monitor.close()


# -- 7: probes are invisible to the lenses ---------------------------------------------------


def test_scheduled_probe_with_another_batch_size_leaves_per_sample_alone():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def loss_fn(m, batch):
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    probe = probes.sharpness_probe(loss_fn, _batch(5), every=2)
    lens = NoiseScale("per_sample")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an excluded module warns
        monitor = PhaseMonitor(
            opt, model=model, lenses=[lens], log_every=2, probes=[probe], probe_budget=1.0
        )
        _train(model, opt, 10)
    record = monitor.history.records[-1]
    assert "sharpness" in record
    assert record["noise_scale"] == record["noise_scale"]  # not NaN
    assert monitor.lenses[0].uncovered == []
    monitor.close()


def test_on_demand_probe_between_backward_and_step_changes_no_key():
    def run(probe):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        monitor = PhaseMonitor(
            opt, model=model, lenses=[NoiseScale("per_sample"), BatchSNR()], log_every=2
        )
        x, y = _batch()
        for _ in range(4):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if probe:
                probes.sharpness(
                    model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), _batch(5), k=1
                )
            opt.step()
        monitor.close()
        return monitor.history.records[-1]

    plain, probed = run(False), run(True)
    keys = [k for k in plain if k != "time"]
    assert keys == [k for k in probed if k != "time"]
    assert all(plain[k] == probed[k] for k in keys)


# -- 8: observe() may not replace the record's own fields --------------------------------------


@pytest.mark.parametrize(
    "name", ["step", "time", "nonfinite_steps", "phase", "grad_snr", "grad_norm", "grad_snr/0"]
)
def test_observe_refuses_reserved_names(name):
    model = _mlp()
    monitor = PhaseMonitor(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    with pytest.raises(ValueError, match=f"observe\\({name}=") as err:
        monitor.observe(**{name: 1.0})
    assert "choose another name" in str(err.value)
    monitor.observe(loss=1.0, my_step=3.0)  # other names are fine
    monitor.close()


def test_observe_refuses_a_scheduled_probes_keys():
    model = _mlp()
    probe = probes.sharpness_probe(
        lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), _batch()
    )
    monitor = PhaseMonitor(torch.optim.SGD(model.parameters(), lr=0.1), model=model, probes=[probe])
    for name in ("sharpness", "sharpness_hvps", "eos_ratio"):  # the probe's name and its keys
        with pytest.raises(ValueError, match=f"observe\\({name}="):
            monitor.observe(**{name: 1.0})
    monitor.close()


# -- 12: load_state_dict validates everything, then loads atomically ----------------------------


def _trained_monitor(model=None, log_every=5, steps=7):
    model = model or _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = PhaseMonitor(opt, model=model, log_every=log_every)
    _train(model, opt, steps)
    return monitor


def _snapshot(monitor):
    import copy

    return copy.deepcopy(monitor.state_dict())


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _other_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3), nn.Tanh(), nn.Linear(3, 3))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda sd: {"version": 1}, "lacks"),
        (lambda sd: {**sd, "log_every": 7}, "log_every"),
        (lambda sd: {**sd, "layers": ["a", "b"]}, "layers"),
        (lambda sd: {**sd, "states": sd["states"][:-1]}, "states"),
        (lambda sd: {**sd, "version": 99}, "version 99"),
    ],
    ids=["bare-version", "log_every", "layers", "truncated-states", "version"],
)
def test_load_state_dict_refuses_a_foreign_checkpoint_and_changes_nothing(edit, match):
    source = _trained_monitor()
    target = _trained_monitor(steps=3)
    before = _snapshot(target)
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(edit(source.state_dict()))
    assert _same(_snapshot(target), before)


def test_load_state_dict_refuses_another_models_layers():
    source = _trained_monitor(model=_other_model())
    target = _trained_monitor(steps=3)
    before = _snapshot(target)
    with pytest.raises(ValueError, match="layers"):
        target.load_state_dict(source.state_dict())
    assert _same(_snapshot(target), before)


def test_a_load_failing_part_way_rolls_back():
    source, target = _trained_monitor(), _trained_monitor(steps=3)
    before = _snapshot(target)
    state = source.state_dict()
    state["detector"] = {"garbage": True}  # the detector refuses it after the lenses loaded
    with pytest.raises(ValueError):
        target.load_state_dict(state)
    assert _same(_snapshot(target), before)
    target.load_state_dict(source.state_dict())  # a good checkpoint still loads
    assert _same(_snapshot(target), _snapshot(source))


# -- 15: unclear inputs --------------------------------------------------------------------------


def test_a_lens_class_instead_of_an_instance():
    from sgdlens.lenses import GradSNR

    with pytest.raises(TypeError, match=r"the class GradSNR.*GradSNR\(\)"):
        PhaseMonitor(torch.optim.SGD(_mlp().parameters(), lr=0.1), lenses=[GradSNR])


@pytest.mark.parametrize("trace_steps", [10**9, -1, 2.5])
def test_trace_steps_is_bounded(trace_steps):
    with pytest.raises(ValueError, match="trace_steps"):
        PhaseMonitor(torch.optim.SGD(_mlp().parameters(), lr=0.1), trace_steps=trace_steps)


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_gradients_are_read_unscaled(fused):
    """A GradScaler unscales .grad before step(), or, for a fused optimizer, hands the scale to
    the optimizer (``optimizer.grad_scale``), which unscales inside step(): the monitor must
    read the unscaled gradient either way."""

    def run(scale):
        model = _mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        monitor = PhaseMonitor(opt, model=model, lenses=[GradNorm()], log_every=1)
        x, y = _batch()
        for _ in range(3):
            opt.zero_grad()
            scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
            scaler.step(opt)
            scaler.update()
        monitor.close()
        return monitor.history.records[-1]["grad_norm"]

    assert run(1024.0) == pytest.approx(run(1.0), rel=1e-5)


# -- core v2: one per-sample engine for every lens ------------------------------------------------


def test_noise_scale_and_batch_snr_share_one_per_sample_pass(monkeypatch):
    from sgdlens.lenses.per_sample import PerSampleEngine

    calls = []
    process = PerSampleEngine._process
    monkeypatch.setattr(
        PerSampleEngine, "_process", lambda self, unit: calls.append(unit) or process(self, unit)
    )

    def run(make):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        monitor = PhaseMonitor(opt, model=model, lenses=make(), log_every=4)
        calls.clear()
        _train(model, opt, 8)
        monitor.close()
        return monitor, len(calls), monitor.history.records[-1]

    both, n_both, rec = run(lambda: [NoiseScale("per_sample"), BatchSNR()])
    _, n_ns, rec_ns = run(lambda: [NoiseScale("per_sample")])
    _, n_bs, rec_bs = run(lambda: [BatchSNR()])
    assert n_both == n_ns == 8 * 2  # two Linear layers per step, once each
    assert n_bs == 2 * 2  # BatchSNR alone: hooks on the two logged steps only
    for key, value in {**rec_ns, **rec_bs}.items():
        if key != "time":
            assert rec[key] == value, key


def test_lenses_asking_for_different_per_sample_modes_are_refused():
    model = _mlp()
    with pytest.raises(ValueError, match="same per_sample="):
        PhaseMonitor(
            torch.optim.SGD(model.parameters(), lr=0.1),
            model=model,
            lenses=[NoiseScale("per_sample", per_sample="func"), BatchSNR()],
        )


# -- 16: bounded history, complete file ------------------------------------------------------------


def test_keep_records_bounds_the_history_and_the_file_stays_complete(tmp_path):
    import sgdlens
    from sgdlens.sinks import JSONLSink

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    path = tmp_path / "run.jsonl"
    monitor = PhaseMonitor(opt, model=model, log_every=2, keep_records=3, sinks=[JSONLSink(path)])
    _train(model, opt, 20)
    monitor.close()
    assert [r["step"] for r in monitor.history] == [16, 18, 20]
    assert monitor.history["step"].tolist() == [16.0, 18.0, 20.0]
    assert sgdlens.load(path)["step"].tolist() == [float(s) for s in range(2, 21, 2)]
    with pytest.raises(ValueError, match="keep_records=0"):
        PhaseMonitor(torch.optim.SGD(model.parameters(), lr=0.1), keep_records=0)


def test_a_user_written_lens_without_repr_resumes():
    from sgdlens.lenses import Lens

    class Count(Lens):  # a user's lens: state in its state dict, no __repr__
        name = "count"
        metrics = ("count",)

        def init(self, view):
            return {"n": torch.zeros((), dtype=view.dtype, device=view.device)}

        def update(self, state, step):
            state["n"].add_(1)
            return state

        def compute(self, state, step):
            return {"count": state["n"].clone()}

    def monitor():
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        return model, opt, PhaseMonitor(opt, model=model, lenses=[Count()], log_every=2)

    model, opt, first = monitor()
    _train(model, opt, 4)
    saved = first.state_dict()
    model, opt, second = monitor()
    second.load_state_dict(saved)
    _train(model, opt, 2)
    assert second.history.records[-1]["count"] == 6.0


def test_a_resumed_run_keeps_its_run_id(tmp_path):
    import sgdlens
    from sgdlens.sinks import JSONLSink

    path = tmp_path / "run.jsonl"

    def monitor():
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        return model, opt, PhaseMonitor(opt, model=model, log_every=2, sinks=[JSONLSink(path)])

    model, opt, first = monitor()
    _train(model, opt, 4)
    saved = first.state_dict()
    first.close()
    model, opt, second = monitor()
    second.load_state_dict(saved)
    _train(model, opt, 4)
    second.close()
    assert second.run_id == first.run_id
    assert len(sgdlens.runs(path)) == 1
    assert sgdlens.load(path)["step"].tolist() == [2.0, 4.0, 6.0, 8.0]


def test_a_resumed_auto_noise_scale_keeps_its_estimator():
    """NoiseScale('auto') chooses its estimator at the first step; a resumed run keeps that
    choice even if its first step after the resume would choose the other one."""

    def monitor():
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        return model, opt, PhaseMonitor(opt, model=model, lenses=[NoiseScale()], log_every=2)

    model, opt, first = monitor()
    x, y = _batch()
    for _ in range(2):  # two micro-batches a step: the accumulation estimator
        opt.zero_grad()
        for xs, ys in zip(x.chunk(2), y.chunk(2)):
            nn.functional.cross_entropy(model(xs), ys).backward()
        opt.step()
    assert first.lenses[0]._mode == "accumulation"
    saved = first.state_dict()
    first.close()
    model, opt, second = monitor()
    second.load_state_dict(saved)
    _train(model, opt, 1)  # one backward: a fresh 'auto' would pick per-sample norms
    assert second.lenses[0]._mode == "accumulation"
    second.close()
