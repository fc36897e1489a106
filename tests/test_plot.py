"""sgdlens.plot: every figure rendered from the recorded fixture runs, content checked."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sgdlens
from sgdlens import plot, probes
from sgdlens.report import phase_spans

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TISHBY = os.path.join(FIXTURES, "tishby.jsonl")
PROBES = os.path.join(FIXTURES, "probes.jsonl")
SGD = os.path.join(FIXTURES, "tishby_sgd.jsonl")
LAYERS = [f"fc{i}" for i in range(1, 7)]


@pytest.fixture(scope="module")
def tishby():
    return sgdlens.load(TISHBY)


@pytest.fixture(scope="module")
def rich():
    return sgdlens.load(PROBES)


def gid(artists, name):
    return [a for a in artists if a.get_gid() == name]


def png_bytes(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=50)
    return buf.getvalue()


def test_fixtures_hold_what_the_figures_need(tishby, rich):
    assert len(tishby) == 30 and tishby.layers("grad_mean") == LAYERS
    assert {"drift", "diffusion"} <= {e["event"] for e in tishby.events}
    assert {"noise_scale", "sharpness", "eos_threshold", "loss"} <= set(rich.keys())
    assert [e["event"] for e in rich.events].count("spike") == 1


def test_gradient_stats_is_the_tishby_figure(tishby):
    fig = plot.gradient_stats(tishby)
    (ax,) = fig.axes
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == "gradient norm"
    means, stds = gid(ax.lines, "sgdlens-mean"), gid(ax.lines, "sgdlens-std")
    assert len(means) == len(stds) == 6
    # one colour per layer, mean solid and std dashed in the same colour
    assert len({m.get_color() for m in means}) == 6
    assert all(m.get_color() == s.get_color() for m, s in zip(means, stds))
    assert {m.get_linestyle() for m in means} == {"-"} and {s.get_linestyle() for s in stds} == {
        "--"
    }
    np.testing.assert_allclose(means[0].get_ydata(), tishby["grad_mean/fc1"])
    # diffusion spans of the whole model, shaded
    spans = [s for s in phase_spans(tishby) if s[2] == "diffusion"]
    assert len(spans) == 1
    shaded = gid(ax.patches, "sgdlens-diffusion")
    assert len(shaded) == len(spans)
    x0, x1 = shaded[0].get_x(), shaded[0].get_x() + shaded[0].get_width()
    assert (x0, x1) == (spans[0][0], spans[0][1]) == (770.0, 2100.0)
    # every layer's phase event marked on its mean curve; whole-model events as vertical lines
    layer_events = [e for e in tishby.events if e["layer"]]
    marks = gid(ax.collections, "sgdlens-event")
    assert sum(len(c.get_offsets()) for c in marks) == len(layer_events) == 10
    assert sorted(float(x) for c in marks for x in c.get_offsets()[:, 0]) == sorted(
        float(e["step"]) for e in layer_events
    )
    assert len(gid(ax.lines, "sgdlens-model-event")) == 2
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:6] == LAYERS and "diffusion" in labels
    assert png_bytes(fig)[:8] == b"\x89PNG\r\n\x1a\n"


def test_gradient_stats_normalised_by_weight_norm(tishby):
    ax = plot.gradient_stats(tishby, normalize=True, shade=False, events=False).axes[0]
    assert ax.get_ylabel() == "gradient norm / ‖W‖"
    np.testing.assert_allclose(
        gid(ax.lines, "sgdlens-std")[2].get_ydata(),
        tishby["grad_std/fc3"] / tishby["weight_norm/fc3"],
    )
    assert not ax.patches and not ax.collections


def test_snr_layers_model_and_the_snr1_line(tishby):
    ax = plot.snr(tishby).axes[0]
    assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
    assert len(gid(ax.lines, "sgdlens-layer")) == 6 and len(gid(ax.lines, "sgdlens-model")) == 1
    (one,) = gid(ax.lines, "sgdlens-snr1")
    assert list(one.get_ydata()) == [1.0, 1.0]
    assert len(gid(ax.patches, "sgdlens-diffusion")) == 1


def test_loss_marks_the_spike(rich):
    ax = plot.loss(rich).axes[0]
    assert ax.get_ylabel() == "loss" and ax.get_yscale() == "log"
    (spike,) = gid(ax.collections, "sgdlens-event")
    (ev,) = [e for e in rich.events if e["event"] == "spike"]
    assert spike.get_offsets()[0][0] == ev["step"]
    assert len(gid(ax.patches, "sgdlens-diffusion")) == sum(
        1 for s in phase_spans(rich) if s[2] == "diffusion"
    )


def test_noise_scale_with_the_batch_size(rich):
    ax = plot.noise_scale(rich).axes[0]
    assert len(gid(ax.lines, "sgdlens-layer")) == 2 and len(gid(ax.lines, "sgdlens-model")) == 1
    (batch,) = gid(ax.lines, "sgdlens-batch")
    assert batch.get_ydata()[0] == pytest.approx(64.0)  # the fixture's batch size
    assert ax.get_yscale() == "log"


def test_weights_three_panels(tishby):
    fig = plot.weights(tishby)
    assert [a.get_title() for a in fig.axes] == [
        "Weight norm",
        "Distance from init",
        "Update ratio",
    ]
    for ax in fig.axes:
        assert len(gid(ax.lines, "sgdlens-layer")) == 6
        assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
        assert len(gid(ax.patches, "sgdlens-diffusion")) == 1
    assert fig.axes[1].get_ylabel() == "‖W − W₀‖"  # noqa: RUF001


def test_sharpness_against_the_eos_threshold(rich):
    ax = plot.sharpness(rich).axes[0]
    (s,) = gid(ax.lines, "sgdlens-sharpness")
    (eos,) = gid(ax.lines, "sgdlens-eos")
    np.testing.assert_allclose(eos.get_ydata(), rich["eos_threshold"])
    np.testing.assert_allclose(s.get_ydata(), rich["sharpness"])
    assert eos.get_ydata()[0] == pytest.approx(2 / 0.05)  # 2/η for plain SGD at lr 0.05
    assert "2/η" in ax.get_legend().get_texts()[1].get_text()


def test_sharpness_from_ratio_or_explicit_threshold():
    h = sgdlens.History(
        [{"step": s, "sharpness": 4.0 * s, "eos_ratio": 0.1 * s} for s in (1, 2, 3)]
    )
    (eos,) = gid(plot.sharpness(h).axes[0].lines, "sgdlens-eos")
    np.testing.assert_allclose(eos.get_ydata(), [40.0] * 3)
    h = sgdlens.History([{"step": s, "sharpness": 4.0 * s} for s in (1, 2)])
    (eos,) = gid(plot.sharpness(h, threshold=20.0).axes[0].lines, "sgdlens-eos")
    np.testing.assert_allclose(eos.get_ydata(), [20.0, 20.0])
    h = sgdlens.History([{"step": s, "eos_ratio": 0.5 * s} for s in (1, 2)])
    ax = plot.sharpness(h).axes[0]
    assert ax.get_ylabel() == "sharpness / EoS threshold"
    assert list(gid(ax.lines, "sgdlens-eos")[0].get_ydata()) == [1.0, 1.0]


def test_phase_timeline_rows_and_bars(tishby):
    ax = plot.phase_timeline(tishby).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [*reversed(LAYERS), "whole model"]
    keys = ["phase", *[f"phase/{n}" for n in LAYERS]]
    for phase in ("warmup", "drift", "diffusion"):
        expected = sum(1 for k in keys for s in phase_spans(tishby, k) if s[2] == phase)
        assert len(gid(ax.collections, f"sgdlens-phase-{phase}")) == expected
    changes = sum(len(phase_spans(tishby, k)) - 1 for k in keys)
    assert len(gid(ax.lines, "sgdlens-event")) == changes == 12


def test_compare_overlays_two_runs(tishby):
    fig = plot.compare([tishby, SGD], labels=["adam", "sgd"])
    titles = [a.get_title() for a in fig.axes]
    assert titles == ["loss", "grad_snr", "grad_mean", "grad_std", "weight_dist"]
    for ax in fig.axes:
        runs = gid(ax.lines, "sgdlens-run")
        assert [r.get_label() for r in runs] == ["adam", "sgd"]
        assert [r.get_linestyle() for r in runs] == ["-", "--"]
    with pytest.raises(ValueError, match="at least two"):
        plot.compare([tishby])


def _tiny(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _loss_fn(model, batch):
    return F.mse_loss(model(batch[0]), batch[1])


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    return x, x[:, :1] * 2 - x[:, 1:2]


def test_interpolation_curve_chord_and_barrier(batch):
    result = probes.interpolate(_tiny(0), _tiny(1), _loss_fn, batch, steps=11)
    ax = plot.interpolation(result).axes[0]
    (curve,) = gid(ax.lines, "sgdlens-curve")
    np.testing.assert_allclose(curve.get_ydata(), result.losses.numpy())
    (chord,) = gid(ax.lines, "sgdlens-chord")
    assert list(chord.get_xdata()) == [0.0, 1.0]
    (bar,) = gid(ax.lines, "sgdlens-barrier")
    lo, hi = bar.get_ydata()
    assert hi - lo == pytest.approx(result.barrier)
    assert list(bar.get_xdata()) == [result.barrier_alpha] * 2
    assert ax.get_xlabel().startswith("α") and ax.get_ylabel() == "loss"  # noqa: RUF001
    assert any(t.get_text().startswith("barrier ") for t in ax.texts)
    # dicts (barrier computed when absent) and several curves
    fig = plot.interpolation(
        [result.to_dict(), {"alphas": [0, 0.5, 1], "losses": [1.0, 3.0, 2.0]}], labels=["a", "b"]
    )
    bars = gid(fig.axes[0].lines, "sgdlens-barrier")
    assert len(bars) == 2 and np.diff(bars[1].get_ydata())[0] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="alphas"):
        plot.interpolation({"losses": [1, 2]})


def test_landscape_contours_and_trajectory(batch):
    states = []
    model = _tiny(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(6):
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        for _ in range(5):
            opt.zero_grad()
            _loss_fn(model, batch).backward()
            opt.step()
    land = probes.landscape_trajectory(states, _loss_fn, batch, model=model, steps=7)
    fig = plot.landscape(land)
    ax = fig.axes[0]
    assert len(fig.axes) == 2  # the contour plot and its colour bar
    assert ax.collections  # filled contours
    (traj,) = gid(ax.lines, "sgdlens-trajectory")
    assert len(traj.get_xdata()) == len(states)
    assert len(gid(ax.lines, "sgdlens-point")) == len(land.points)
    assert ax.get_xlabel().startswith("PC1 (")
    one = probes.landscape_1d(
        model, _loss_fn, batch, steps=9, generator=torch.Generator().manual_seed(0)
    )
    (curve,) = gid(plot.landscape(one).axes[0].lines, "sgdlens-curve")
    assert len(curve.get_xdata()) == 9


def test_missing_keys_name_what_is_needed():
    h = sgdlens.History([{"step": 1, "loss": 1.0}])
    with pytest.raises(ValueError, match="grad_mean/<layer>"):
        plot.gradient_stats(h)
    with pytest.raises(ValueError, match="noise_scale"):
        plot.noise_scale(h)
    with pytest.raises(ValueError, match="weight_norm"):
        plot.weights(h)
    with pytest.raises(ValueError, match="phase"):
        plot.phase_timeline(h)
    assert plot.available(h) == ["loss"]


def test_paths_and_appended_runs(tmp_path, tishby):
    assert plot.available(TISHBY) == ["gradient_stats", "snr", "loss", "weights", "phase_timeline"]
    two = tmp_path / "two.jsonl"
    with open(TISHBY) as f:
        text = f.read()
    two.write_text(text + text)
    with pytest.warns(UserWarning, match="2 runs"):
        ax = plot.gradient_stats(two).axes[0]
    assert len(gid(ax.lines, "sgdlens-mean")) == 6
    assert len(ax.lines[0].get_xdata()) == len(tishby)


def test_no_pyplot_state_and_agg():
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    for name in plot.available(PROBES):
        png_bytes(getattr(plot, name)(PROBES))
    assert plt.get_fignums() == before


def test_missing_matplotlib_names_the_extra(tmp_path):
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "try:\n    import sgdlens.plot\nexcept ImportError as e:\n    print(e)\n"
        "from sgdlens.cli import main\n"
        f"sys.exit(main(['report', {TISHBY!r}, '-o', {str(tmp_path / 'r.html')!r}]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert 'pip install "sgdlens[plot]"' in out.stdout
    assert out.returncode == 1
    assert 'pip install "sgdlens[plot]"' in out.stderr and "Traceback" not in out.stderr
    # the summary needs no matplotlib
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        f"from sgdlens.cli import main; sys.exit(main(['summary', {TISHBY!r}]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "fc6" in out.stdout
