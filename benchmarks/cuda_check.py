"""Checks that need a GPU, in one short run (``python benchmarks/cuda_check.py``).

1. ``records``/``probes``: the same monitored float64 training on the CPU and on the GPU
   (several lens sets, a scheduled sharpness probe) gives the same records to 1e-9 relative (the sharpness
   probe's Lanczos starts from a device-dependent random vector: 1e-2); HVP, Lanczos,
   interpolation and 2-d slice probes agree to 1e-6 and leave the parameters unchanged.
2. ``sync``: no lens makes the host wait for the GPU between log points
   (``torch.cuda.set_sync_debug_mode("error")`` on every step that does not log).
3. ``bitwise``: parameters after 30 float32 steps equal those of the unmonitored run exactly.
4. ``scaler``: ``NoiseScale``/``BatchSNR(grad_scaler=)`` through a ``GradScaler`` give the
   unscaled run's keys.
5. ``nccl``: DDP and FSDP2 (``fully_shard``) under the NCCL backend, world size 1, give the
   records of the plain run.
6. ``timings``: ``benchmarks/overhead.py`` and ``benchmarks/noise_scale.py`` on the GPU.

Each section prints ``PASS``/``FAIL`` lines; the script exits non-zero if any failed.
``--device cpu`` runs 1, 3, 4 and 5 (gloo) on the CPU against itself, as a dry run.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import traceback
import warnings

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import Transformer, cnn, mlp

from sgdlens import PhaseMonitor, lenses, probes

warnings.filterwarnings("ignore", message="There is a performance drop")
FAILED: list[str] = []


def report(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def small_transformer() -> nn.Module:
    return Transformer(d=32, seq=16, vocab=50)


def batches(kind: str, device: torch.device, dtype: torch.dtype, n: int = 40):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        if kind == "transformer":
            x = torch.randint(0, 50, (8, 16), generator=g)
            y = torch.randint(0, 50, (8 * 16,), generator=g)
        else:
            x = torch.randn(32, 1, 28, 28, generator=g).to(dtype)
            y = torch.randint(0, 10, (32,), generator=g)
        out.append((x.to(device), y.to(device)))
    return out


BUILD = {"mlp": mlp, "cnn": cnn, "transformer": small_transformer}
LENS_SETS = {
    "default": lenses.default,
    "noise_scale+batch_snr": lambda: [lenses.NoiseScale("per_sample"), lenses.BatchSNR()],
    "accumulation": lambda: [lenses.NoiseScale("accumulation", decay=0.9)],
    "grad_snr_ema+adam_snr": lambda: [lenses.GradSNR(decay=0.9), lenses.BatchSNR("optimizer")],
}


def train(
    kind,
    lens_set,
    device,
    dtype,
    steps=30,
    log_every=10,
    probe=False,
    sync=False,
    wrap=None,
    micro=1,
):
    """Records (and final parameters) of ``steps`` monitored steps; ``lens_set=None``: bare."""
    torch.manual_seed(0)
    model = BUILD[kind]().to(device=device, dtype=dtype)
    module = wrap(model) if wrap is not None else model
    opt_cls = torch.optim.Adam if lens_set == "grad_snr_ema+adam_snr" else torch.optim.SGD
    opt = (
        opt_cls(module.parameters(), lr=1e-3)
        if opt_cls is torch.optim.Adam
        else opt_cls(module.parameters(), lr=0.05, momentum=0.9)
    )
    data = batches(kind, device, dtype)
    mon = None
    if lens_set is not None:

        def loss_fn(m, b):
            return F.cross_entropy(m(b[0]), b[1])

        extra = {}
        if probe and kind != "transformer":
            extra["probes"] = [probes.sharpness_probe(loss_fn, data[0], every=10, per_decade=None)]
        mon = PhaseMonitor(
            opt, model=module, lenses=LENS_SETS[lens_set](), log_every=log_every, **extra
        )
    for i in range(steps):
        logs = (i + 1) % log_every == 0
        if sync:
            torch.cuda.set_sync_debug_mode(0 if logs or i == 0 else "error")
        opt.zero_grad(set_to_none=True)
        x, y = data[i % len(data)]
        for xb, yb in zip(x.chunk(micro), y.chunk(micro)):
            out = module(xb)
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), yb) / micro
            loss.backward()
            if mon is not None:
                mon.observe(loss=loss.detach())
        opt.step()
    if sync:
        torch.cuda.set_sync_debug_mode(0)
    records = mon.history.records if mon is not None else []
    if mon is not None:
        mon.close()
    return records, [p.detach().clone() for p in model.parameters()]


def compare(a: list[dict], b: list[dict], rel: float, loose: dict[str, float]) -> str:
    """'' if the records agree, else the first difference."""
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} records"
    skip = {"time", "probe_time_fraction"}
    for ra, rb in zip(a, b):
        ra = {k.replace("/module.", "/"): v for k, v in ra.items() if k not in skip}
        rb = {k.replace("/module.", "/"): v for k, v in rb.items() if k not in skip}
        keys = set(ra) & set(rb)
        if set(ra) != set(rb):
            return f"keys differ at step {ra.get('step')}: {sorted(set(ra) ^ set(rb))[:5]}"
        for k in sorted(keys):
            va, vb = ra[k], rb[k]
            if isinstance(va, float) and isinstance(vb, float):
                tol = next((t for p, t in loose.items() if k.startswith(p)), rel)
                if math.isnan(va) and math.isnan(vb):
                    continue
                if abs(va - vb) > tol * max(abs(va), abs(vb), 1e-30):
                    return f"step {ra['step']} {k}: {va!r} vs {vb!r}"
            elif va != vb:
                return f"step {ra['step']} {k}: {va!r} vs {vb!r}"
    return ""


def check_records(device: torch.device) -> None:
    cpu = torch.device("cpu")
    for kind in ("mlp", "cnn", "transformer"):
        for lens_set in LENS_SETS:
            micro = 2 if lens_set == "accumulation" else 1
            try:
                ra, _ = train(kind, lens_set, cpu, torch.float64, probe=True, micro=micro)
                rb, _ = train(kind, lens_set, device, torch.float64, probe=True, micro=micro)
                diff = compare(ra, rb, 1e-9, {"sharpness": 1e-2, "eos_ratio": 1e-2})
                report(f"records {kind} {lens_set}", not diff and len(ra) == 3, diff)
            except Exception:
                report(f"records {kind} {lens_set}", False, traceback.format_exc())


def check_probes(device: torch.device) -> None:
    """Each probe on the device against the same probe on the CPU (float64, same directions),
    and the model's parameters unchanged afterwards."""
    from sgdlens import probes as P

    def loss_fn(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    torch.manual_seed(0)
    a_cpu, b_cpu = cnn().double(), cnn().double()
    batch = batches("cnn", torch.device("cpu"), torch.float64)[0]
    dirs = (
        P.random_direction(a_cpu, generator=torch.Generator().manual_seed(1)),
        P.random_direction(a_cpu, generator=torch.Generator().manual_seed(2)),
    )
    results = []
    for dev in (torch.device("cpu"), device):
        a, b = a_cpu.to(dev), b_cpu.to(dev)
        data = tuple(t.to(dev) for t in batch)
        ds = tuple({k: v.to(dev) for k, v in d.items()} for d in dirs)
        before = [p.detach().clone() for p in a.parameters()]
        out = {}
        try:
            out["hvp"] = torch.cat(
                [t.flatten() for t in P.hvp(a, loss_fn, data, ds[0]).value.values()]
            )
            out["sharpness"] = P.sharpness(a, loss_fn, data, k=2, tol=1e-10).eigenvalues
            out["interpolate"] = torch.as_tensor(P.interpolate(a, b, loss_fn, data, steps=5).losses)
            out["landscape_2d"] = torch.as_tensor(
                P.landscape_2d(a, loss_fn, data, steps=5, directions=ds).losses
            )
            out["unchanged"] = torch.tensor(
                float(all(torch.equal(p, q) for p, q in zip(before, a.parameters())))
            )
        except Exception:
            report(f"probes on {dev}", False, traceback.format_exc())
            return
        results.append({k: v.detach().double().cpu() for k, v in out.items()})
    for k in results[0]:
        x, y = results[0][k], results[1][k]
        err = float(((x - y).abs() / y.abs().clamp_min(1e-12)).max())
        report(f"probe {k} on {device} vs cpu", err < 1e-6, f"max rel err {err:.1e}")


def check_sync(device: torch.device) -> None:
    for kind in ("mlp", "cnn", "transformer"):
        for lens_set in LENS_SETS:
            micro = 2 if lens_set == "accumulation" else 1
            try:
                train(kind, lens_set, device, torch.float32, sync=True, micro=micro)
                report(f"sync-free {kind} {lens_set}", True)
            except Exception:
                torch.cuda.set_sync_debug_mode(0)
                report(f"sync-free {kind} {lens_set}", False, traceback.format_exc(limit=-6))


def check_bitwise(device: torch.device) -> None:
    torch.use_deterministic_algorithms(True)
    for kind in ("mlp", "cnn"):
        _, bare = train(kind, None, device, torch.float32)
        _, bare2 = train(kind, None, device, torch.float32, micro=2)
        for lens_set in LENS_SETS:
            if lens_set == "grad_snr_ema+adam_snr":  # trains with Adam, the bare run with SGD
                continue
            micro = 2 if lens_set == "accumulation" else 1
            _, watched = train(kind, lens_set, device, torch.float32, micro=micro)
            same = all(torch.equal(p, q) for p, q in zip(bare2 if micro == 2 else bare, watched))
            report(f"bitwise {kind} {lens_set}", same)
    torch.use_deterministic_algorithms(False)


def check_scaler(device: torch.device) -> None:
    """``NoiseScale``/``BatchSNR(grad_scaler=)`` through a ``torch.amp.GradScaler`` (scale 2¹⁰,
    float32 so that scaling is the only difference) give the unscaled run's keys."""

    def run(scaler):
        torch.manual_seed(0)
        model = cnn().to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        lens = [
            lenses.NoiseScale("accumulation", decay=0.5, grad_scaler=scaler),
            lenses.BatchSNR(grad_scaler=scaler),
        ]
        mon = PhaseMonitor(opt, model=model, lenses=lens, log_every=1, detector=False)
        for x, y in batches("cnn", device, torch.float32, 3):
            opt.zero_grad()
            for xb, yb in zip(x.chunk(2), y.chunk(2)):
                loss = F.cross_entropy(model(xb), yb) / 2
                (loss if scaler is None else scaler.scale(loss)).backward()
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
        mon.close()
        return mon.history.records[-1]

    a, b = run(None), run(torch.amp.GradScaler(device.type, init_scale=1024.0))
    keys = [k for k in a if k.startswith(("noise_scale", "grad_noise", "grad_sq", "batch", "gsnr"))]
    worst = max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-30) for k in keys)
    report(f"grad_scaler on {device}", bool(keys) and worst < 1e-4, f"max rel err {worst:.1e}")


def check_nccl(device: torch.device) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    backend = "nccl" if device.type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(backend, init_method=f"file://{tmp}/init", rank=0, world_size=1)
        try:
            ref, _ = train("mlp", "default", device, torch.float64)
            ids = [device.index or 0] if device.type == "cuda" else None
            ddp, _ = train(
                "mlp", "default", device, torch.float64, wrap=lambda m: DDP(m, device_ids=ids)
            )
            diff = compare(ref, ddp, 1e-9, {})
            report(f"{backend} DDP world 1", not diff, diff)

            def shard(m):
                for layer in m:
                    if isinstance(layer, nn.Linear):
                        fully_shard(layer)
                return fully_shard(m)

            fsdp, _ = train("mlp", "default", device, torch.float64, wrap=shard)
            diff = compare(ref, fsdp, 1e-9, {})
            report(f"{backend} FSDP2 world 1", not diff, diff)
        except Exception:
            report(f"{backend} world 1", False, traceback.format_exc())
        finally:
            dist.destroy_process_group()


def timings(device: torch.device, only_scripts: str) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    scripts = (
        ("overhead.py", ["--steps", "200", "--big"]),
        ("noise_scale.py", ["--steps", "40", "--no-memory"]),
    )
    for script, args in scripts:
        if script not in only_scripts:
            continue
        cmd = [sys.executable, os.path.join(here, script), "--device", str(device), *args]
        print("$", " ".join(cmd[1:]), flush=True)
        res = subprocess.run(cmd, text=True, capture_output=True)
        print(res.stdout + res.stderr[-2000:], flush=True)
        report(f"timings {script}", res.returncode == 0)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scripts", default="overhead.py,noise_scale.py")
    ap.add_argument("--only", default="records,probes,sync,bitwise,scaler,nccl,timings")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        print(torch.__version__, torch.cuda.get_device_name(device), flush=True)
    only = args.only.split(",")
    if "records" in only:
        check_records(device)
    if "probes" in only:
        check_probes(device)
    if "sync" in only and device.type == "cuda":
        check_sync(device)
    if "bitwise" in only:
        check_bitwise(device)
    if "scaler" in only:
        check_scaler(device)
    if "nccl" in only:
        check_nccl(device)
    if "timings" in only and device.type == "cuda":
        timings(device, args.scripts)
    print("FAILED:", FAILED if FAILED else "none")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
