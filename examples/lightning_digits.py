"""Lightning + sgdlens on scikit-learn's digits: drift, then diffusion, in the Trainer's own logs.

A 64-64-32-10 tanh MLP learns the 8×8 digits (bundled with scikit-learn, nothing downloaded)
with SGD-momentum (lr 0.01, batch 256) for 100 epochs; with one-epoch SNR windows every layer
starts in drift (SNR > 1) and falls into diffusion (SNR < 1). ``PhaseMonitorCallback`` attaches to the optimizer the Trainer builds, feeds
it the training loss and logs gradient SNR, weight motion and the loss through the Trainer's
CSVLogger. The script then reads that CSV back — what any Lightning logger would receive — and
prints the whole-model gradient SNR per logged step beside the phase the detector assigned,
followed by the phase events the callback printed as they happened.

Run: ``OMP_NUM_THREADS=1 python examples/lightning_digits.py`` (about 15 s on one CPU core, most of it importing Lightning).
Needs: ``pip install "sgdlens[lightning]" scikit-learn``.
"""

from __future__ import annotations

import csv
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sgdlens.integrations.lightning import PhaseMonitorCallback

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")


class DigitsMLP(pl.LightningModule):
    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)
        )
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main() -> None:
    start = time.perf_counter()
    pl.seed_everything(0, verbose=False)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    data = TensorDataset(x, y)
    loader = DataLoader(data, batch_size=256, shuffle=True, drop_last=True)  # 7 steps an epoch

    callback = PhaseMonitorCallback(log_every=len(loader))  # one record per epoch
    with tempfile.TemporaryDirectory() as tmp:
        logger = CSVLogger(tmp, name="digits")
        trainer = pl.Trainer(
            max_epochs=100,
            accelerator="cpu",
            logger=logger,
            callbacks=[callback],
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            log_every_n_steps=len(loader),
        )
        trainer.fit(DigitsMLP(), loader)
        with open(Path(logger.log_dir) / "metrics.csv") as f:
            rows = [r for r in csv.DictReader(f) if r.get("sgdlens/grad_snr")]

    # a record of optimizer step s lands in Lightning's logs at s - 1, the step index of the
    # module's own self.log for that batch
    phases = {r["step"] - 1: r["phase"] for r in callback.monitor.history.records}
    print(f"\nLightning's CSVLogger holds {len(rows)} sgdlens rows with keys such as")
    print("  " + ", ".join(k for k in rows[0] if k.startswith("sgdlens/grad_snr"))[:96] + " ...")
    print(f"\n{'step':>6} {'grad SNR':>9} {'loss':>8} {'|dw|/|w|':>9}  phase")
    for r in rows[:10] + rows[10::10]:
        step = int(r["step"])
        print(
            f"{step:>6} {float(r['sgdlens/grad_snr']):>9.3f} {float(r['sgdlens/loss']):>8.4f} "
            f"{float(r['sgdlens/update_ratio']):>9.2e}  {phases.get(step, '?')}"
        )
    events = [(e.step, e.layer or "model", e.old, e.new) for e in callback.monitor.events]
    print(f"\nphase events: {events}")
    print(f"final phase: {callback.monitor.phase}; took {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
