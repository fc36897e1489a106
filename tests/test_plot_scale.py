"""Figures and reports at scale: a GPT-2-shaped run (148 tensors) and a 500-layer run draw
without matplotlib layout warnings, at most ~10 lines per panel, legends outside the axes,
per-layer metrics as heatmaps centred at SNR 1 with the phase changes marked."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest

from sgdlens import History, plot, report

STEPS = [10 * 2**k for k in range(10)]


def gpt2_names(blocks=12):
    names = ["transformer.wte", "transformer.wpe"]
    for b in range(blocks):
        for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            names += [f"transformer.h.{b}.{part}.weight", f"transformer.h.{b}.{part}.bias"]
    return [*names, "transformer.ln_f.weight", "transformer.ln_f.bias"]


def synthetic(names, seed=0):
    """Per layer: SNR falling through 1 at a layer-dependent step, with the matching events."""
    rng = np.random.default_rng(seed)
    cross = {n: STEPS[2 + i % 6] for i, n in enumerate(names)}
    records, events = [], []
    for s in STEPS:
        r = {"step": s, "time": float(s), "loss": 2.0 / math.log(s + 1), "grad_snr": 8.0 / s**0.5}
        r["phase"] = "drift" if s < 640 else "diffusion"
        for n in names:
            snr = 3.0 * (cross[n] / s) ** 0.7 * rng.uniform(0.8, 1.2)
            r |= {
                f"grad_snr/{n}": snr,
                f"grad_mean/{n}": snr * 0.01,
                f"grad_std/{n}": 0.01,
                f"weight_norm/{n}": 1.0 + 1e-3 * s,
                f"weight_dist/{n}": 1e-3 * s,
                f"update_ratio/{n}": 1e-3,
                f"noise_scale/{n}": 10.0 * s,
                f"phase/{n}": "drift" if s <= cross[n] else "diffusion",
            }
        records.append(r)
    for n in names:
        i = STEPS.index(cross[n]) + 1
        events.append(
            {"step": STEPS[i], "time": 0.0, "event": "diffusion", "layer": n, "old": "drift"}
        )
    events.append({"step": 640, "time": 0.0, "event": "diffusion", "layer": "", "old": "drift"})
    return History([*records, *events])


@pytest.fixture(scope="module", params=[148, 500], ids=["gpt2-148", "mlp-500"])
def big(request):
    names = gpt2_names() if request.param == 148 else [f"net.{i}" for i in range(500)]
    assert len(names) == request.param
    return names, synthetic(names)


def render(fig):
    """Draw the figure with every warning an error (the layout warning included)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig.savefig(io.BytesIO(), format="png", dpi=40)
        canvas.draw()
    return canvas.get_renderer()


def test_every_figure_draws_clean_and_bounded(big):
    names, h = big
    for name in plot.available(h):
        fig = getattr(plot, name)(h)
        renderer = render(fig)
        for ax in fig.axes:
            layer_lines = [
                ln
                for ln in ax.lines
                if ln.get_gid() in ("sgdlens-layer", "sgdlens-mean", "sgdlens-std")
            ]
            assert len(layer_lines) <= 12, (name, len(layer_lines))
            legend = ax.get_legend()
            if legend is not None:
                assert len(legend.get_texts()) <= 12
                box, frame = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
                assert box.x0 >= frame.x1 - 1, f"{name}: legend inside the axes"
            w, hgt = fig.get_size_inches()
            assert w <= 16 and hgt <= 11, (name, w, hgt)


def test_snr_heatmap_is_centred_at_one_with_phase_changes_marked(big):
    names, h = big
    fig = plot.snr(h)
    model_ax, heat_ax = fig.axes[:2]
    (mesh,) = [c for c in heat_ax.collections if c.get_gid() == "sgdlens-heatmap"]
    assert mesh.norm.vmin * mesh.norm.vmax == pytest.approx(1.0)
    assert type(mesh.norm).__name__ == "LogNorm" and heat_ax.get_xscale() == "log"
    assert mesh.get_array().shape == (len(names), len(STEPS))
    np.testing.assert_allclose(mesh.get_array()[3], h[f"grad_snr/{names[3]}"])
    marks = [c for c in heat_ax.collections if c.get_gid() == "sgdlens-event"]
    xy = np.concatenate([c.get_offsets() for c in marks])
    assert len(xy) == len(names)  # one marker per layer's change, on its row
    want = sorted((float(e["step"]), names.index(e["layer"]) + 0.5) for e in h.events if e["layer"])
    assert sorted(map(tuple, xy.tolist())) == want
    assert [ln.get_gid() for ln in model_ax.lines][:1] == ["sgdlens-model"]
    assert any(ln.get_gid() == "sgdlens-snr1" for ln in model_ax.lines)
    assert len(heat_ax.get_yticklabels()) <= 31


def test_gradient_stats_shows_a_spread_of_layers(big):
    names, h = big
    ax = plot.gradient_stats(h).axes[0]
    means = [ln for ln in ax.lines if ln.get_gid() == "sgdlens-mean"]
    assert [m.get_label() for m in means] == [f"{n} mean" for n in plot.training.pick(names, 6)]
    assert (
        means[0].get_label() == f"{names[0]} mean" and means[-1].get_label() == f"{names[-1]} mean"
    )
    assert f"(6 of {len(names)} layers)" in ax.get_title()


def test_report_of_a_big_run_is_one_clean_page(big):
    names, h = big
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        page = report.report_html(h)
    assert "<script" not in page and 'src="http' not in page
    assert page.count("data:image/png;base64,") == 6
    assert len(page) < 3_000_000


def test_few_layers_keep_lines():
    h = synthetic([f"fc{i}" for i in range(1, 7)])
    ax = plot.snr(h).axes[0]
    assert len([ln for ln in ax.lines if ln.get_gid() == "sgdlens-layer"]) == 6
    assert not [c for c in ax.collections if c.get_gid() == "sgdlens-heatmap"]


def test_a_real_gpt2_run_per_tensor_draws_clean(tmp_path):
    """A GPT-2-shaped model from a config (12 blocks, 148 parameter tensors), monitored per
    tensor for a few steps: every figure and the report draw with warnings as errors."""
    transformers = pytest.importorskip("transformers")
    import torch

    from sgdlens import PhaseMonitor, load
    from sgdlens.sinks import JSONLSink

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=16, n_positions=8, n_embd=8, n_layer=12, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    assert len(list(model.parameters())) == 148
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    path = tmp_path / "gpt2.jsonl"
    mon = PhaseMonitor(opt, model=model, layers="params", log_every=2, sinks=[JSONLSink(path)])
    ids = torch.randint(0, 16, (4, 8))
    for _ in range(8):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        mon.observe(loss=loss)
        opt.step()
    mon.close()
    h = load(path)
    assert len(h.layers("grad_snr")) == 148 and len(h.header["layers"]) == 148
    for name in plot.available(h):
        render(getattr(plot, name)(h))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report.report_html(h)


def test_long_runs_are_drawn_from_log_spaced_records():
    n = 20_000
    h = History([{"step": s, "grad_snr": 1.0 + (s % 7), "loss": 1.0 / s} for s in range(1, n + 1)])
    (line,) = [ln for ln in plot.snr(h).axes[0].lines if ln.get_gid() == "sgdlens-model"]
    x = line.get_xdata()
    assert len(x) <= plot.MAX_POINTS and x[0] == 1 and x[-1] == n
    ratios = np.diff(np.log(x[len(x) // 2 :]))  # evenly spaced in log step where dense
    assert ratios.max() < 3 * ratios.min() + 1e-12
    assert len(h) == n  # the caller's run is untouched
