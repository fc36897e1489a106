"""Reading a large run: time and peak memory of ``sgdlens.load`` and ``sgdlens report``.

Generates a JSONL run like a long training of a 6-layer network logged every step (default
200,000 records of about 1.3 kB: the per-layer GradSNR, WeightNorms and GradNorm keys, the phase
strings, a phase event every 5,000 records), then measures, each in a fresh subprocess so that
the peaks do not mix:

* ``load``: ``sgdlens.load(path)``;
* ``report``: ``sgdlens report path -o out.html`` (needs matplotlib);

and prints the wall time, the peak resident memory (``ru_maxrss``) and its ratio to the file
size, and the same for a bare ``python -c "import sgdlens"`` (the interpreter, torch and numpy
alone). Other processes on the machine change the times; say what else was running.

Usage::

    python benchmarks/load.py                   # 200k records (about 260 MB), in a temp folder
    python benchmarks/load.py --records 20000   # a quick run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time

LAYERS = [f"fc{i}" for i in range(1, 7)]


def write_run(path: str, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        header = {"header": 1, "run": "bench", "step": 1, "time": 0.0, "optimizer": "Adam"}
        f.write(json.dumps(header) + "\n")
        for i in range(1, n + 1):
            r: dict[str, object] = {"step": i, "time": 1.7e9 + 0.01 * i}
            phase = "drift" if (i // 5000) % 2 == 0 else "diffusion"
            for layer in LAYERS:
                mean, std = rng.random() / math.sqrt(i), 0.01 + rng.random() * 0.01
                r[f"grad_mean/{layer}"] = mean
                r[f"grad_std/{layer}"] = std
                r[f"grad_snr/{layer}"] = mean / std
                r[f"weight_norm/{layer}"] = 1.0 + rng.random()
                r[f"grad_norm/{layer}"] = rng.random()
                r[f"phase/{layer}"] = phase
            r |= {
                "grad_snr": rng.random(),
                "loss": 2.0 / math.log(i + 2),
                "phase": phase,
                "nonfinite_steps": 0,
                "run": "bench",
            }
            f.write(json.dumps(r, separators=(",", ":")) + "\n")
            if i % 5000 == 0:
                event = {
                    "step": i,
                    "time": 1.7e9,
                    "event": phase,
                    "layer": "",
                    "old": "drift",
                    "run": "bench",
                }
                f.write(json.dumps(event) + "\n")


def measure(code: str) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of ``python -c code`` (the code prints its own time)."""
    probe = (
        "import resource, time, sys\n"
        "t0 = time.perf_counter()\n" + code + "\n"
        "print(time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    seconds, kb = out.stdout.split()[-2:]
    return float(seconds), int(kb) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--no-report", action="store_true", help="skip the report measurement")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "big.jsonl")
        t0 = time.perf_counter()
        write_run(path, args.records)
        size = os.path.getsize(path) / 2**20
        print(f"wrote {args.records} records, {size:.0f} MB in {time.perf_counter() - t0:.1f} s")
        base_t, base_rss = measure("import sgdlens")
        print(f"{'bare import sgdlens':<22} {base_t:7.2f} s  peak RSS {base_rss:7.0f} MB")
        cases = [("load", f"import sgdlens; h = sgdlens.load({path!r}); assert len(h) > 0")]
        if not args.no_report:
            out = os.path.join(tmp, "big.html")
            report = f"from sgdlens.cli import main; assert main(['report', {path!r}, '-o', {out!r}]) == 0"
            cases.append(("report", report))
        for name, code in cases:
            seconds, rss = measure(code)
            print(
                f"{name:<22} {seconds:7.2f} s  peak RSS {rss:7.0f} MB  "
                f"(above the bare import: {rss - base_rss:.0f} MB = "
                f"{(rss - base_rss) / size:.2f} x the file)"
            )


if __name__ == "__main__":
    main()
