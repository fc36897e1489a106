"""The record schema in the run header: it lists exactly the keys the records hold, survives
the JSONL round trip, and readers give the same answers with it as by parsing old files."""

from __future__ import annotations

import io
import json

import matplotlib
import pytest
import torch
from matplotlib.colors import LogNorm
from torch import nn

import sgdlens
from sgdlens import PhaseMonitor, lenses, plot, probes
from sgdlens.header import HEADER_VERSION
from sgdlens.lenses import GradSNR, Key, Lens, WeightNorms
from sgdlens.lenses.base import per_layer_keys
from sgdlens.records import History
from sgdlens.report import report_html
from sgdlens.schema import declared, key_index
from sgdlens.sinks import JSONLSink
from sgdlens.summary import layers, summary

matplotlib.use("Agg")


class ParamCount(Lens):
    """A user lens that declares only ``metrics``: per-layer and whole-model keys."""

    name = "param_count"
    metrics = ("param_count",)

    def init(self, view):
        return {}

    def compute(self, state, step):
        view = step.view
        sizes = torch.tensor([float(p.numel()) for p in view.params], dtype=view.dtype)
        per = view.per_layer(sizes, range(len(view.params)))
        return {**per_layer_keys("param_count", view.layers, per), "param_count": per.sum()}


class Signed(Lens):
    """A user lens with a declared linear-scale, per-layer-only metric that goes negative."""

    name = "signed"
    keys = (Key("signed", "minus the weight norm", whole=False, scale="linear"),)
    metrics = ("signed",)

    def init(self, view):
        return {}

    def compute(self, state, step):
        view = step.view
        values = -torch.arange(1.0, len(view.layers) + 1, dtype=view.dtype) * step.index
        return per_layer_keys("signed", view.layers, values)


def _loss_fn(model, batch):
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def run(lens_list=None, *, steps=40, sinks=(), adam=False, norm=False, **kwargs):
    torch.manual_seed(0)
    mid = [nn.LayerNorm(8)] if norm else []
    model = nn.Sequential(nn.Linear(4, 8), *mid, nn.Tanh(), nn.Linear(8, 1))
    params = model.parameters()
    opt = torch.optim.Adam(params, lr=0.01) if adam else torch.optim.SGD(params, lr=0.05)
    seen: list = []
    mon = PhaseMonitor(
        opt, model=model, log_every=5, lenses=lens_list, sinks=[seen.append, *sinks], **kwargs
    )
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    for i in range(steps):
        opt.zero_grad()
        b = slice(16 * (i % 4), 16 * (i % 4) + 16)
        loss = _loss_fn(model, (x[b], y[b]))
        loss.backward()
        mon.observe(loss=loss)
        opt.step()
    mon.close()
    return mon, seen


def record_keys(seen):
    return {k for r in seen if "header" not in r and "event" not in r for k in r}


@pytest.mark.parametrize("case", ["default", "full", "user", "subsets"])
def test_header_lists_exactly_the_keys_the_records_hold(case):
    kwargs: dict = {}
    if case == "default":
        lens_list = None
    elif case == "full":
        lens_list = lenses.full()
    elif case == "user":
        lens_list = [ParamCount(), Signed()]
    else:  # weights only (no LayerNorm layer), Adam's moments, sampling, a probe, "/" layers
        lens_list = [
            GradSNR(weights_only=True),
            WeightNorms(distance=False),
            lenses.BatchSNR("optimizer"),
        ]
        data = (torch.randn(16, 4), torch.randn(16, 1))
        kwargs = dict(
            adam=True,
            norm=True,
            overhead_budget=0.5,
            layers=lambda n: f"b/{n[0]}",
            probes=[probes.sharpness_probe(_loss_fn, data, every=10, per_decade=None)],
            probe_budget=1.0,
        )
    mon, seen = run(lens_list, **kwargs)
    header = seen[0]
    assert header["header"] == HEADER_VERSION == 2
    assert set(key_index(header)) == record_keys(seen)
    schema = header["schema"]
    assert {schema[m]["source"] for m in ("step", "loss", "phase")} == {
        "monitor",
        "observe",
        "PhaseDetector",
    }
    if case == "user":
        assert schema["param_count"] == {
            "source": "ParamCount",
            "doc": "",
            "scale": "log",
            "whole": True,
            "layers": ["0", "2"],
        }
        assert schema["signed"]["whole"] is False and schema["signed"]["scale"] == "linear"
    if case == "subsets":
        assert schema["grad_snr"]["layers"] == ["b/0", "b/3"]  # the LayerNorm "b/1" has no matrix
        assert schema["adam_snr"]["layers"] == ["b/0", "b/1", "b/3"]
        assert "weight_dist" not in schema and "batch_snr" not in schema
        assert schema["eos_ratio"]["source"] == "probe sharpness"
        assert {"update_every", "probe_time_fraction"} <= set(schema)


def test_declared_keys_default_from_metrics():
    assert declared(ParamCount()) == (Key("param_count"),)
    assert [k.name for k in declared(lenses.GradSNR())] == ["grad_mean", "grad_std", "grad_snr"]
    assert lenses.GradSNR.metrics == ("grad_mean", "grad_std", "grad_snr")
    with pytest.raises(ValueError, match="may not hold '/'"):
        Key("a/b")
    with pytest.raises(ValueError, match="logs nothing"):
        Key("a", per_layer=False, whole=False)
    with pytest.raises(ValueError, match="scale"):
        Key("a", scale="cubic")


def _write(tmp_path):
    """A run with "/" in its layer names, to a JSONL file, and the same run headerless."""
    path = tmp_path / "run.jsonl"
    mon, _ = run(
        [*lenses.default(), ParamCount(), Signed()],
        steps=60,
        sinks=[JSONLSink(path)],
        layers=lambda n: f"blk/{n[0]}",
    )
    old = tmp_path / "old.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    old.write_text(
        "".join(
            json.dumps({k: v for k, v in r.items() if k != "run"}) + "\n"
            for r in lines
            if "header" not in r
        )
    )
    return mon, path, old


def _png(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def test_schema_survives_the_jsonl_round_trip(tmp_path):
    mon, path, _ = _write(tmp_path)
    _write(tmp_path)  # a second run appended to the file
    first, second = sgdlens.runs(path)
    assert first["header"]["schema"] == mon.history.header["schema"]
    assert second["header"]["schema"] == first["header"]["schema"]
    assert sgdlens.load(path, run=0).header == mon.history.header


def test_schema_and_headerless_file_read_the_same(tmp_path):
    _, path, old = _write(tmp_path)
    new_h, old_h = sgdlens.load(path), sgdlens.load(old)
    assert new_h.header is not None and old_h.header is None
    for metric in ("grad_snr", "weight_norm", "grad_norm", "phase", "param_count", "signed"):
        assert new_h.layers(metric) == old_h.layers(metric) == ["blk/0", "blk/2"], metric
    assert new_h.split("grad_snr/blk/0") == old_h.split("grad_snr/blk/0") == ("grad_snr", "blk/0")
    assert layers(new_h) == layers(old_h) == ["blk/0", "blk/2"]
    assert summary(new_h) == summary(old_h)
    assert plot.available(new_h) == plot.available(old_h)
    figures = [getattr(plot, f) for f in plot.available(new_h)] + [plot.heatmap]
    for draw in figures:
        assert _png(draw(new_h)) == _png(draw(old_h)), draw.__name__
    # a declared linear metric is drawn on a linear scale (by parsing: log, as before)
    assert not isinstance(plot.heatmap(new_h, "signed").axes[0].collections[0].norm, LogNorm)
    assert isinstance(plot.heatmap(old_h, "grad_norm").axes[0].collections[0].norm, LogNorm)


def test_schema_keys_are_looked_up_not_split():
    header = {
        "header": 2,
        "run": "r",
        "schema": {
            "grad_snr": {"source": "GradSNR", "whole": True, "layers": ["enc/0", "head"]},
            "barrier/init": {"source": "probe barrier-init", "whole": True, "layers": []},
        },
    }
    record = {"step": 1, "grad_snr/enc/0": 1.0, "grad_snr/head": 2.0, "barrier/init": 0.1}
    new, old = History([header, record]), History([record])
    assert new.layers("grad_snr") == old.layers("grad_snr") == ["enc/0", "head"]
    assert new.split("barrier/init") == ("barrier/init", "")  # one number, not a layer
    assert new.layers("barrier") == [] and old.layers("barrier") == ["init"]
    bad = {**header, "schema": {"grad_snr": 3, "x": {"layers": "ab"}, "y": {"layers": [1, ""]}}}
    assert History([bad, record]).layers("grad_snr") == ["enc/0", "head"]  # parsed instead


def test_report_lists_the_keys(tmp_path):
    _, path, old = _write(tmp_path)
    page = report_html(sgdlens.load(path))
    assert '<section id="keys">' in page and "grad_snr/&lt;layer&gt; (2 layers)" in page
    assert "minus the weight norm" in page
    assert '<section id="keys">' not in report_html(sgdlens.load(old))


def test_report_lists_keys_first_written_after_the_header(tmp_path):
    """The header goes out with the first record; a name first observed later is still listed
    in the report's keys table (and only it: every other key is in the schema)."""
    from sgdlens.report import _undeclared

    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "late.jsonl"
    mon = PhaseMonitor(opt, model=model, log_every=5, sinks=[JSONLSink(path)])
    for i in range(20):
        opt.zero_grad()
        model(torch.randn(4, 2)).square().mean().backward()
        if i >= 12:
            mon.observe(val_acc=0.5)
        opt.step()
    mon.close()
    history = sgdlens.load(path)
    assert "val_acc" not in history.header["schema"]
    assert _undeclared(history, history.header["schema"]) == ["val_acc"]
    keys = report_html(history).split('<section id="keys">')[1].split("</section>")[0]
    assert "<td>val_acc</td>" in keys and "not in the run header" in keys


class SlashMetric(Lens):
    """A user lens (as written before schemas) whose one metric name holds '/'."""

    name = "acc"
    metrics = ("acc/train",)

    def init(self, view):
        return {}

    def compute(self, state, step):
        return {"acc/train": torch.tensor(0.5)}


def test_a_metric_name_holding_a_slash_is_a_whole_model_key():
    # it used to fail at the first record, inside optimizer.step(), building the header
    mon, _ = run([SlashMetric()], steps=20)
    assert mon.history.records[-1]["acc/train"] == 0.5
    assert mon.history.split("acc/train") == ("acc/train", "")
    assert key_index(mon.history.header)["acc/train"] == ("acc/train", "")


@pytest.mark.parametrize(
    ("attrs", "error"),
    [
        ({"metrics": ("",)}, ValueError),
        ({"keys": ("acc",)}, TypeError),
        ({"metrics": "loss"}, TypeError),
        ({"metrics": ("acc", 3)}, TypeError),
    ],
)
def test_invalid_declared_keys_are_refused_at_construction(attrs, error):
    lens = type("Bad", (SlashMetric,), attrs)()
    model = nn.Linear(3, 1)
    with pytest.raises(error, match=r"lenses=\.\.\.\)\[0\] Bad"):
        PhaseMonitor(torch.optim.SGD(model.parameters(), lr=0.1), model=model, lenses=[lens])
