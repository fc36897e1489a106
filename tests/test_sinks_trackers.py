"""WandbSink and MLflowSink against the real libraries, with no server: W&B in offline mode
(its .wandb run file read back with W&B's own protobuf schema) and MLflow's local file store
(read back with MlflowClient). Both must hold the same numbers as the JSONL file."""

from __future__ import annotations

import glob
import json
import math
import struct
import subprocess
import sys
import time

import pytest
import torch

from sgdlens import PhaseDetector, PhaseMonitor, load
from sgdlens.sinks import JSONLSink


def train(sinks, steps=40):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    detector = PhaseDetector(window=2, dwell=1, warmup=2)
    mon = PhaseMonitor(opt, model=model, log_every=5, sinks=sinks, detector=detector)
    x = torch.randn(64, 4)
    y = x.sum(1, keepdim=True)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        mon.observe(loss=loss)
        opt.step()
    mon.close()
    return mon


def same(a, b):
    return a == pytest.approx(b, rel=1e-6) or (math.isnan(a) and math.isnan(b))


# ------------------------------------------------------------------------------ W&B


def wandb_records(path):
    """The records of a W&B offline run file: a 7-byte header, then 32 KiB blocks of
    LevelDB-log records (crc32, length, type) holding wandb_internal_pb2.Record messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    out, pos, buf = [], 7, b""
    while pos + 7 <= len(data):
        block_left = 32768 - pos % 32768
        if block_left < 7:
            pos += block_left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += block_left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        buf += chunk
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def test_wandb_offline_run_holds_the_jsonl_numbers(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from sgdlens.sinks import WandbSink

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    jsonl = tmp_path / "run.jsonl"
    sink = WandbSink(project="sgdlens-test", dir=str(tmp_path))
    mon = train([JSONLSink(jsonl), sink])
    (path,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "*.wandb"))
    for _ in range(300):  # wandb-core may still be writing the file after finish() returns
        records = wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.1)
    rows, config, alerts = [], {}, []
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "history":
            rows.append({i.key or "/".join(i.nested_key): i.value_json for i in r.history.item})
        elif kind == "config":
            config.update({i.key: i.value_json for i in r.config.update})
        elif kind == "alert":
            alerts.append(r.alert.text)
    metric_rows = [row for row in rows if "sgdlens/loss" in row]
    run = load(jsonl)
    assert len(metric_rows) == len(run) == 8
    for row, rec in zip(metric_rows, run.records):
        assert json.loads(row["sgdlens/step"]) == rec["step"]
        for k, v in rec.items():
            if k in ("step", "time") or isinstance(v, str):
                continue
            got = json.loads(row[f"sgdlens/{k}"].replace("NaN", '"NaN"'))
            assert same(float(got), float(v)), k
    assert json.loads(config["sgdlens.run"]) == mon.run_id == run.header["run"]
    assert json.loads(config["sgdlens.optimizer"]) == "SGD"
    assert json.loads(config["sgdlens.param_groups.0.lr"]) == 0.05
    assert alerts == [
        f"step {e['step']}: {e['layer'] or 'model'} {e['old']} -> {e['event']}" for e in run.events
    ]
    assert len(alerts) >= 1


# ------------------------------------------------------------------------------ MLflow


def test_mlflow_file_store_holds_the_jsonl_numbers(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from sgdlens.sinks import MLflowSink

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks to opt in
    uri = (tmp_path / "mlruns").as_uri()
    jsonl = tmp_path / "run.jsonl"
    sink = MLflowSink(tracking_uri=uri, experiment="sgdlens-test")
    mon = train([JSONLSink(jsonl), sink])
    client = MlflowClient(tracking_uri=uri)
    data = client.get_run(sink.run_id).data
    run = load(jsonl)
    keys = {
        k
        for r in run.records
        for k, v in r.items()
        if k not in ("step", "time") and isinstance(v, (int, float))
    }
    assert {"loss", "grad_snr", "grad_snr/0", "weight_norm/2"} <= keys
    assert set(data.metrics) == {k.replace("/", ".") for k in keys}
    for key in keys:  # every number at every step
        history = client.get_metric_history(sink.run_id, key.replace("/", "."))
        assert [m.step for m in history] == [r["step"] for r in run.records]
        for m, rec in zip(history, run.records):
            assert same(m.value, float(rec[key])), key
    assert data.params["sgdlens.run"] == mon.run_id and data.params["sgdlens.optimizer"] == "SGD"
    assert data.params["sgdlens.param_groups.0.lr"] == "0.05"
    assert data.tags["sgdlens.events"] == str(len(run.events)) and len(run.events) >= 1
    model_events = [e for e in run.events if not e["layer"]]
    if model_events:
        assert data.tags["sgdlens.phase"] == model_events[-1]["event"]
    text = client.download_artifacts(sink.run_id, "sgdlens/events.txt", str(tmp_path))
    with open(text) as f:
        assert f.read().splitlines() == sink.events
    assert client.get_run(sink.run_id).info.status == "FINISHED"


def test_mlflow_sink_refuses_an_unknown_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from sgdlens.sinks import MLflowSink

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    with pytest.raises(Exception, match="nope"):
        MLflowSink(tracking_uri=(tmp_path / "m").as_uri(), run_id="nope")
    with pytest.raises(ValueError, match="drop experiment="):
        MLflowSink(run_id="a", experiment="b")
    with pytest.raises(TypeError, match=r"experiment=.*must be a str"):
        MLflowSink(experiment=3)


@pytest.mark.parametrize(
    ("name", "module", "extra"),
    [("WandbSink", "wandb", "wandb"), ("MLflowSink", "mlflow", "mlflow")],
)
def test_missing_tracker_names_the_extra(name, module, extra):
    code = (
        f"import sys; sys.modules[{module!r}] = None\n"
        "import sgdlens.sinks as s\n"
        f"try:\n    getattr(s, {name!r})()\nexcept ImportError as e:\n    print(e)\n"
        f"print({module!r} in sys.modules and sys.modules[{module!r}] is not None)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert f'pip install "sgdlens[{extra}]"' in out.stdout, out.stderr
    assert out.stdout.strip().endswith("False")


def test_import_sgdlens_sinks_imports_no_tracker():
    code = (
        "import sys, sgdlens, sgdlens.sinks;"
        "print(sorted({'wandb', 'mlflow', 'tensorboard'} & {m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
