"""Per-step cost of the NoiseScale estimators against a bare training step.

The three models of ``benchmarks/overhead.py`` (imported from there). Every step runs two
micro-batches of half the batch (gradient accumulation), bare and watched alike, so the
accumulation estimator has something to read and all rows do the same training work. Two
identical copies train side by side, steps interleaved (bare, watched, bare, ...); printed:
the median over pairs of (watched step / bare step), and the peak resident memory of a
process running only that configuration minus that of one running the bare steps
(``--no-memory`` skips those subprocesses).

Rows: ``monitor, no lens`` (the monitor's own per-step work, which every other row
includes: reading each gradient's norm and finiteness), ``accumulation`` (micro-batch hooks), ``per-sample hooks`` (layer rules only;
parameters without a rule are left out), ``per-sample auto`` (rules + ``torch.func`` for
the rest), ``torch.func`` (every module through vmap over vjp), ``BatchSNR``
(per-sample sums and per-element squares, at logged steps only), and both per-sample lenses
together (they share the monitor's one per-sample engine).

Usage: python benchmarks/noise_scale.py [--steps 40] [--log-every 10] [--device cpu]
    [--no-memory] [--only "per-sample hooks"] [--model cnn]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import MODELS, data

from sgdlens import PhaseMonitor
from sgdlens.lenses import BatchSNR, NoiseScale

warnings.filterwarnings("ignore", message="There is a performance drop")

LENSES = {
    "monitor, no lens": lambda: None,
    "accumulation": lambda: NoiseScale("accumulation"),
    "per-sample hooks": lambda: NoiseScale("per_sample", per_sample="hooks"),
    "per-sample auto": lambda: NoiseScale("per_sample", per_sample="auto"),
    "torch.func": lambda: NoiseScale("per_sample", per_sample="func"),
    "BatchSNR": lambda: BatchSNR(),
    "NoiseScale + BatchSNR (one engine)": lambda: [NoiseScale("per_sample"), BatchSNR()],
}


def setup(kind, build, lens_name, log_every, device):
    torch.manual_seed(0)
    model = build().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    mon = None
    if lens_name is not None:
        lens = LENSES[lens_name]()
        chosen = [] if lens is None else lens if isinstance(lens, list) else [lens]
        mon = PhaseMonitor(opt, model=model, lenses=chosen, log_every=log_every, detector=False)
    x, y = data(kind, device)
    halves = list(zip(x.chunk(2), y.chunk(2)))

    def step():
        opt.zero_grad(set_to_none=True)
        for xb, yb in halves:
            out = model(xb)
            n = out.shape[0]
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), yb.reshape(n, -1).reshape(-1))
            (loss / 2).backward()
        opt.step()

    return model, step, mon


def ratio(kind, build, lens_name, steps, log_every, device):
    _, bare, _ = setup(kind, build, None, log_every, device)
    _, watched, mon = setup(kind, build, lens_name, log_every, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: list[list[float]] = [[], []]
    warm = 5
    for i in range(steps + warm):
        for j in (0, 1) if i % 2 == 0 else (1, 0):
            sync()
            t0 = time.perf_counter()
            (bare, watched)[j]()
            sync()
            if i >= warm:
                times[j].append(time.perf_counter() - t0)
    assert mon is not None and mon.history.records, "the lens logged nothing"
    mon.close()
    pairs = [w / b for b, w in zip(*times)]
    return statistics.median(pairs), statistics.median(times[0]) * 1e3


def peak_rss_mb(model_name, lens_name, steps, log_every, device) -> float:
    """Peak RSS (MB) of a fresh process running ``steps`` steps of one configuration
    (from its imports on)."""
    here = os.path.dirname(os.path.abspath(__file__))
    # ru_maxrss survives fork + exec (the child would start from the parent's peak), so the
    # child resets its peak (Linux: "5" into /proc/self/clear_refs) and reads VmHWM.
    code = (
        f"import sys; sys.argv=['x']; sys.path.insert(0, {here!r});"
        f"import noise_scale as b, torch;"
        f"open('/proc/self/clear_refs', 'w').write('5');"
        f"kind, build = b.MODELS[{model_name!r}];"
        f"_, step, _ = b.setup(kind, build, {lens_name!r}, {log_every}, torch.device({str(device)!r}));"
        f"[step() for _ in range({steps})];"
        f"print([ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0].split()[1])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--only", default=None, help="run only lens rows containing this text")
    ap.add_argument("--model", default=None, help="run only models whose name contains this")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, "
        f"{args.steps} interleaved steps of 2 micro-batches, log_every={args.log_every}"
    )
    print("| model | estimator | bare step (ms) | median ratio | added peak RSS (MB) |")
    print("|---|---|---|---|---|")
    for name, (kind, build) in MODELS.items():
        if args.model and args.model not in name:
            continue
        base = None if args.no_memory else peak_rss_mb(name, None, 10, args.log_every, device)
        for lens_name in LENSES:
            if args.only and args.only not in lens_name:
                continue
            r, ms = ratio(kind, build, lens_name, args.steps, args.log_every, device)
            mem = "n/a"
            if base is not None:
                mem = f"{peak_rss_mb(name, lens_name, 10, args.log_every, device) - base:.0f}"
            print(f"| {name} | {lens_name} | {ms:.2f} | {r:.3f} | {mem} |", flush=True)


if __name__ == "__main__":
    main()
