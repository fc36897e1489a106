"""Reading and writing runs: torn lines, portable non-finite numbers, hostile files, run ids,
headers, several runs in one file, and the JSONL sink's own failures."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sgdlens
import sgdlens.cli
from sgdlens import PhaseMonitor
from sgdlens.records import History, load, parse_line, read_records, runs, to_json_line
from sgdlens.sinks import JSONLSink

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TISHBY = os.path.join(FIXTURES, "tishby.jsonl")


def strict(line: str):
    """json.loads as a strict reader (jq, a browser) does it: no NaN/Infinity literals."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


def train(path, steps=6, log_every=2, seed=0, sinks=None):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    mon = PhaseMonitor(opt, model=model, log_every=log_every, sinks=sinks or [JSONLSink(path)])
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        mon.observe(loss=loss)
        opt.step()
    mon.close()
    return mon


# ------------------------------------------------------------------------------ torn lines


def test_torn_line_in_the_middle_is_skipped_with_a_note(tmp_path):
    lines = Path(TISHBY).read_text().splitlines()
    path = tmp_path / "torn.jsonl"
    path.write_text("\n".join([lines[0], lines[1][:57], *lines[2:]]) + "\n")
    h = load(path)
    assert len(h) == 29 and h.records[0]["step"] == 70 and h.records[1]["step"] == 210
    assert h.notes == [f"{path}, line 2: skipped a torn record (a writer stopped mid-record)"]


def test_torn_last_line_then_resume_append_loads_and_reports(tmp_path, capsys):
    path = tmp_path / "run.jsonl"
    first = train(path, steps=6)
    text = path.read_text()
    path.write_text(text[: len(text) - 40])  # the writer died mid-record
    second = train(path, steps=4, seed=1)
    assert text[: len(text) - 40].splitlines()[-1] in path.read_text().splitlines()
    h = load(path)  # the last run: the resumed one
    assert [r["step"] for r in h.records] == [2, 4]
    assert h.header["run"] == second.run_id != first.run_id
    assert "skipped a truncated" not in " ".join(h.notes) and len(h.notes) == 1
    listed = runs(path)
    assert [r["run"] for r in listed] == [first.run_id, second.run_id]
    assert [r["records"] for r in listed] == [2, 2]  # the torn third record of the first run
    code = sgdlens.cli.main(["report", str(path), "-o", str(tmp_path / "r.html")])
    assert code == 0 and "skipped a torn record" in capsys.readouterr().err


def test_resume_append_without_the_sink_newline_still_keeps_the_appended_record(tmp_path):
    lines = Path(TISHBY).read_text().splitlines()
    path = tmp_path / "glued.jsonl"
    path.write_text("\n".join([*lines[:2], lines[2][:80] + lines[3], *lines[4:]]) + "\n")
    h = load(path)
    kept = [json.loads(line) for line in lines[:2] + lines[3:]]
    assert h.records == [r for r in kept if "event" not in r] and len(h.records) == 29
    assert h.notes == [f"{path}, line 3: skipped a torn record (a writer stopped mid-record)"]


def test_a_record_torn_inside_a_multibyte_character(tmp_path):
    good = '{"step":1,"layer_é":1.0}'.encode()
    path = tmp_path / "utf8.jsonl"
    path.write_bytes(good + b"\n" + good[:-5] + b"\n" + b'{"step":2}\n')
    assert [r["step"] for r in load(path).records] == [1, 2]


# ------------------------------------------------------------------------------ hostile files


def test_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + Path(TISHBY).read_bytes())
    assert len(load(path)) == 30


def test_non_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2}\nlayer \xe9\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl, line 3: binary data, not UTF-8 .*0xe9"):
        load(path)


def test_deeply_nested_line_is_a_clear_error(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"step": 1}\n' + '{"a":' * 100_000 + "1" + "}" * 100_000 + "\n")
    with pytest.raises(ValueError, match=r"line 2: not a JSON record .*nested too deeply"):
        load(path)
    assert sgdlens.cli.main(["summary", str(path)]) == 1


# ------------------------------------------------------------------------------ NaN and Inf


def test_nonfinite_numbers_are_strict_json_and_come_back(tmp_path):
    record = {
        "step": 3,
        "loss": math.nan,
        "sharpness": math.inf,
        "x": -math.inf,
        "trace/loss": [1.0, math.nan],
        "layer": "NaN",
        "phase/NaN": "drift",
    }
    line = to_json_line(record)
    assert strict(line)["loss"] == "NaN" and strict(line)["trace/loss"] == [1.0, "NaN"]
    back = parse_line(line)
    assert math.isnan(back["loss"]) and back["sharpness"] == math.inf and back["x"] == -math.inf
    assert math.isnan(back["trace/loss"][1]) and back["layer"] == "NaN"
    assert parse_line('{"step": 1, "loss": NaN}')["loss"] != 0  # older files: bare NaN


@given(st.dictionaries(st.text(min_size=1, max_size=8), st.floats(allow_nan=True), max_size=6))
def test_any_float_record_round_trips(values):
    values.pop("header", None), values.pop("event", None)
    record = {"step": 1, **{f"m/{k}": v for k, v in values.items()}}
    back = parse_line(to_json_line(record))
    strict(to_json_line(record))
    assert back.keys() == record.keys()
    for k, v in record.items():
        assert back[k] == v or (math.isnan(v) and math.isnan(back[k]))


def test_monitor_nan_loss_reaches_the_file_as_strict_json(tmp_path):
    path = tmp_path / "nan.jsonl"
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with PhaseMonitor(opt, model=model, log_every=1, sinks=[JSONLSink(path)]) as mon:
        model(torch.randn(4, 2)).sum().backward()
        mon.observe(loss=float("nan"))
        opt.step()
    for line in path.read_text().splitlines():
        strict(line)
    assert math.isnan(load(path)["loss"][0])


# ------------------------------------------------------------------------------ runs


def test_header_describes_the_run(tmp_path):
    path = tmp_path / "h.jsonl"
    mon = train(path)
    first = json.loads(path.read_text().splitlines()[0])
    assert first["header"] == 2 and first["run"] == mon.run_id
    assert first["optimizer"] == "Adam" and first["param_groups"][0]["lr"] == 0.01
    assert first["param_groups"][0]["betas"] == [0.9, 0.999]
    assert first["param_groups"][0]["params"] == 4 and first["parameters"] == 3 * 4 + 4 + 4 + 1
    assert first["model"] == "Sequential" and first["layers"] == ["0", "2"]
    assert first["layer_params"] == [2, 2] and first["log_every"] == 2
    assert first["layer_members"] == {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]}
    assert first["versions"]["torch"] == torch.__version__
    assert first["versions"]["sgdlens"] == sgdlens.__version__
    assert first["device"] == "cpu" and first["world_size"] == 1
    assert first["lenses"] == [repr(lens) for lens in mon.lenses]  # with their settings
    assert first["lenses"][0] == "GradSNR(window=None, weights_only=False)"
    assert mon.history.header == first  # the in-memory history holds it too
    assert all(json.loads(line)["run"] == mon.run_id for line in path.read_text().splitlines())
    assert load(path).header == first


def test_several_runs_in_one_file(tmp_path):
    path = tmp_path / "two.jsonl"
    a = train(path, steps=8)
    b = train(path, steps=4)
    assert [r["run"] for r in runs(path)] == [a.run_id, b.run_id]
    assert [r["records"] for r in runs(path)] == [4, 2]
    assert len(load(path)) == 2 and len(load(path, run=0)) == 4
    assert load(path, run=a.run_id).header["run"] == a.run_id
    with pytest.raises(ValueError, match="no run with id 'nope'"):
        load(path, run="nope")
    with pytest.raises(ValueError, match=r"holds 2 run.*run=2 is out of range"):
        load(path, run=2)
    with pytest.raises(TypeError, match=r"load\(run=...\) must be an int index or a run id"):
        load(path, run=1.0)


def test_two_monitors_interleaving_one_file_are_told_apart(tmp_path):
    path = tmp_path / "both.jsonl"
    torch.manual_seed(0)
    nets = [torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)]
    opts = [torch.optim.SGD(n.parameters(), lr=0.1) for n in nets]
    mons = [
        PhaseMonitor(o, model=n, log_every=1, sinks=[JSONLSink(path)]) for o, n in zip(opts, nets)
    ]
    for _ in range(3):
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            net(torch.randn(4, 2)).pow(2).mean().backward()
            opt.step()
    for m in mons:
        m.close()
    listed = runs(path)
    assert [r["run"] for r in listed] == [m.run_id for m in mons]
    for m in mons:
        assert [r["step"] for r in load(path, run=m.run_id).records] == [1, 2, 3]


def test_files_without_headers_still_load_and_split_at_step_restarts(tmp_path):
    path = tmp_path / "old.jsonl"
    text = Path(TISHBY).read_text()
    path.write_text(text + text)
    assert [r["run"] for r in runs(path)] == [None, None]
    assert len(load(path)) == 30 and load(path).header is None
    assert len(load(path).events) == 12


# ------------------------------------------------------------------------------ the sink


def test_jsonl_sink_refuses_an_empty_or_unwritable_path(tmp_path):
    with pytest.raises(ValueError, match=r"JSONLSink\(path=''\) is empty"):
        JSONLSink("")
    if sys.platform.startswith("linux"):  # not even root creates files in /proc
        with pytest.raises(PermissionError, match="is not writable"):
            JSONLSink("/proc/sgdlens-run.jsonl")
    if sys.platform.startswith("win") or os.geteuid() == 0:
        return  # root writes into read-only folders
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="is not writable"):
            JSONLSink(locked / "run.jsonl")
    finally:
        locked.chmod(0o700)


def test_jsonl_sink_counts_and_keeps_warning_about_lost_records(tmp_path):
    sink = JSONLSink(tmp_path / "gone" / "r.jsonl")
    os.rmdir(tmp_path / "gone")  # the folder disappears before the first write
    with pytest.warns(UserWarning) as caught:
        for step in range(12):
            sink({"step": step})
        sink.close()
    assert sink.dropped == 12
    texts = [str(w.message) for w in caught]
    assert "1 record(s) dropped so far" in texts[0] and "10 record(s) dropped" in texts[1]
    assert "dropped 12 record(s)" in texts[-1]


def test_history_columns_follow_appends():
    h = History([{"step": 1, "loss": 1.0}])
    assert h["loss"].tolist() == [1.0]
    h({"step": 2, "loss": 0.5})
    assert h["loss"].tolist() == [1.0, 0.5]
    h.records.append({"step": 3, "acc": 0.9})  # the list is public
    assert "acc" in h and h["loss"].tolist()[:2] == [1.0, 0.5] and len(h["acc"]) == 3
    items, notes = read_records(TISHBY)
    assert len(items) == 42 and notes == []


def test_loaded_records_share_their_key_and_text_objects(tmp_path):
    """A long run holds each key once, not once per record (issue 16 item 20: memory)."""
    path = tmp_path / "keys.jsonl"
    path.write_text(
        "".join(to_json_line({"step": s, "grad_snr/fc1": 1.0, "phase": "drift"}) for s in (1, 2, 3))
    )
    a, b, c = load(path).records
    assert next(k for k in a if k == "grad_snr/fc1") is next(k for k in c if k == "grad_snr/fc1")
    assert a["phase"] is b["phase"] is c["phase"]
