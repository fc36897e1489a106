"""TensorBoardSink: real event files, read back with tensorboard's own reader."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import sgdlens.sinks
from sgdlens import PhaseMonitor
from sgdlens.phase import PhaseDetector
from sgdlens.sinks import TensorBoardSink


def _train(monitor: PhaseMonitor, model: nn.Module, opt: torch.optim.Optimizer, steps: int):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=g)
        opt.zero_grad()
        loss = (model(x) - x[:, :1]).pow(2).mean()
        loss.backward()
        monitor.observe(loss=loss)
        opt.step()


def _reader(log_dir) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return acc


def test_records_become_scalars_at_their_step_and_events_become_text(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sink = TensorBoardSink(tmp_path / "run")
    detector = PhaseDetector(window=1, warmup=1, dwell=1)  # enters a phase at the first record
    monitor = PhaseMonitor(opt, model=model, sinks=[sink], log_every=5, detector=detector)
    _train(monitor, model, opt, 20)
    # flushed per record: readable before close
    acc = _reader(tmp_path / "run")
    scalars = set(acc.Tags()["scalars"])
    assert {"grad_snr", "grad_snr/0", "grad_snr/2", "weight_norm/0", "loss"} <= scalars
    assert not {"step", "time", "phase", "phase/0"} & scalars  # strings and bookkeeping skipped
    history = monitor.history
    for tag in ("grad_snr", "grad_snr/2", "loss", "nonfinite_steps"):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [5, 10, 15, 20]
        assert [e.value for e in events] == pytest.approx(history[tag].tolist(), rel=1e-6)
        assert [e.wall_time for e in events] == pytest.approx(history["time"].tolist())
    # every phase event as one line of text at its step
    assert monitor.events
    texts = acc.Tensors("events/text_summary")
    lines = [t.tensor_proto.string_val[0].decode() for t in texts]
    assert len(lines) == len(monitor.events)
    first = monitor.events[0]
    assert lines[0] == f"step {first.step}: {first.layer or 'model'} {first.old} -> {first.new}"
    monitor.close()  # closes the sink
    with pytest.raises(ValueError, match="closed"):
        sink({"step": 1, "x": 1.0})
    sink.close()  # idempotent


def test_prefix_and_events_off(tmp_path):
    sink = TensorBoardSink(tmp_path, prefix="sgdlens/", events=False)
    sink({"step": 3, "time": 1.0, "grad_snr": 2.0, "phase": "drift", "flag": True})
    sink({"step": 3, "time": 1.0, "event": "drift", "layer": "", "old": "warmup"})
    sink.close()
    acc = _reader(tmp_path)
    assert acc.Tags()["scalars"] == ["sgdlens/grad_snr"]
    assert acc.Tags()["tensors"] == []


def test_import_is_lazy_and_a_missing_tensorboard_names_the_extra(monkeypatch, tmp_path):
    code = (
        "import sys, sgdlens.sinks as s; s.TensorBoardSink;"
        "print('tensorboard' in {m.split('.')[0] for m in sys.modules})"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert "TensorBoardSink" in sgdlens.sinks.__all__ and "TensorBoardSink" in dir(sgdlens.sinks)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r'pip install "sgdlens\[tensorboard\]"'):
        TensorBoardSink(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"log_dir": 3}, TypeError, ["TensorBoardSink(log_dir=...)", "int", "'runs/tb/exp1'"]),
        ({"log_dir": "x", "prefix": 2}, TypeError, ["TensorBoardSink(prefix=...)", "2"]),
        ({"log_dir": "x", "events": 1}, TypeError, ["TensorBoardSink(events=...)", "1"]),
    ],
)
def test_validation(kwargs, error, words):
    with pytest.raises(error) as info:
        TensorBoardSink(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_a_file_is_not_a_log_dir(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match="is a file"):
        TensorBoardSink(path)
