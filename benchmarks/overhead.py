"""Per-step overhead of the default PhaseMonitor against a bare training step.

Two identical copies of each model train side by side in one process; their steps interleave
(bare, monitored, bare, ...), so slow drifts of the machine hit both alike. Printed per row:
the median over pairs of (monitored step time / bare step time), the ratio of the median
times, and the monitor's memory in units of one copy of the parameters (persistent state, and
the peak at a logged step, which also holds the pre-update weights for ``update_size``).

Usage: python benchmarks/overhead.py [--steps 300] [--log-every 50] [--device cpu] [--big]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from sgdlens import PhaseMonitor


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
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip


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
    x = torch.randn(128, 1, 28, 28, generator=g)
    return x.to(device), torch.randint(0, 10, (128,), generator=g).to(device)


MODELS = {"mlp 784-512-512-10, batch 128": ("mlp", mlp), "cnn 28x28, batch 128": ("cnn", cnn),
          "transformer 2x d128 seq64, batch 16": ("transformer", Transformer)}  # fmt: skip
# --big (for a GPU): a step long enough that launch overheads no longer dominate it
BIG = {"transformer 6x d512 seq256 vocab 8000, batch 32": (
    "transformer-big", lambda: Transformer(d=512, seq=256, vocab=8000, layers=6))}  # fmt: skip
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


def bench(kind, build, make_opt, steps, log_every, device):
    torch.manual_seed(0)
    bare = build().to(device)
    watched = build().to(device)
    watched.load_state_dict(bare.state_dict())
    opts = [make_opt(bare.parameters()), make_opt(watched.parameters())]
    monitor = PhaseMonitor(opts[1], model=watched, log_every=log_every)
    x, y = data(kind, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(model, opt):
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y)
        loss.backward()
        monitor.observe(loss=loss) if model is watched else None
        opt.step()

    times: list[list[float]] = [[], []]
    for i in range(steps + 20):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for j in order:
            sync()
            t0 = time.perf_counter()
            step((bare, watched)[j], opts[j])
            sync()
            if i >= 20:
                times[j].append(time.perf_counter() - t0)
    pairs = [m / b for b, m in zip(*times)]
    param_bytes = sum(p.numel() * p.element_size() for p in watched.parameters())
    state = nbytes(monitor.states) / param_bytes
    peak = state + 1.0  # WeightNorms holds the pre-update weights during a logged step
    monitor.close()
    return statistics.median(pairs), statistics.median(times[1]) / statistics.median(times[0]), \
        statistics.median(times[0]) * 1e3, state, peak  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--big", action="store_true", help="also a 6-layer d512 transformer (GPU)")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, "
          f"{args.steps} interleaved steps, log_every={args.log_every}")  # fmt: skip
    print(
        "| model | optimizer | bare step (ms) | median ratio | ratio of medians | state (param copies) | peak (param copies) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, (kind, build) in {**MODELS, **(BIG if args.big else {})}.items():
        for oname, make_opt in OPTIMIZERS.items():
            r, rm, ms, state, peak = bench(
                kind, build, make_opt, args.steps, args.log_every, device
            )
            print(
                f"| {name} | {oname} | {ms:.2f} | {r:.3f} | {rm:.3f} | {state:.2f} | {peak:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
