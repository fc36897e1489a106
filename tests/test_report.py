"""sgdlens.report and the report/summary/compare commands: structure, messages, exit codes."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

import sgdlens
from sgdlens import report
from sgdlens.cli import main

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TISHBY = os.path.join(FIXTURES, "tishby.jsonl")
PROBES = os.path.join(FIXTURES, "probes.jsonl")
SGD = os.path.join(FIXTURES, "tishby_sgd.jsonl")
LAYERS = [f"fc{i}" for i in range(1, 7)]


class Page(HTMLParser):
    """The parts of a report page the tests look at."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[dict[str, str]] = []
        self.figures: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.external: list[str] = []
        self.tags: set[str] = set()
        self._table: str | None = None
        self._in_body = False
        self._cell: list[str] | None = None
        self.title = ""
        self._in_title = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        self.tags.add(tag)
        if tag == "section":
            self.sections.append(a.get("id", ""))
        elif tag == "figure":
            self.figures.append(a.get("id", ""))
        elif tag == "img":
            self.images.append(a)
        elif tag == "table":
            self._table = a.get("class", "")
            self.tables[self._table] = []
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body and self._table is not None:
            self.tables[self._table].append([])
        elif tag == "td":
            self._cell = []
        elif tag == "title":
            self._in_title = True
        for k in ("src", "href"):
            if k in a and not a[k].startswith(("data:", "#")):
                self.external.append(a[k])

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body = False
        elif tag == "table":
            self._table = None
        elif tag == "td" and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._in_title:
            self.title += data


@pytest.fixture(scope="module")
def tishby():
    return sgdlens.load(TISHBY)


# ------------------------------------------------------------------------------ pure helpers


def test_split_runs_and_events_follow_their_run(tishby):
    both = sgdlens.History([*tishby.records, *tishby.events])
    assert [len(r) for r in report.split_runs(both)] == [30]
    later = [{**r, "time": r["time"] + 1e4} for r in [*tishby.records, *tishby.events]]
    runs = report.split_runs(sgdlens.History([*tishby.records, *tishby.events, *later]))
    assert [len(r) for r in runs] == [30, 30]
    assert [len(r.events) for r in runs] == [12, 12]
    assert all(e["time"] > 1e4 + tishby.records[0]["time"] for e in runs[1].events)
    assert report.split_runs(sgdlens.History()) == []


def test_transitions_from_events_match_the_phase_columns(tishby):
    from_events = report.transitions(tishby)
    from_columns = report.transitions(sgdlens.History(tishby.records))
    assert from_events == from_columns
    assert from_events["fc1"] == [(350, "warmup", "drift"), (560, "drift", "diffusion")]
    assert from_events[""] == [(350, "warmup", "drift"), (770, "drift", "diffusion")]
    assert report.layers(tishby) == LAYERS


def test_summary_table(tishby):
    text = report.summary(tishby, name="tishby.jsonl")
    lines = text.splitlines()
    assert lines[0] == "tishby.jsonl"
    assert "records: 30" in text and "steps: 70 to 2100" in text and "phase events: 12" in text
    header = next(line for line in lines if line.startswith("layer"))
    assert header.split()[:3] == ["layer", "phase", "transitions"] and "grad_snr" in header
    rows = {
        line.split()[0]: line
        for line in lines
        if line.split() and line.split()[0] in [*LAYERS, "(model)"]
    }
    assert list(rows) == [*LAYERS, "(model)"]
    assert "drift @ 350, diffusion @ 560" in rows["fc1"] and rows["fc6"].split()[1] == "drift"
    snr = report.last_value(tishby, "grad_snr/fc1")
    assert f"{snr:.4g}" in rows["fc1"]


# ------------------------------------------------------------------------------ HTML report


def test_report_structure(tishby):
    text = report.report_html(tishby, title="demo <run>", notes=["a note"])
    page = Page(text)
    assert page.title == "demo <run>"
    assert page.sections == ["summary", "timeline", "figures", "layers", "events"]
    figs = ["fig-gradients", "fig-timeline", "fig-snr", "fig-loss", "fig-weights"]
    assert page.figures == figs
    assert len(page.images) == len(figs)
    for img in page.images:
        assert img["src"].startswith("data:image/png;base64,") and img["alt"]
        assert base64.b64decode(img["src"].split(",", 1)[1])[:4] == b"\x89PNG"
    assert page.external == [] and "script" not in page.tags and "link" not in page.tags
    events = page.tables["events"]
    assert len(events) == len(tishby.events) == 12
    assert events[0][:4] == ["350", "fc1", "drift", "warmup"]
    assert [r[0] for r in page.tables["layers"]] == [*LAYERS, "(model)"]
    assert len(page.tables["transitions"]) == 12
    assert dict(page.tables["facts"])["records"] == "30"


def test_report_of_a_richer_run_has_every_figure():
    history, notes = report.read_run(PROBES)
    page = Page(report.report_html(history))
    assert notes == []
    assert page.figures == [
        "fig-gradients",
        "fig-timeline",
        "fig-snr",
        "fig-loss",
        "fig-noise_scale",
        "fig-weights",
        "fig-sharpness",
    ]
    assert [r[2] for r in page.tables["events"]].count("spike") == 1


# ------------------------------------------------------------------------------ command line


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_report_summary_compare_on_good_files(tmp_path, capsys):
    out = tmp_path / "r.html"
    code, stdout, err = run_cli(capsys, "report", TISHBY, "-o", str(out))
    assert (code, err) == (0, "") and f"wrote {out}" in stdout
    assert len(Page(out.read_text()).images) == 5
    code, stdout, err = run_cli(capsys, "summary", TISHBY)
    assert code == 0 and "fc1" in stdout and "diffusion @ 560" in stdout
    png, page = tmp_path / "c.png", tmp_path / "c.html"
    assert run_cli(capsys, "compare", TISHBY, SGD, "-o", str(png))[0] == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    code, stdout, _ = run_cli(
        capsys, "compare", TISHBY, SGD, "-o", str(page), "--labels", "adam", "sgd"
    )
    assert code == 0 and len(Page(page.read_text()).images) == 1
    code, stdout, _ = run_cli(capsys, "compare", TISHBY, SGD)
    assert code == 0 and "phase tishby.jsonl" in stdout and "fc6" in stdout


def test_cli_report_default_output_next_to_the_run(tmp_path, capsys):
    run = tmp_path / "exp.jsonl"
    with open(PROBES, "rb") as f:
        run.write_bytes(f.read())
    assert run_cli(capsys, "report", str(run))[0] == 0
    assert (tmp_path / "exp.html").exists()


def _lines(path):
    with open(path) as f:
        return f.read().splitlines()


@pytest.mark.parametrize("command", ["report", "summary", "compare"])
@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("empty", "the file is empty"),
        ("blank", "the file is empty"),
        ("missing", "no such file"),
        ("directory", "is a directory"),
        ("png", "binary data, not UTF-8"),
        ("csv", "line 1: not a JSON record"),
        ("json-array", "expected a JSON object, got list"),
        ("foreign-json", "lack a numeric 'step'"),
        ("garbage-middle", "line 2: not a JSON record"),
        ("nested", "line 1: not a JSON record (a JSON value nested too deeply"),
        ("only-truncated", "holds no metric records"),
    ],
)
def test_cli_bad_files_exit_1_with_one_clear_line(tmp_path, capsys, command, kind, message):
    path = tmp_path / f"{kind}.jsonl"
    good = _lines(TISHBY)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "blank":
        path.write_text("\n\n  \n")
    elif kind == "directory":
        path.mkdir()
    elif kind == "png":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    elif kind == "csv":
        path.write_text("step,loss\n1,0.5\n2,0.4\n")
    elif kind == "json-array":
        path.write_text("[1, 2, 3]\n")
    elif kind == "foreign-json":
        path.write_text('{"name": "x"}\n{"name": "y"}\n')
    elif kind == "garbage-middle":
        path.write_text("\n".join([good[0], "garbage", good[2]]) + "\n")
    elif kind == "nested":
        path.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    elif kind == "only-truncated":
        path.write_text(good[0][:40])
    argv = [command, str(path)] + ([TISHBY] if command == "compare" else [])
    if command == "report":
        argv += ["-o", str(tmp_path / "out.html")]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 1
    assert err.startswith(f"sgdlens {command}: error: {path}")
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.html").exists()


@pytest.mark.parametrize("command", ["summary", "report"])
def test_cli_truncated_last_line_is_tolerated_with_a_note(tmp_path, capsys, command):
    good = _lines(TISHBY)
    path = tmp_path / "crashed.jsonl"
    path.write_text("\n".join([*good[:-1], good[-1][:30]]))
    argv = [command, str(path)] + (["-o", str(tmp_path / "r.html")] if command == "report" else [])
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 0
    assert "skipped a truncated last line" in err


def test_cli_appended_runs(tmp_path, capsys):
    path = tmp_path / "two.jsonl"
    with open(SGD) as a, open(TISHBY) as b:
        path.write_text(a.read() + b.read())
    code, stdout, err = run_cli(capsys, "summary", str(path))
    assert code == 0 and "holds 2 runs" in err and "records: 30" in stdout
    code, stdout, err = run_cli(capsys, "summary", str(path), "--run", "0")
    assert code == 0 and "showing run 0 (1 of 2" in err and "records: 20" in stdout
    code, _, err = run_cli(capsys, "summary", str(path), "--run", "5")
    assert code == 1 and "out of range" in err


def test_cli_usage_errors_exit_2(tmp_path, capsys):
    for argv in ([], ["report"], ["summary", TISHBY, "--bogus"], ["compare", TISHBY]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["compare", TISHBY, SGD, "-o", str(tmp_path / "out.txt")])
    assert e.value.code == 2 and ".png, .svg, .pdf or .html" in capsys.readouterr().err


def test_cli_unwritable_output(tmp_path, capsys):
    code, _, err = run_cli(capsys, "report", TISHBY, "-o", str(tmp_path / "no" / "such" / "r.html"))
    assert code == 1 and err.startswith("sgdlens report: error: cannot write")


def test_python_m_sgdlens(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run(
        [sys.executable, "-m", "sgdlens", "summary", TISHBY],
        capture_output=True,
        text=True,
        env=env,
    )
    assert ok.returncode == 0 and "(model)" in ok.stdout and ok.stderr == ""
    foreign = tmp_path / "plot.png"
    foreign.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\xff" * 64)
    bad = subprocess.run(
        [sys.executable, "-m", "sgdlens", "report", str(foreign)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "not a JSONL run" in bad.stderr


def test_fixture_lines_are_records():
    for path in (TISHBY, PROBES, SGD):
        for line in _lines(path):
            assert isinstance(json.loads(line)["step"], int)


# ------------------------------------------------------------------------------ hostile use


@pytest.mark.parametrize("how", ["same-out", "html-input", "compare-out"])
def test_cli_never_overwrites_an_input(tmp_path, capsys, how):
    run = tmp_path / ("run.html" if how == "html-input" else "run.jsonl")
    run.write_bytes(Path(TISHBY).read_bytes())
    before = run.read_bytes()
    argv = {
        "same-out": ["report", str(run), "-o", str(run)],
        "html-input": ["report", str(run)],
        "compare-out": ["compare", str(run), SGD, "-o", str(tmp_path / "." / "run.jsonl")],
    }[how]
    if how == "compare-out":
        argv[-1] = str(tmp_path / "x" / ".." / "run.html")
        argv[1] = str(tmp_path / "run.html")
        os.rename(run, tmp_path / "run.html")
        run = tmp_path / "run.html"
    code, _, err = run_cli(capsys, *argv)
    assert code == 1 and "would be overwritten" in err and run.read_bytes() == before


def test_summary_escapes_terminal_control_characters(tmp_path, capsys):
    path = tmp_path / "evil.jsonl"
    evil = "fc1\x1b[2J\x1b]0;owned\x07\x9b"
    path.write_text(json.dumps({"step": 1, f"grad_snr/{evil}": 2.0, "phase": "drift"}) + "\n")
    code, out, err = run_cli(capsys, "summary", str(path))
    assert code == 0 and "\x1b" not in out and "\x07" not in out and "\x9b" not in out
    assert "fc1\\x1b[2J" in out
    code, out, _ = run_cli(capsys, "compare", str(path), str(path))
    assert code == 0 and "\x1b" not in out


def test_cli_runs_and_run_ids(tmp_path, capsys):
    lines = _lines(TISHBY)
    path = tmp_path / "ids.jsonl"
    head = {"header": 1, "step": 70, "time": 0.0, "optimizer": "Adam", "model": "Sequential"}
    with open(path, "w") as f:
        for rid in ("run-a", "run-b"):
            f.write(json.dumps({**head, "run": rid}) + "\n")
            for line in lines:
                f.write(json.dumps({**json.loads(line), "run": rid}) + "\n")
    code, out, err = run_cli(capsys, "runs", str(path))
    assert code == 0 and err == ""
    rows = [line.split() for line in out.splitlines()[2:]]
    assert [r[:3] for r in rows] == [["0", "run-a", "30"], ["1", "run-b", "30"]]
    assert rows[0][6:8] == ["Adam", "Sequential"]
    code, out, err = run_cli(capsys, "summary", str(path), "--run", "run-a")
    assert code == 0 and "showing run 0 (1 of 2" in err
    code, _, err = run_cli(
        capsys, "report", str(path), "--run", "run-c", "-o", str(tmp_path / "r.html")
    )
    assert code == 1 and "no run with id 'run-c'" in err
    code, out, err = run_cli(capsys, "compare", str(path), str(path), "--run", "0", "run-b")
    assert code == 0 and "showing run 0" in err and "showing run 1" in err


def test_write_report_refuses_to_overwrite_its_run(tmp_path):
    run = tmp_path / "run.jsonl"
    run.write_bytes(Path(TISHBY).read_bytes())
    with pytest.raises(ValueError, match="would be overwritten"):
        report.write_report(run, tmp_path / "." / "run.jsonl")
    assert run.read_bytes() == Path(TISHBY).read_bytes()
