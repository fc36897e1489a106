"""Per-step overhead of the PhaseMonitor against a bare training step, in one process.

Each variant trains beside its own bare copy of the model, one process, the two copies'
steps interleaved (bare, variant, variant, bare, ...) so that slow drifts of the machine hit
both alike; the variants run one after another. Variants: the default monitor; one with
``PhaseMonitor(lenses=[])`` (the fixed per-step machinery alone); Lightning's ``grad_norm``
every step (what a user pays for the simplest alternative);
``PhaseMonitor(overhead_budget=0.03)`` (the lenses read a sample of the steps); and the default
lenses with ``GradSNR(decay="optimizer")`` in place of ``GradSNR()`` (the running mean read
from the optimizer's own buffer: no copy of the parameters, no per-step window add). Printed per
row: the median over rounds of (variant step time / bare step time) for each variant, and
in brackets the ratio of the mean step times (which counts the log points and, with a
budget, the sampled reads that the median leaves out); with ``overhead_budget`` the two
copies take turns by whole log intervals instead of single steps (the sampler must not time
the bare copy's steps as its own). Then the
bare step time, the monitor's persistent memory in units of one copy of the parameters (and
the peak at a logged step, which also holds the pre-update weights for ``update_size``), and
the number of aten operations the monitor's hooks launch in a non-logging step.

With ``--compile`` every copy runs through ``torch.compile`` (compile time excluded: the
first 80 rounds are warm-up), so the ratios are the monitor's cost beside a compiled step.

Usage: python benchmarks/overhead.py [--steps 300] [--log-every 50] [--device cpu] [--big]
    [--only tiny,mlp] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sgdlens import PhaseMonitor, lenses


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


class Transformer(nn.Module):
    def __init__(self, d: int = 128, seq: int = 64, vocab: int = 1000, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x) + self.pos))


def data(kind: str, device: torch.device):
    g = torch.Generator().manual_seed(0)
    if kind == "transformer":
        x = torch.randint(0, 1000, (16, 64), generator=g)
        y = torch.randint(0, 1000, (16, 64), generator=g)
        return x.to(device), y.reshape(-1).to(device)
    if kind == "transformer-big":
        x = torch.randint(0, 8000, (32, 256), generator=g)
        y = torch.randint(0, 8000, (32, 256), generator=g)
        return x.to(device), y.reshape(-1).to(device)
    if kind == "tiny":
        x = torch.randn(32, 32, generator=g)
        return x.to(device), torch.randint(0, 10, (32,), generator=g).to(device)
    x = torch.randn(128, 1, 28, 28, generator=g)
    return x.to(device), torch.randint(0, 10, (128,), generator=g).to(device)


def tiny() -> nn.Module:
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )


MODELS = {
    "tiny mlp 32-64-64-10, batch 32 (launch-bound)": ("tiny", tiny),
    "mlp 784-512-512-10, batch 128": ("mlp", mlp),
    "cnn 28x28, batch 128": ("cnn", cnn),
    "transformer 2x d128 seq64, batch 16": ("transformer", Transformer),
}
# --big (for a GPU): a step long enough that launch overheads no longer dominate it
BIG = {
    "transformer 6x d512 seq256 vocab 8000, batch 32": (
        "transformer-big",
        lambda: Transformer(d=512, seq=256, vocab=8000, layers=6),
    )
}
OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
}


def nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def hook_ops(monitor: PhaseMonitor, opt) -> int:
    """Aten operations of the monitor's hooks in one non-logging step (gradients in place)."""
    step, monitor.step = monitor.step, 1  # a step that does not log (log_every > 2)
    with _CountOps() as count, torch.no_grad():
        monitor._pre_step(opt, (opt,), {})
        monitor._post_step(opt, (opt,), {})
    monitor.step = step
    return count.n


def lightning_grad_norm():
    try:
        from lightning.pytorch.utilities import grad_norm
    except ImportError:
        return None
    return grad_norm


VARIANTS = (
    "bare",
    "default",
    "lenses=[]",
    "lightning grad_norm",
    "overhead_budget=0.03",
    "GradSNR(decay='optimizer')",
)


def bench(kind, build, make_opt, steps, log_every, device, variant, compiled=False):
    """(bare step in ms, median ratio) of ``variant`` interleaved with a bare copy, plus the
    monitor's memory and hook operations for the monitor variants."""
    torch.manual_seed(0)
    models = [build().to(device) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [make_opt(m.parameters()) for m in models]
    from_optimizer = [
        lenses.GradSNR(decay="optimizer"),
        lenses.WeightNorms(distance=False),
        lenses.GradNorm(),
    ]
    kwargs = {
        "default": {},
        "lenses=[]": {"lenses": []},
        "overhead_budget=0.03": {"overhead_budget": 0.03},
        "GradSNR(decay='optimizer')": {"lenses": from_optimizer},
    }.get(variant)
    monitor = None
    if kwargs is not None:
        monitor = PhaseMonitor(opts[1], model=models[1], log_every=log_every, **kwargs)
    grad_norm = lightning_grad_norm() if variant == "lightning grad_norm" else None
    plain = models
    if compiled:
        models = [torch.compile(m) for m in models]
    x, y = data(kind, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(j):
        model, opt = models[j], opts[j]
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y)
        loss.backward()
        if j == 1 and monitor is not None:
            monitor.observe(loss=loss)
        if j == 1 and grad_norm is not None:
            grad_norm(plain[1], norm_type=2)
        opt.step()

    times: list[list[float]] = [[], []]
    warm = 80 if compiled else 20  # inductor finishes compiling in the background for a while
    # The sampler times a log interval from its first step to the log point: the bare copy's
    # steps must not fall inside it (they would pass for the monitored model's), so with a
    # budget the copies take turns by whole log intervals; otherwise step by step.
    block = log_every if variant == "overhead_budget=0.03" else 1
    for i in range((steps + warm) // block):
        for j in (0, 1) if i % 2 == 0 else (1, 0):
            for _ in range(block):
                sync()
                t0 = time.perf_counter()
                step(j)
                sync()
                if i * block >= warm:
                    times[j].append(time.perf_counter() - t0)
    ratio = statistics.median(t / b for b, t in zip(times[0], times[1]))
    # the median leaves out the rare steps (log points, sampled reads): the mean counts them
    out = {
        "ms": statistics.median(times[0]) * 1e3,
        "ratio": ratio,
        "mean": sum(times[1]) / sum(times[0]),
    }
    if monitor is not None and variant == "default":
        param_bytes = sum(p.numel() * p.element_size() for p in plain[1].parameters())
        out["state"] = nbytes(monitor.states) / param_bytes
        plain[1](x).sum().backward()  # gradients in place for counting the hooks' operations
        out["ops"] = hook_ops(monitor, opts[1])
    if monitor is not None:
        monitor.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--big", action="store_true", help="also a 6-layer d512 transformer (GPU)")
    ap.add_argument("--only", default="", help="comma-separated model kinds, e.g. tiny,mlp")
    ap.add_argument("--optimizers", default="sgd-momentum,adam")
    ap.add_argument("--compile", action="store_true", help="torch.compile every copy")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, "
        f"{args.steps} interleaved rounds, log_every={args.log_every}"
        + (", torch.compile" if args.compile else "")
    )
    print(
        "| model | optimizer | bare step (ms) | default | `lenses=[]` | Lightning grad_norm "
        "| `overhead_budget=0.03` | `GradSNR(decay='optimizer')` | state (param copies) "
        "| peak (param copies) | aten ops per step |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    only = set(filter(None, args.only.split(",")))
    for name, (kind, build) in {**MODELS, **(BIG if args.big else {})}.items():
        if only and kind not in only:
            continue
        for oname in args.optimizers.split(","):
            rows = {
                v: bench(
                    kind,
                    build,
                    OPTIMIZERS[oname],
                    args.steps,
                    args.log_every,
                    device,
                    v,
                    args.compile,
                )
                for v in VARIANTS[1:]
            }
            d = rows["default"]
            cells = " | ".join(
                f"{rows[v]['ratio']:.3f} ({rows[v]['mean']:.3f})" for v in VARIANTS[1:]
            )
            print(
                f"| {name} | {oname} | {d['ms']:.2f} | {cells} | {d['state']:.2f} | "
                f"{d['state'] + 1.0:.2f} | {d['ops']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
