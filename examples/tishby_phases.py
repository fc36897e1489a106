"""The two phases of SGD, layer by layer, on Shwartz-Ziv & Tishby's own task.

Their 12-10-7-5-4-3-2 tanh network on the 12-bit task (generated exactly by
``sgdlens.datasets.tishby12``), Adam at lr 4e-4, batch 512, one-epoch SNR windows as in the
paper. Prints when each layer leaves drift for diffusion, in steps and epochs, and how much
of its total drop the training loss had made by then. Run: ``python examples/tishby_phases.py``.
"""

from __future__ import annotations

import argparse

import numpy as np

from sgdlens import demo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=450)
    ap.add_argument("--out", default=None, help="also append the run to this JSONL file")
    args = ap.parse_args()
    mon = demo.run(epochs=args.epochs, log_epochs=5, out=args.out)
    h = mon.history
    steps, loss = h["step"], h["loss"]
    drop = loss[0] - loss.min()
    print(f"{'layer':>6} {'step':>6} {'epoch':>6}  loss fallen by")
    for e in mon.events:
        if e.new == "diffusion":
            i = int(np.searchsorted(steps, e.step))
            print(
                f"{e.layer or 'model':>6} {e.step:6d} {e.step / 7:6.0f}  {(loss[0] - loss[i]) / drop:6.0%}"
            )
    print(f"final phases: {mon.phases}; loss {loss[0]:.3f} -> {loss[-1]:.3f}")


if __name__ == "__main__":
    main()
