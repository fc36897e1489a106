"""Cost of the probes: HVPs to λ_max, seconds per probe, and the 2-D grid vs plain forwards.

Run: ``OMP_NUM_THREADS=1 python benchmarks/probes.py`` (about five minutes on one CPU core).
Prints, for an MLP (784-512-512-10), a small CNN and a 2-layer transformer (d=128, seq 64):

* HVPs Lanczos needs to get λ_max within 1% of a tight reference, against power iteration
  (to the same 1%, and as PyHessian stops it: relative change < 1e-3, at most 100);
* HVPs and error of the default ``probes.sharpness`` call (tol=1e-3);
* seconds per probe divided by the seconds of one training step (forward, backward, SGD step);
* a 21 x 21 ``landscape_2d`` grid's time divided by that of 441 plain forward passes.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sgdlens import probes
from sgdlens.probes.hvp import Operator
from sgdlens.probes.lanczos import lanczos, power_iteration, random_unit


def mlp_case() -> tuple[str, nn.Module, Any, Callable[..., torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )
    x = torch.randn(128, 1, 28, 28)
    y = torch.randint(0, 10, (128,))
    return "MLP 784-512-512-10", model, (x, y), ce


def cnn_case() -> tuple[str, nn.Module, Any, Callable[..., torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )
    x = torch.randn(64, 1, 28, 28)
    y = torch.randint(0, 10, (64,))
    return "CNN 2 conv + fc", model, (x, y), ce


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 64, d: int = 128, seq: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 4, 256, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.enc(self.emb(tokens) + self.pos))


def transformer_case() -> tuple[str, nn.Module, Any, Callable[..., torch.Tensor]]:
    torch.manual_seed(0)
    model = TinyTransformer()
    x = torch.randint(0, 64, (16, 64))
    y = torch.randint(0, 64, (16, 64))

    def loss(m: nn.Module, b: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]).flatten(0, 1), b[1].flatten())

    return "Transformer 2x(d=128), seq 64", model, (x, y), loss


def ce(m: nn.Module, b: Any) -> torch.Tensor:
    return nn.functional.cross_entropy(m(b[0]), b[1])


def warm_up(model: nn.Module, batch: Any, loss_fn: Callable[..., torch.Tensor], steps: int) -> None:
    """A few SGD steps so the Hessian is not that of a random initialisation."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


def timeit(fn: Callable[[], Any], repeat: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def hvps_to_one_percent(model: nn.Module, loss_fn: Any, batch: Any) -> dict[str, Any]:
    with probes.preserved(model):
        op = Operator(model, loss_fn, batch, "eval")
        g = torch.Generator().manual_seed(0)
        v0 = random_unit(op.n, op.theta_flat, g)
        ritz: list[float] = []
        lanczos(op.matvec, v0, 1, 80, 1e-10, "LA", g, lambda j, ev: ritz.append(float(ev[0])))
        ref = ritz[-1]
        lanczos_1pct = next(i + 1 for i, r in enumerate(ritz) if abs(r - ref) <= 0.01 * abs(ref))
        rq: list[float] = []

        def recording(v: torch.Tensor) -> torch.Tensor:
            hv = op.matvec(v)
            rq.append(float(torch.dot(hv, v) / torch.dot(v, v)))
            return hv

        power_iteration(recording, v0, 1, 200, 0.0, g)
        power_1pct = next(
            (i + 1 for i, r in enumerate(rq) if abs(r - ref) <= 0.01 * abs(ref)), None
        )
        op2 = Operator(model, loss_fn, batch, "eval")
        pv, _, _, p_hvps, _ = power_iteration(op2.matvec, v0, 1, 100, 1e-3, g)
    default = probes.sharpness(model, loss_fn, batch, generator=torch.Generator().manual_seed(1))
    return {
        "ref": ref,
        "lanczos_1pct": lanczos_1pct,
        "power_1pct": power_1pct,
        "pyhessian_hvps": p_hvps,
        "pyhessian_err": abs(float(pv[0]) - ref) / abs(ref),
        "default_hvps": default.hvps,
        "default_err": abs(default.value - ref) / abs(ref),
        "method": default.method,
    }


def run_case(
    name: str, model: nn.Module, batch: Any, loss_fn: Callable[..., torch.Tensor], repeat: int
) -> None:
    warm_up(model, batch, loss_fn, 20)
    n = sum(p.numel() for p in model.parameters())
    print(f"== {name}: {n:,} parameters, batch {len(batch[0])}")
    h = hvps_to_one_percent(model, loss_fn, batch)
    pw = h["power_1pct"] if h["power_1pct"] is not None else ">200"
    print(
        f"  lambda_max = {h['ref']:.4g} (HVP via {h['method']})\n"
        f"  HVPs to 1%: Lanczos {h['lanczos_1pct']}, power iteration {pw}; "
        f"PyHessian-style power stop: {h['pyhessian_hvps']} HVPs, "
        f"error {100 * h['pyhessian_err']:.2f}%\n"
        f"  default sharpness() (tol=1e-3): {h['default_hvps']} HVPs, "
        f"error {100 * h['default_err']:.1e}%"
    )
    opt = torch.optim.SGD(model.parameters(), lr=1e-9)

    def train_step() -> None:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()

    with probes.preserved(model, opt):
        step = timeit(train_step, repeat)
    other = {
        k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
        for k, v in model.state_dict().items()
    }
    ones = {k: torch.ones_like(p) for k, p in model.named_parameters()}

    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(1)

    cases: dict[str, Callable[[], Any]] = {
        "hvp": lambda: probes.hvp(model, loss_fn, batch, ones),
        "sharpness k=1": lambda: probes.sharpness(model, loss_fn, batch, generator=gen()),
        "hessian_trace 10": lambda: probes.hessian_trace(
            model, loss_fn, batch, samples=10, generator=gen()
        ),
        "interpolate 30": lambda: probes.interpolate(model, other, loss_fn, batch),
        "landscape_1d 25": lambda: probes.landscape_1d(model, loss_fn, batch, generator=gen()),
        "flatness 4 dirs": lambda: probes.flatness(
            model, loss_fn, batch, directions=4, generator=gen()
        ),
    }
    twin = copy.deepcopy(model)
    twin.load_state_dict(other)
    cases["align weights"] = lambda: probes.align(model, twin, data=batch)
    cases["align activations"] = lambda: probes.align(model, twin, method="activations", data=batch)
    print(f"  one training step: {1000 * step:.1f} ms")
    for label, fn in cases.items():
        try:
            t = timeit(fn, 1)
        except ValueError as e:  # a model alignment cannot follow: say which module
            print(f"  {label:<18} not run: {str(e)[:110]}")
            continue
        print(f"  {label:<18} {t:7.3f} s = {t / step:7.1f} training steps")

    def plain() -> None:
        with probes.preserved(model), torch.no_grad():
            model.eval()
            for _ in range(441):
                loss_fn(model, batch)

    t_plain = timeit(plain, 1)
    for vm in (True, False):

        def grid(vm: bool = vm) -> Any:
            return probes.landscape_2d(model, loss_fn, batch, steps=21, vmap=vm, generator=gen())

        t_grid = timeit(grid, 1)
        how = "vmap chunks of 16" if vm else "loop"
        print(
            f"  21x21 grid ({how}): {t_grid:.2f} s = {t_grid / t_plain:.2f} x 441 plain "
            f"forwards ({t_plain:.2f} s) = {t_grid / step:.0f} training steps"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    repeat = 1 if args.quick else 3
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device cpu\n")
    for case in (mlp_case(), cnn_case(), transformer_case()):
        run_case(*case, repeat)


if __name__ == "__main__":
    main()
