"""A learning-rate kick knocks a converged run out of its basin (Smith & Topin 2017).

The digits MLP of ``digits_mlp.py`` trains at lr 0.01 until every layer is in diffusion. Then
a short, sharp triangular kick (``--half`` steps up to ``--peak`` × the base rate and
``--half`` steps back) multiplies the loss; the detector reports the loss spike, the return to
drift, and diffusion again once the run has re-converged. Run: ``python examples/cyclic_lr.py``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_mlp import train


def triangular_kick(base: float, start: int, half: int, peak: float):
    """lr(step): ``base``, except a triangle up to ``peak × base`` over ``2·half`` steps."""

    def lr_at(step: int) -> float:
        if start <= step < start + 2 * half:
            u = (step - start) / half
            return base * (1 + (peak - 1) * (u if u <= 1 else 2 - u))
        return base

    return lr_at


def run(
    epochs: int = 350,
    kick_epoch: int = 250,
    half: int = 6,
    peak: float = 100.0,
    verbose: bool = True,
):
    steps_per_epoch = 6  # 1437 training digits in batches of 256
    start = kick_epoch * steps_per_epoch
    mon = train(epochs=epochs, lr_at=triangular_kick(0.01, start, half, peak), verbose=verbose)
    return mon, start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=350)
    ap.add_argument("--kick-epoch", type=int, default=250)
    ap.add_argument("--half", type=int, default=6)
    ap.add_argument("--peak", type=float, default=100.0)
    args = ap.parse_args()
    print("phase events:")
    mon, start = run(args.epochs, args.kick_epoch, args.half, args.peak)
    h = mon.history
    steps, loss = h["step"], h["loss"]
    before = loss[steps <= start][-1]
    after = loss[(steps > start) & (steps <= start + 4 * args.half)].max()
    print(f"\nkick at step {start}: loss {before:.4f} -> {after:.3f} ({after / before:.0f}x)")
    print(f"{'step':>6} {'loss':>8} {'fc1':>6} {'fc2':>6} {'fc3':>6}  phase")
    for r in h.records:
        if start - 12 <= r["step"] <= start + 150:
            snr = " ".join(
                f"{r.get(f'grad_snr/{n}', math.nan):6.2f}" for n in ("fc1", "fc2", "fc3")
            )
            print(f"{r['step']:6d} {r['loss']:8.4f} {snr}  {r['phase']}")


if __name__ == "__main__":
    main()
