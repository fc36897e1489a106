"""Every constructor argument: bad input raises TypeError/ValueError naming argument, value, fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sgdlens import PhaseMonitor, lenses
from sgdlens.datasets import tishby12
from sgdlens.sinks import JSONLSink


@pytest.fixture
def opt():
    return torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"model": "net"}, TypeError, r"model=.*torch.nn.Module.*str .net."),
        ({"log_every": 0}, ValueError, r"log_every=0.*>= 1"),
        ({"log_every": 2.5}, TypeError, r"log_every=.*2.5"),
        ({"log_every": True}, TypeError, r"log_every=.*True"),
        ({"lenses": lenses.GradSNR()}, TypeError, r"lenses=.*list of lenses"),
        ({"lenses": [object()]}, TypeError, r"lenses=...\)\[0\].*not a lens"),
        ({"lenses": [lenses.GradSNR(), lenses.GradSNR(decay=0.9)]}, ValueError, r"two 'grad_snr'"),
        ({"sinks": "run.jsonl"}, TypeError, r"sinks=.*JSONLSink"),
        ({"sinks": [3]}, TypeError, r"sinks=...\)\[0\].*not callable"),
    ],
)
def test_monitor_arguments(opt, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        PhaseMonitor(opt, **kwargs)
    assert not opt._optimizer_step_post_hooks  # nothing attached on failure


def test_monitor_optimizer_argument():
    with pytest.raises(TypeError, match=r"optimizer=.*torch.optim.Optimizer.*got list \[1, 2\]"):
        PhaseMonitor([1, 2])
    with pytest.raises(ValueError, match="no parameters"):
        PhaseMonitor(torch.optim.SGD([{"params": []}], lr=0.1))


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"window": 0}, ValueError, r"window=0.*>= 1"),
        ({"window": 1.5}, TypeError, r"window=.*1.5"),
        ({"decay": 1.0}, ValueError, r"decay=1.0.*\(0, 1\)"),
        ({"decay": "0.9"}, TypeError, r"decay=.*'0.9'"),
        ({"window": 5, "decay": 0.9}, ValueError, r"window=5, decay=0.9.*one of"),
        ({"weights_only": 1}, TypeError, r"weights_only=.*1"),
    ],
)
def test_grad_snr_arguments(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        lenses.GradSNR(**kwargs)


def test_jsonl_sink_arguments(tmp_path):
    with pytest.raises(TypeError, match=r"path=.*int"):
        JSONLSink(3)
    with pytest.raises(ValueError, match=r"is a folder"):
        JSONLSink(tmp_path)
    with pytest.raises(TypeError, match=r"fsync="):
        JSONLSink(tmp_path / "a.jsonl", fsync="yes")


def test_tishby12_argument():
    with pytest.raises(TypeError, match=r"dtype="):
        tishby12(torch.long)


def test_detector_and_trace_arguments(opt):
    with pytest.raises(TypeError, match=r"detector=.*'yes'"):
        PhaseMonitor(opt, detector="yes")
    with pytest.raises(ValueError, match=r"trace_steps=-1"):
        PhaseMonitor(opt, trace_steps=-1)
    with PhaseMonitor(opt, log_every=10**9) as mon:  # the default trace is capped
        assert mon.tally.trace.shape[0] == 1024


@pytest.mark.parametrize("reductions", [{"sq": "sum"}, ["sq"], {1: "ranks"}])
def test_lens_reductions_are_checked_at_construction(reductions):
    class Bad(lenses.GradNorm):
        pass

    Bad.reductions = reductions
    opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"lenses=\.\.\.\)\[0\] Bad\.reductions = .* 'shards'"):
        PhaseMonitor(opt, lenses=[Bad()])
    assert not opt._optimizer_step_pre_hooks  # refused before any hook was attached


@pytest.mark.parametrize(
    "make",
    [lambda: lenses.NoiseScale(), lambda: lenses.BatchSNR(), lambda: lenses.BatchSNR("optimizer")],
)
def test_lenses_that_cannot_add_up_shards_refuse_fsdp(make):
    """Under FSDP each rank holds a shard of every parameter; NoiseScale and BatchSNR would
    log one rank's partial sums, so they refuse a sharded view when they attach."""
    import dataclasses

    from sgdlens._view import build_view

    model = nn.Linear(2, 1)
    opt = torch.optim.Adam(model.parameters())
    view = dataclasses.replace(build_view(opt, model, 10, "auto"), sharded=True)
    with pytest.raises(ValueError, match=r"cannot run under FSDP: .*shard.*Use it under DDP"):
        make().init(view)
    make().init(dataclasses.replace(view, sharded=False))  # the same view, whole: accepted


def test_warnings_from_hooks_point_at_the_users_line(tmp_path):
    """A warning raised deep in the monitor's hooks (a sink failing inside ``opt.step()``; a
    per-sample module left out inside ``forward``) names the user's file and line."""
    import warnings

    def broken(record):
        raise OSError("disk full")

    class Shared(nn.Module):  # its output does not carry the batch: left out, with a warning
        def __init__(self):
            super().__init__()
            self.pos = nn.Linear(1, 3)

        def forward(self, x):
            return x + self.pos(torch.ones(1, 1))

    model = nn.Sequential(Shared(), nn.Linear(3, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = PhaseMonitor(
        opt, model=model, log_every=1, sinks=[broken], lenses=[lenses.NoiseScale("per_sample")]
    )
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        loss = model(torch.randn(4, 3)).square().mean()
        loss.backward()
        opt.step()
    mon.close()
    where = {str(w.message).split(":")[0][:40]: (w.filename, w.lineno) for w in seen}
    assert any("left out" in str(w.message) for w in seen)
    assert any("failed and is skipped" in str(w.message) for w in seen)
    assert {f for f, _ in where.values()} == {__file__}, where
