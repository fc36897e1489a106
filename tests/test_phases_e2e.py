"""End to end: the detector on real training runs (shortened; a few seconds each on a CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sgdlens import PhaseDetector, PhaseMonitor, demo
from sgdlens.datasets import tishby12
from sgdlens.lenses import GradSNR
from sgdlens.lenses.grad_snr import gradient_snr

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

LAYERS = [f"fc{i}" for i in range(1, 7)]


def first_switch(events, layer, new):
    return next(e.step for e in events if e.layer == layer and e.new == new)


def test_tishby_task_every_layer_diffuses_bottom_up_after_most_of_the_loss_drop():
    mon = demo.run(epochs=450, log_epochs=5)
    h = mon.history
    assert mon.phases == dict.fromkeys(LAYERS, "diffusion")
    steps, loss = h["step"], h["loss"]
    drop = loss[0] - loss.min()
    switches = [first_switch(mon.events, n, "diffusion") for n in LAYERS]
    assert switches == sorted(switches), switches  # bottom layers first
    for layer, step in zip(LAYERS, switches):
        fallen = (loss[0] - loss[int(np.searchsorted(steps, step))]) / drop
        assert fallen > 0.5, (layer, step, fallen)
    for n in LAYERS:  # each layer was in drift before
        assert first_switch(mon.events, n, "drift") < first_switch(mon.events, n, "diffusion")


def test_digits_layers_diffuse_bottom_up():
    from digits_mlp import train

    mon = train(epochs=100, verbose=False)
    switches = [first_switch(mon.events, n, "diffusion") for n in ("fc1", "fc2", "fc3")]
    assert switches == sorted(switches)
    assert mon.phase == "diffusion" and mon.test_accuracy > 0.9


def test_lr_kick_goes_diffusion_drift_diffusion_with_a_loss_spike():
    from cyclic_lr import run

    mon, start = run(epochs=290, kick_epoch=250, verbose=False)
    after = [e for e in mon.events if e.step > start]
    model = [(e.old, e.new) for e in after if e.layer == ""]
    assert model[:3] == [("diffusion", "spike"), ("diffusion", "drift"), ("drift", "diffusion")]
    spike = after[0]
    assert spike.step <= start + 12 and spike.evidence["robust_z"] > 10
    for n in ("fc1", "fc2", "fc3"):  # every layer back to drift, then diffusion again
        layer = [e.new for e in after if e.layer == n]
        assert layer[:2] == ["drift", "diffusion"], (n, layer)


# --------------------------------------------------------------------------------------------
# Cadence invariance: one training run, its records replayed at several log intervals
# --------------------------------------------------------------------------------------------

CADENCES = (10, 25, 50, 100)


@pytest.fixture(scope="module")
def tishby_gradients():
    """Train the 12-bit task once (400 epochs, 2800 steps), keeping every step's gradients.

    A monitor logging every 10 steps with 50-step SNR windows watches the same run, so the
    replay below can be checked against what the monitor itself records.
    """
    torch.manual_seed(0)
    x, y = tishby12()
    perm = torch.randperm(len(x))
    n = int(0.8 * len(x))
    xtr, ytr = x[perm[:n]], y[perm[:n]]
    model = demo.tishby_net()
    opt = torch.optim.Adam(model.parameters(), lr=4e-4)
    mon = PhaseMonitor(opt, model=model, lenses=[GradSNR(window=50)], log_every=10)
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in LAYERS}
    losses: list[float] = []
    with mon:
        for _ in range(400):
            order = torch.randperm(n)
            for i in range(7):
                idx = order[i * 512 : (i + 1) * 512]
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
                loss.backward()
                for name in LAYERS:
                    m = getattr(model, name)
                    g = torch.cat([m.weight.grad.flatten(), m.bias.grad.flatten()])
                    grads[name].append(g.double())
                losses.append(float(loss.detach()))
                mon.observe(loss=loss)
                opt.step()
    return {k: torch.stack(v) for k, v in grads.items()}, losses, mon.history.records


def replay(grads, losses, every: int, window: int | None = None) -> list[dict]:
    """The records a monitor logging every ``every`` steps with GradSNR(window) would write.

    ``window=None`` is GradSNR's default (the log interval). Each record reports the last
    completed window, in float64 (sgdlens.lenses.grad_snr.gradient_snr, layer by layer).
    """
    window = window or every
    out = []
    for s in range(every, len(losses) + 1, every):
        end = s // window * window
        rec: dict = {"step": s, "loss": float(np.mean(losses[s - every : s]))}
        if end >= window:
            means, stds = [], []
            for name, g in grads.items():
                mean, std, snr = gradient_snr(g[end - window : end])
                rec[f"grad_snr/{name}"] = float(snr)
                means.append(float(mean) ** 2)
                stds.append(float(std) ** 2)
            rec["grad_snr"] = (sum(means) / sum(stds)) ** 0.5
        out.append(rec)
    return out


def switches(records: list[dict]) -> dict[str, list[tuple[int, str, str]]]:
    det = PhaseDetector()
    for r in records:
        det.update(r)
    out: dict[str, list[tuple[int, str, str]]] = {}
    for e in det.events:
        if e.new != "spike":
            out.setdefault(e.layer, []).append((e.step, e.old, e.new))
    return out


def test_replay_matches_the_monitor_records(tishby_gradients):
    grads, losses, records = tishby_gradients
    replayed = replay(grads, losses, 10, window=50)
    assert [r["step"] for r in records] == [r["step"] for r in replayed]
    for got, want in zip(records, replayed):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        for name in [*LAYERS, ""]:
            key = f"grad_snr/{name}" if name else "grad_snr"
            assert (key in got) == (key in want)
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-3), (got["step"], key)


def test_switches_agree_within_one_log_interval_with_a_fixed_snr_window(tishby_gradients):
    """GradSNR(window=50) at every cadence: the same switches, each within one interval."""
    grads, losses, _ = tishby_gradients
    runs = {k: switches(replay(grads, losses, k, window=50)) for k in CADENCES}
    ref = runs[10]
    assert set(ref) == {*LAYERS, ""}
    for name in LAYERS[:5]:  # the story: drift first, then diffusion (fc6 stays in drift)
        assert [e[1:] for e in ref[name]][:2] == [("warmup", "drift"), ("drift", "diffusion")]
    for k in CADENCES[1:]:
        assert set(runs[k]) == set(ref)
        for layer, events in ref.items():
            other = runs[k][layer]
            assert [e[1:] for e in other] == [e[1:] for e in events], (k, layer)
            for (a, _, _), (b, _, _) in zip(events, other):
                assert abs(a - b) <= k, (k, layer, a, b)


def test_switches_into_diffusion_agree_within_100_steps_with_the_default_snr_window(
    tishby_gradients,
):
    """GradSNR's default window (the log interval): the same phases; diffusion within 100 steps.

    The warm-up entry moves more (the first record of a 100-step cadence averages the first
    100 steps), so only its phase is compared.
    """
    grads, losses, _ = tishby_gradients
    runs = {k: switches(replay(grads, losses, k)) for k in CADENCES}
    for layer in runs[10]:
        sequences = {k: [e[1:] for e in runs[k][layer]] for k in CADENCES}
        assert len({tuple(v) for v in sequences.values()}) == 1, (layer, sequences)
        entries = [[s for s, _, new in runs[k][layer] if new == "diffusion"] for k in CADENCES]
        for same in zip(*entries):
            assert max(same) - min(same) <= 100, (layer, entries)
