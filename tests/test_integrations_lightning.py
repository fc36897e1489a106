"""The Lightning callback, proven on real ``Trainer.fit`` runs (CPU, a few dozen steps each)."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sgdlens import PhaseMonitor
from sgdlens.integrations.lightning import PhaseMonitorCallback
from sgdlens.phase import PhaseDetector

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec"),
]

N, BATCH = 64, 8  # 8 batches per epoch


def _data(seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 6, generator=g)
    y = (x[:, :3].sum(1) > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)


class Net(pl.LightningModule):
    def __init__(self, lr: float = 0.1, spike_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
        self.lr = lr
        self.spike_at = spike_at
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.losses.append(loss.item())
        self.log("train_loss", loss)
        if self.spike_at is not None and self.global_step == self.spike_at:
            return loss * float("inf")
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def _trainer(tmp_path: Path, *, logger=None, callbacks=(), **kw) -> pl.Trainer:
    kw.setdefault("max_epochs", 2)
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=logger if logger is not None else False,
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        log_every_n_steps=4,
        **kw,
    )


def _csv_rows(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_csv_logger_gets_the_records_and_losses_are_the_batches_before_each_step(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    cb = PhaseMonitorCallback(log_every=4)
    module = Net()
    _trainer(tmp_path, logger=logger, callbacks=[cb]).fit(module, _data())
    rows = [r for r in _csv_rows(logger) if r.get("sgdlens/grad_snr")]
    # the step index of the module's own self.log for the same batch (global_step - 1)
    own = [int(r["step"]) for r in _csv_rows(logger) if r.get("train_loss")]
    assert [int(r["step"]) for r in rows] == [3, 7, 11, 15] == own
    for key in (
        "sgdlens/grad_snr/net.0",
        "sgdlens/grad_snr/net.2",
        "sgdlens/weight_norm",
        "sgdlens/loss",
        "sgdlens/nonfinite_steps",
    ):
        assert key in rows[0], key
    assert not any(k.startswith("sgdlens/phase") for k in rows[0])  # strings stay out
    # each record's loss is the mean of exactly the 4 batches that drove its 4 steps
    for i, r in enumerate(rows):
        expected = sum(module.losses[4 * i : 4 * i + 4]) / 4
        assert float(r["sgdlens/loss"]) == pytest.approx(expected, rel=1e-6)
    assert cb.monitor.step == 16 and len(cb.monitor.history) == 4
    assert cb.monitor.history.records[-1]["phase"] in ("warmup", "drift", "diffusion")
    assert cb.monitor._handles == []  # closed at fit end: no hook left on the optimizer


def test_tensorboard_logger_event_file_read_back_with_tensorboards_reader(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    _trainer(tmp_path, logger=logger, callbacks=[PhaseMonitorCallback(log_every=4)]).fit(
        Net(), _data()
    )
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"sgdlens/grad_snr", "sgdlens/grad_snr/net.0", "sgdlens/loss"} <= set(tags)
    steps = [e.step for e in acc.Scalars("sgdlens/grad_snr")]
    assert steps == [3, 7, 11, 15] == [e.step for e in acc.Scalars("train_loss")]


def test_training_is_bitwise_identical_with_and_without_the_callback(tmp_path):
    plain, watched = Net(), Net()
    _trainer(tmp_path, accumulate_grad_batches=2).fit(plain, _data())
    cb = PhaseMonitorCallback(log_every=2)
    _trainer(tmp_path, callbacks=[cb], accumulate_grad_batches=2).fit(watched, _data())
    assert cb.monitor.step == 8
    for a, b in zip(_params(plain), _params(watched)):
        assert torch.equal(a, b)


def test_gradient_accumulation_counts_real_steps_and_unscaled_losses(tmp_path):
    cb = PhaseMonitorCallback(log_every=2)
    module = Net()
    trainer = _trainer(tmp_path, callbacks=[cb], accumulate_grad_batches=4)
    trainer.fit(module, _data())
    assert trainer.global_step == 4 and cb.monitor.step == 4  # 16 batches, 4 real steps
    records = cb.monitor.history.records
    assert [r["step"] for r in records] == [2, 4]
    # the loss Lightning passes to backward is divided by 4; the record holds the batch mean
    assert records[0]["loss"] == pytest.approx(sum(module.losses[:8]) / 8, rel=1e-6)


def test_resuming_from_a_lightning_checkpoint_continues_the_monitor(tmp_path):
    whole = PhaseMonitorCallback(log_every=4)
    _trainer(tmp_path, callbacks=[whole], max_epochs=2).fit(Net(), _data())

    first = PhaseMonitorCallback(log_every=4)
    trainer = _trainer(tmp_path, callbacks=[first], max_epochs=1)
    trainer.fit(Net(), _data())
    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["callbacks"]["PhaseMonitorCallback"]
    assert state["monitors"][0]["step"] == 8

    second = PhaseMonitorCallback(log_every=4)
    _trainer(tmp_path, callbacks=[second], max_epochs=2).fit(Net(), _data(), ckpt_path=ckpt)
    resumed = second.monitor.history.records
    assert [r["step"] for r in resumed] == [12, 16]  # the step count continues
    for got, want in zip(resumed, whole.monitor.history.records[2:]):
        for key, value in want.items():
            if isinstance(value, str):
                assert got[key] == value, key
            elif key != "time":
                assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_bf16_mixed_precision_on_cpu(tmp_path):
    cb = PhaseMonitorCallback(log_every=4)
    _trainer(tmp_path, callbacks=[cb], precision="bf16-mixed", max_epochs=1).fit(Net(), _data())
    last = cb.monitor.history.records[-1]
    assert cb.monitor.step == 8 and last["nonfinite_steps"] == 0
    assert torch.isfinite(torch.tensor([last["grad_snr"], last["loss"]])).all()


def test_16_mixed_scaler_skips_a_step_and_the_monitor_with_it(tmp_path):
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu"))
    cb = PhaseMonitorCallback(log_every=4)
    module = Net(spike_at=2)  # an infinite loss at the third step: the scaler skips it
    trainer = _trainer(tmp_path, callbacks=[cb], plugins=[plugin])
    trainer.fit(module, _data())
    assert trainer.global_step == 16  # Lightning counts the skipped step
    assert cb.monitor.step == 15  # the optimizer's step() never ran for it, so no hook fired
    records = cb.monitor.history.records
    assert [r["step"] for r in records] == [4, 8, 12]
    assert all(r["nonfinite_steps"] == 0 for r in records)  # skipped: never seen, never counted
    # the skipped batch's (infinite) loss belongs to the first record; the second holds
    # batches 5..8 exactly, unscaled (the scaler multiplied the loss by 2**16 before backward)
    assert records[0]["loss"] == float("inf")
    assert records[1]["loss"] == pytest.approx(sum(module.losses[5:9]) / 4, rel=1e-3)


def test_16_mixed_scaler_reaches_the_noise_scale_lenses(tmp_path):
    """Under "16-mixed" the callback hands Lightning's GradScaler to NoiseScale and BatchSNR:
    a run at scale 2¹⁰ gives the keys of the same run at scale 1 (scaling by a power of two is
    exact in float16); without the hand-over they would be 2²⁰ times too large."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from sgdlens.lenses import BatchSNR, NoiseScale

    def run(scale):
        plugin = MixedPrecision(
            "16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu", init_scale=scale)
        )
        cb = PhaseMonitorCallback(
            log_every=4,
            lenses=[NoiseScale("accumulation", batch_size=BATCH, decay=0.5), BatchSNR()],
        )
        trainer = _trainer(
            tmp_path, callbacks=[cb], plugins=[plugin], max_epochs=1, accumulate_grad_batches=2
        )
        trainer.fit(Net(), _data())
        assert cb.monitor.lenses[0].grad_scaler is plugin.scaler
        return cb.monitor.history.records[-1]

    one, big = run(1.0), run(1024.0)
    keys = [k for k in one if k.startswith(("noise_scale", "grad_noise", "grad_sq", "batch_"))]
    assert keys and all(big[k] == pytest.approx(one[k], rel=1e-5) for k in keys)


class TwoOptimizers(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.a = nn.Linear(6, 2)
        self.b = nn.Linear(6, 2)
        self.losses: dict[str, list[float]] = {"a": [], "b": []}

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_a, opt_b = self.optimizers()
        for name, layer, opt in (("a", self.a, opt_a), ("b", self.b, opt_b)):
            loss = nn.functional.cross_entropy(layer(x), y) * (1.0 if name == "a" else 3.0)
            self.losses[name].append(loss.item())
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.Adam(self.b.parameters())


def test_manual_optimisation_with_two_optimizers(tmp_path):
    logger = CSVLogger(tmp_path, name="two")
    cb = PhaseMonitorCallback(log_every=4)
    module = TwoOptimizers()
    _trainer(tmp_path, logger=logger, callbacks=[cb], max_epochs=1).fit(module, _data())
    assert [m.step for m in cb.monitors] == [8, 8]
    assert cb.monitors[0].view.layers == ("a",) and cb.monitors[1].view.layers == ("b",)
    rows = _csv_rows(logger)
    keys = set().union(*rows)
    assert {"sgdlens/opt0/grad_snr/a", "sgdlens/opt1/grad_snr/b", "sgdlens/opt1/loss"} <= keys
    # each optimizer's monitor got its own loss, not the other's
    for name, monitor in zip("ab", cb.monitors):
        first = monitor.history.records[0]["loss"]
        assert first == pytest.approx(sum(module.losses[name][:4]) / 4, rel=1e-6)


def test_pytorch_lightning_trainer_accepts_the_same_callback(tmp_path):
    import pytorch_lightning as ptl

    class Old(ptl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(6, 2)

        def training_step(self, batch, batch_idx):
            loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cb = PhaseMonitorCallback(log_every=4)
    assert isinstance(cb, ptl.Callback) and isinstance(cb, pl.Callback)
    logger = ptl.loggers.CSVLogger(tmp_path, name="old")
    trainer = ptl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=logger,
        log_every_n_steps=4,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[cb],
    )
    trainer.fit(Old(), _data())
    assert cb.monitor.step == 8 and "grad_snr/net" in cb.monitor.history.records[-1]
    rows = _csv_rows(logger)  # one row per logged step, the module's and the sgdlens keys
    assert [(r["step"], bool(r["train_loss"]), bool(r["sgdlens/grad_snr"])) for r in rows] == [
        ("3", True, True),
        ("7", True, True),
    ]


def test_events_printed_once_and_user_sinks_fed(tmp_path, capsys):
    seen: list[dict] = []
    detector = PhaseDetector(window=1, warmup=1, dwell=1)
    cb = PhaseMonitorCallback(log_every=4, detector=detector, sinks=[seen.append])
    _trainer(tmp_path, callbacks=[cb], max_epochs=1).fit(Net(), _data())
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sgdlens:")]
    assert len(cb.monitor.events) >= 1
    assert len(lines) == len(cb.monitor.events) == len(set(lines))
    assert lines[0].startswith("sgdlens: step 4: ")
    metric = [r for r in seen if "event" not in r and "header" not in r]
    assert len(metric) == 2  # both records reached the sink, after the run's header
    assert seen[0]["header"] == 2 and seen[0]["run"] == cb.monitor.run_id


def test_rank_zero_only_logs_and_prints(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pl.Trainer, "is_global_zero", property(lambda self: False))
    seen: list[dict] = []
    logger = CSVLogger(tmp_path, name="rank1")
    detector = PhaseDetector(window=1, warmup=1, dwell=1)
    cb = PhaseMonitorCallback(log_every=4, detector=detector, sinks=[seen.append])
    _trainer(tmp_path, logger=logger, callbacks=[cb], max_epochs=1).fit(Net(), _data())
    assert cb.monitor.step == 8 and cb.monitor.events  # it still measures on every rank
    assert seen == [] and "sgdlens:" not in capsys.readouterr().out
    assert not (Path(logger.log_dir) / "metrics.csv").exists() or not any(
        k.startswith("sgdlens/") for r in _csv_rows(logger) for k in r
    )


def test_an_optimizer_that_already_has_a_monitor_is_adopted(tmp_path):
    class Wrapped(Net):
        def configure_optimizers(self):
            self.own = PhaseMonitor(opt := torch.optim.SGD(self.parameters(), lr=0.1), log_every=2)
            return opt

    module = Wrapped()
    cb = PhaseMonitorCallback(log_every=4)
    _trainer(tmp_path, callbacks=[cb], max_epochs=1).fit(module, _data())
    assert cb.monitor is module.own and len(module.own.history) == 4
    assert module.own._handles  # the user's monitor stays attached
    assert len(module.own.sinks) == 1  # our relay was removed again
    module.own.close()


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"log_every": 0}, ValueError, ["PhaseMonitorCallback(log_every=0)", ">= 1"]),
        ({"log_every": "10"}, TypeError, ["PhaseMonitorCallback(log_every=...)", "'10'"]),
        ({"model": nn.Linear(1, 1)}, TypeError, ["PhaseMonitorCallback(model=...)", "drop"]),
        ({"sinks": [3]}, TypeError, ["PhaseMonitorCallback(sinks=...)[0]", "not callable"]),
        ({"prefix": 1}, TypeError, ["PhaseMonitorCallback(prefix=...)", "e.g."]),
        ({"print_events": "yes"}, TypeError, ["print_events", "'yes'"]),
        ({"lenses": ["GradSNR"]}, TypeError, ["PhaseMonitorCallback(lenses=...)[0]"]),
        ({"detector": 3}, TypeError, ["PhaseMonitorCallback(detector=...)", "3"]),
        ({"window": 3}, TypeError, ["unexpected keyword", "log_every"]),
    ],
)
def test_constructor_validation(kwargs, error, words):
    with pytest.raises(error) as info:
        PhaseMonitorCallback(**kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_load_state_dict_rejects_foreign_state():
    with pytest.raises(ValueError, match=r"PhaseMonitorCallback\.state_dict"):
        PhaseMonitorCallback().load_state_dict({"step": 3})


def test_building_the_callback_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    PhaseMonitorCallback(log_every=5)
    assert torch.equal(torch.rand(3), expected)


def test_records_between_lightnings_log_steps_still_reach_the_logger(tmp_path):
    logger = CSVLogger(tmp_path, name="odd")
    cb = PhaseMonitorCallback(log_every=3)  # Lightning logs every 4 batches
    _trainer(tmp_path, logger=logger, callbacks=[cb]).fit(Net(), _data())
    rows = _csv_rows(logger)
    steps = [int(r["step"]) for r in rows if r.get("sgdlens/grad_snr")]
    assert steps == [r["step"] - 1 for r in cb.monitor.history.records] == [2, 5, 8, 11, 14]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_csv_rows_hold_the_modules_metrics_and_the_sgdlens_keys_together(tmp_path, accumulate):
    """Issue 13 item 5: where sgdlens's log_every and Lightning's log_every_n_steps coincide,
    the module's self.log metrics and the sgdlens keys share one metrics.csv row."""
    logger = CSVLogger(tmp_path, name="rows")
    cb = PhaseMonitorCallback(log_every=4)  # the Trainer's log_every_n_steps is 4 too
    trainer = _trainer(
        tmp_path, logger=logger, callbacks=[cb], max_epochs=4, accumulate_grad_batches=accumulate
    )
    trainer.fit(Net(), _data())
    rows = _csv_rows(logger)
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps))  # one row per step index
    ours = [r for r in rows if r.get("sgdlens/grad_snr")]
    assert ours and all(r.get("train_loss") for r in ours)  # no row with sgdlens keys only
    assert all(r.get("sgdlens/grad_snr") for r in rows if r.get("train_loss"))
    # optimizer step s (the record's "step") lands at Lightning's step index s - 1
    expected = [r["step"] - 1 for r in cb.monitor.history.records]
    assert [int(r["step"]) for r in ours] == expected == list(range(3, 32 // accumulate, 4))


def test_two_optimizers_records_of_one_batch_share_one_csv_row(tmp_path):
    """Off Lightning's log steps the records of both optimizers at one batch go to the loggers
    in one call (CSVLogger wrote one row per optimizer, both at the same step index)."""
    logger = CSVLogger(tmp_path, name="two_rows")
    cb = PhaseMonitorCallback(log_every=2)  # batches 1, 3, 5, 7; Lightning logs at 3 and 7
    _trainer(tmp_path, logger=logger, callbacks=[cb], max_epochs=1).fit(TwoOptimizers(), _data())
    rows = [r for r in _csv_rows(logger) if r.get("sgdlens/opt0/grad_snr")]
    assert [int(r["step"]) for r in rows] == [1, 3, 5, 7]
    assert all(r.get("sgdlens/opt1/grad_snr") for r in rows)


def test_the_optimizer_reading_lenses_pass_the_constructor_check(tmp_path):
    """The callback's eager check built its throwaway monitor on SGD without momentum, which
    both lenses refuse: PhaseMonitorCallback(lenses=[GradSNR(decay='optimizer')]) always
    raised ValueError. They are checked against the Trainer's optimizer when fitting starts."""
    from sgdlens import lenses

    PhaseMonitorCallback(lenses=[lenses.BatchSNR(source="optimizer")])
    cb = PhaseMonitorCallback(log_every=4, lenses=[lenses.GradSNR(decay="optimizer")])
    _trainer(tmp_path, callbacks=[cb], max_epochs=1).fit(Net(), _data())  # SGD(momentum=0.9)
    assert len(cb.monitor.history) == 2 and cb.monitor.history.records[-1]["grad_snr"] > 0
