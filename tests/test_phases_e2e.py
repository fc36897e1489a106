"""End to end: the detector on real training runs (shortened; a few seconds each on a CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from sgdlens import demo

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
