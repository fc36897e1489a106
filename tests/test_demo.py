"""`sgdlens demo`: says what the numbers are, shows progress, writes a fresh run, ends with the
command that draws the report."""

from __future__ import annotations

import re
import sys

import sgdlens
from sgdlens.cli import main


def test_demo_explains_writes_a_fresh_run_and_names_the_report_command(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "tqdm", None)  # no tqdm: each line says the time left
    argv = ["demo", "--epochs", "20", "--log-epochs", "5", "--print-every", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "gradient signal-to-noise ratio" in out and "boundary is SNR = 1" in out
    (path,) = (tmp_path / "runs").glob("demo-*.jsonl")
    run_id = path.stem.removeprefix("demo-")
    assert f"writing run {run_id} to {path.relative_to(tmp_path)}" in out
    assert out.rstrip().endswith(f"sgdlens report {path.relative_to(tmp_path)}")
    assert len(re.findall(r"\(about \d+ s left\)", out)) == 4
    listed = sgdlens.runs(path)
    assert [r["run"] for r in listed] == [run_id] and listed[0]["records"] == 4
    # a second demo into the same file is a run of its own, never joined to the first
    assert main([*argv, "--out", str(path)]) == 0
    second = capsys.readouterr().out
    assert [r["records"] for r in sgdlens.runs(path)] == [4, 4]
    assert f"writing run {sgdlens.load(path).header['run']} to" in second
    assert main(["report", str(path), "-o", str(tmp_path / "r.html")]) == 0
