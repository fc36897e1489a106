"""Hugging Face Trainer + sgdlens: a tiny GPT-2 learns generated sentences; the phases land in
``trainer.state.log_history`` beside the Trainer's own loss.

Nothing is downloaded: the model is built from a ``GPT2Config`` (2 layers, width 64) and the
text is generated here from a small grammar ("the red cat sees a small dog."), tokenised by
characters. ``attach(trainer)`` places sgdlens's callback before the ``report_to``
integrations and feeds it each batch's loss. The script prints, at logging steps, the
Trainer's loss beside sgdlens's (the same number, measured independently) and the gradient
SNR for the whole model and two layers. The whole model's reads above 1 for the first ~20
steps while the loss falls fast (drift: the token embedding and the final LayerNorm carry
it, and the detector calls them and the model drift at step 10), then well below 1
(diffusion). The two block layers shown read below 1 from the first record: the blocks never
drift here, and the detector, which smooths over 250 steps, calls them diffusion when its
250-step warm-up ends, and the whole model at about step 140. It also prints the phase
events as they happen and a sentence the trained model writes.

Run: ``OMP_NUM_THREADS=1 python examples/hf_trainer_tiny.py`` (about 30 s on one CPU core).
Needs: ``pip install "sgdlens[transformers]"``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the Hub: everything is local
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import random
import tempfile
import time
import warnings

import torch
from torch.utils.data import Dataset
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PrinterCallback,
    Trainer,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

from sgdlens.integrations.transformers import attach

warnings.filterwarnings("ignore", category=FutureWarning)
hf_logging.set_verbosity_error()

WORDS = {
    "det": ["the", "a"],
    "adj": ["red", "small", "old", "quick"],
    "noun": ["cat", "dog", "bird", "fox"],
    "verb": ["sees", "likes", "chases"],
}
LENGTH = 40


def sentence(rng: random.Random) -> str:
    def phrase() -> str:
        words = [rng.choice(WORDS["det"])]
        if rng.random() < 0.5:
            words.append(rng.choice(WORDS["adj"]))
        return " ".join([*words, rng.choice(WORDS["noun"])])

    return f"{phrase()} {rng.choice(WORDS['verb'])} {phrase()}."


class Sentences(Dataset):
    """Generated sentences, one per example, padded with spaces to ``LENGTH`` characters."""

    def __init__(self, n: int, vocab: dict[str, int], seed: int = 0) -> None:
        rng = random.Random(seed)
        texts = [("^" + sentence(rng)).ljust(LENGTH)[:LENGTH] for _ in range(n)]
        self.ids = torch.tensor([[vocab[c] for c in t] for t in texts])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    start = time.perf_counter()
    chars = sorted(set("^ .abcdefghijklmnopqrstuvwxyz"))
    vocab = {c: i for i, c in enumerate(chars)}
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(chars), n_positions=LENGTH, n_embd=64, n_layer=2,
                        n_head=4, bos_token_id=vocab["^"], eos_token_id=vocab["."])  # fmt: skip
    model = GPT2LMHeadModel(config)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            max_steps=300,
            per_device_train_batch_size=32,
            learning_rate=3e-3,
            warmup_steps=20,
            logging_steps=10,
            report_to="none",  # or ["tensorboard"], ["wandb"], ...: they get sgdlens's keys too
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=Sentences(2048, vocab))
        trainer.remove_callback(PrinterCallback)  # the table below shows the logs instead
        callback = attach(trainer)  # log_every: the Trainer's logging_steps
        trainer.train()

    a, b = "transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"
    print(f"\n{'step':>5} {'HF loss':>8} {'sgdlens loss':>12} {'grad SNR':>9} "
          f"{'SNR h.0 attn':>12} {'SNR h.1 mlp':>11}")  # fmt: skip
    for e in trainer.state.log_history:
        if "sgdlens/grad_snr" in e and (e["step"] <= 50 or e["step"] % 50 == 0):
            print(
                f"{e['step']:>5} {e['loss']:>8.4f} {e['sgdlens/loss']:>12.4f} "
                f"{e['sgdlens/grad_snr']:>9.3f} {e['sgdlens/grad_snr/' + a]:>12.3f} "
                f"{e['sgdlens/grad_snr/' + b]:>11.3f}"
            )
    monitor = callback.monitor
    assert monitor is not None
    print(f"\nfinal phase: {monitor.phase}; layers in diffusion: "
          f"{sum(p == 'diffusion' for p in monitor.phases.values())}/{len(monitor.phases)}")  # fmt: skip

    model.eval()
    prompt = torch.tensor([[vocab[c] for c in "^the "]])
    with torch.no_grad():
        out = model.generate(prompt, max_length=LENGTH, do_sample=False, pad_token_id=vocab[" "])
    text = "".join(chars[i] for i in out[0].tolist())[1:]
    print(f"the model writes: {text.split('.')[0]}.")
    print(f"took {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
