"""The Hugging Face Trainer callback, proven on real ``Trainer.train`` runs of a tiny GPT-2."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: the model is built here
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from transformers.trainer_callback import DefaultFlowCallback

from sgdlens import PhaseMonitor
from sgdlens.integrations.transformers import (
    STATE_FILE,
    PhaseMonitorCallback,
    attach,
)
from sgdlens.phase import PhaseDetector

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


class Counting(Dataset):
    """Sequences ``a, a+d, a+2d, …`` mod 32: learnable by a tiny model in a few steps."""

    def __init__(self, n: int = 32, length: int = 12) -> None:
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, 32, (n, 1), generator=g)
        step = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + step * torch.arange(length)) % 32

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=32,
        n_positions=16,
        n_embd=16,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def _trainer(tmp_path: Path, callbacks=(), **kw) -> Trainer:
    kw.setdefault("max_steps", 12)
    kw.setdefault("logging_steps", 4)
    kw.setdefault("report_to", "none")
    kw.setdefault("save_strategy", "no")
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        **kw,
    )
    return Trainer(model=_model(), args=args, train_dataset=Counting(), callbacks=list(callbacks))


def _train_logs(trainer: Trainer) -> list[dict]:
    return [e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]


def _tb_scalars(folder: Path) -> set[str]:
    tags: set[str] = set()
    for root, _, files in os.walk(folder):
        if any(f.startswith("events.out.tfevents") for f in files):
            acc = EventAccumulator(root)
            acc.Reload()
            tags |= set(acc.Tags()["scalars"])
    return tags


def test_attach_reaches_log_history_and_report_to(tmp_path):
    trainer = _trainer(tmp_path, report_to=["tensorboard"])
    cb = attach(trainer, log_every=None)
    callbacks = trainer.callback_handler.callbacks
    assert isinstance(callbacks[0], DefaultFlowCallback) and callbacks[1] is cb
    trainer.train()
    logs = _train_logs(trainer)
    assert [e["step"] for e in logs] == [4, 8, 12]  # log_every defaults to logging_steps
    for e in logs:
        assert {
            "sgdlens/grad_snr",
            "sgdlens/grad_snr/transformer.h.0.attn.c_attn",
            "sgdlens/weight_norm/transformer.wte",
            "sgdlens/nonfinite_steps",
        } <= set(e)
        # the monitor's loss averages exactly the steps the Trainer's own "loss" averages
        assert e["sgdlens/loss"] == pytest.approx(e["loss"], rel=1e-5)
        assert not any(isinstance(v, str) for v in e.values())
    tags = _tb_scalars(tmp_path)
    assert {"train/sgdlens/grad_snr", "train/sgdlens/loss", "train/loss"} <= tags
    assert cb.monitor is not None and cb.monitor.step == 12
    assert cb.monitor._handles == []  # closed at train end


def test_plain_callback_reaches_log_history_but_not_report_to(tmp_path):
    cb = PhaseMonitorCallback()
    trainer = _trainer(tmp_path, callbacks=[cb], report_to=["tensorboard"])
    trainer.train()
    logs = _train_logs(trainer)
    assert all("sgdlens/grad_snr" in e for e in logs) and len(logs) == 3
    assert not any("sgdlens/loss" in e for e in logs)  # callbacks never see the loss
    tags = _tb_scalars(tmp_path)
    assert "train/loss" in tags and not any("sgdlens" in t for t in tags)  # why attach exists


def test_training_is_bitwise_identical_with_and_without_the_callback(tmp_path):
    plain = _trainer(tmp_path / "plain", gradient_accumulation_steps=2, max_steps=6)
    plain.train()
    watched = _trainer(tmp_path / "watched", gradient_accumulation_steps=2, max_steps=6)
    cb = attach(watched)  # log_every: the Trainer's logging_steps (4)
    watched.train()
    assert cb.monitor is not None and cb.monitor.step == 6  # real steps, not micro-batches
    for a, b in zip(plain.model.parameters(), watched.model.parameters()):
        assert torch.equal(a, b)
    logs = _train_logs(watched)  # one log, at step 4: 8 micro-batches, each loss divided by 2
    assert logs[0]["step"] == 4
    assert logs[0]["sgdlens/loss"] == pytest.approx(logs[0]["loss"], rel=1e-5)


def test_resuming_from_a_trainer_checkpoint_continues_the_monitor(tmp_path):
    whole = _trainer(tmp_path, max_steps=16, save_strategy="steps", save_steps=8)
    first = attach(whole, log_every=4)
    whole.train()
    assert (tmp_path / "checkpoint-8" / STATE_FILE).is_file()
    assert first.monitor is not None
    reference = first.monitor.history.records

    again = _trainer(tmp_path, max_steps=16)
    second = attach(again, log_every=4)
    again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))
    assert second.monitor is not None
    resumed = second.monitor.history.records
    assert [r["step"] for r in resumed] == [12, 16]  # the step count continues
    for got, want in zip(resumed, reference[2:]):
        for key, value in want.items():
            if isinstance(value, str):
                assert got[key] == value, key
            elif key != "time":
                assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_events_printed_once(tmp_path, capsys):
    seen: list[dict] = []
    detector = PhaseDetector(window=1, warmup=1, dwell=1)
    trainer = _trainer(tmp_path, max_steps=8)
    cb = attach(trainer, log_every=4, detector=detector, sinks=[seen.append])
    trainer.train()
    assert cb.monitor is not None and cb.monitor.events
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("sgdlens:")]
    assert len(lines) == len(cb.monitor.events) == len(set(lines))
    assert len([r for r in seen if "event" not in r and "header" not in r]) == 2
    assert seen[0]["header"] == 2 and seen[0]["run"] == cb.monitor.run_id  # the run's header


def test_console_lines_stay_the_trainers_own(tmp_path, capsys):
    """The Trainer prints every key of its logs; the sgdlens keys reach report_to and
    log_history but not the console."""
    trainer = _trainer(tmp_path, report_to=["tensorboard"])
    attach(trainer)
    trainer.train()
    out = capsys.readouterr().out
    printed = [line for line in out.splitlines() if "'loss'" in line]
    assert len(printed) == 3 and all(len(line) < 300 for line in printed)
    assert "sgdlens/" not in out
    assert all("sgdlens/grad_snr" in e for e in _train_logs(trainer))
    assert "train/sgdlens/grad_snr" in _tb_scalars(tmp_path)


def test_an_optimizer_with_a_monitor_is_adopted(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    own = PhaseMonitor(opt, model=model, log_every=2)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=4,
        logging_steps=2,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
    )
    trainer = Trainer(model=model, args=args, train_dataset=Counting(), optimizers=(opt, None))
    cb = attach(trainer)
    trainer.train()
    assert cb.monitor is own and own.step == 4 and own._handles
    assert all("sgdlens/grad_snr" in e for e in _train_logs(trainer))
    own.close()


def test_attach_finds_moves_and_checks(tmp_path):
    cb = PhaseMonitorCallback(log_every=3)
    trainer = _trainer(tmp_path, callbacks=[cb])
    assert attach(trainer) is cb and trainer.callback_handler.callbacks[1] is cb
    assert attach(trainer) is cb  # idempotent: one callback, training_step wrapped once
    assert sum(isinstance(c, PhaseMonitorCallback) for c in trainer.callback_handler.callbacks) == 1
    with pytest.raises(ValueError, match="already has a PhaseMonitorCallback"):
        attach(trainer, log_every=5)
    with pytest.raises(TypeError, match=r"attach\(trainer=...\) needs a transformers.Trainer"):
        attach(object())
    with pytest.raises(TypeError, match=r"attach\(callback=...\)"):
        attach(trainer, callback="cb")


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"log_every": 0}, ValueError, ["PhaseMonitorCallback(log_every=0)", ">= 1"]),
        ({"optimizer": None}, TypeError, ["PhaseMonitorCallback(optimizer=...)", "drop"]),
        ({"sinks": "run.jsonl"}, TypeError, ["PhaseMonitorCallback(sinks=...)", "JSONLSink"]),
        ({"trace_steps": -1}, ValueError, ["PhaseMonitorCallback(trace_steps=-1)"]),
        ({"prefix": None}, TypeError, ["PhaseMonitorCallback(prefix=...)"]),
    ],
)
def test_constructor_validation(kwargs, error, words):
    with pytest.raises(error) as info:
        PhaseMonitorCallback(**kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_building_the_callback_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    PhaseMonitorCallback(log_every=5)
    assert torch.equal(torch.rand(3), expected)


def test_attach_hands_an_fp16_grad_scaler_to_the_noise_scale_lenses(tmp_path):
    """With fp16 the Trainer's accelerator scales the loss; attach() hands its GradScaler to
    NoiseScale and BatchSNR. A GradScaler is set on the CPU run's accelerator (fp16 itself
    needs a GPU): at scale 2¹⁰ the keys equal those at scale 1."""
    from sgdlens.lenses import BatchSNR, NoiseScale

    def run(scale):
        cb = PhaseMonitorCallback(lenses=[NoiseScale("accumulation", decay=0.5), BatchSNR()])
        trainer = _trainer(tmp_path, gradient_accumulation_steps=2, max_grad_norm=0.0)
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        attach(trainer, cb)
        trainer.train()
        assert cb.monitor.lenses[0].grad_scaler is trainer.accelerator.scaler
        return cb.monitor.history.records[-1]

    one, big = run(1.0), run(1024.0)
    keys = [k for k in one if k.startswith(("noise_scale", "grad_noise", "grad_sq", "batch_"))]
    assert keys and all(big[k] == pytest.approx(one[k], rel=1e-5) for k in keys)


def test_resuming_with_the_optimizers_own_moments(tmp_path):
    """GradSNR(decay='optimizer') on a resumed run: the Trainer loads AdamW's state before
    on_train_begin, and the monitor refused an optimizer holding state at construction."""
    from sgdlens import lenses

    def callback():
        return PhaseMonitorCallback(log_every=4, lenses=[lenses.GradSNR(decay="optimizer")])

    first = callback()
    _trainer(tmp_path, [first], max_steps=16, save_strategy="steps", save_steps=8).train()
    second = callback()
    _trainer(tmp_path, [second], max_steps=16).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-8")
    )
    assert second.monitor is not None and first.monitor is not None
    resumed, reference = second.monitor.history.records, first.monitor.history.records[2:]
    assert [r["step"] for r in resumed] == [12, 16]
    for got, want in zip(resumed, reference):
        assert got["grad_snr"] == pytest.approx(want["grad_snr"], rel=1e-6)
