"""Render the tutorial figures in docs/assets from real runs of the examples (a minute or two).

Run from the repository root: ``python docs/make_figures.py``. Needs matplotlib and
scikit-learn (the ``test`` extra).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from cyclic_lr import run as kick_run  # noqa: E402
from digits_mlp import train  # noqa: E402

from sgdlens import demo, plot  # noqa: E402

ASSETS = ROOT / "docs" / "assets"


def save(fig, name: str) -> None:
    path = ASSETS / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"wrote {path.relative_to(ROOT)}")


def main() -> None:
    ASSETS.mkdir(exist_ok=True)
    tishby = demo.run(epochs=450, log_epochs=5).history
    save(plot.gradient_stats(tishby), "tishby_gradient_stats.png")
    save(plot.snr(tishby), "tishby_snr.png")
    digits = train(verbose=False).history
    save(plot.snr(digits), "digits_snr.png")
    kicked, _ = kick_run(verbose=False)
    save(plot.loss(kicked.history), "kick_loss.png")
    save(plot.snr(kicked.history), "kick_snr.png")


if __name__ == "__main__":
    main()
