"""NoiseScale and the per-sample machinery against independent float64 references.

The reference per-example gradients come from ``torch.func`` (vmap over grad of each example's
own loss), written independently of :mod:`sgdlens.lenses.per_sample`.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, vmap

from sgdlens import PhaseMonitor, lenses
from sgdlens.lenses.noise_scale import NoiseScale, two_batch_estimates
from sgdlens.lenses.per_sample import PerSampleEngine

REL = 1e-6


class Attention(nn.Module):
    """Embedding + positional parameter + LayerNorm + multi-head attention + MLP + head."""

    def __init__(self, vocab: int = 11, d: int = 8, seq: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.1)
        self.ln = nn.LayerNorm(d)
        self.att = nn.MultiheadAttention(d, 2, batch_first=True)
        self.fc = nn.Linear(d, 16)
        self.fc2 = nn.Linear(16, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x) + self.pos
        z = self.ln(h)
        h = h + self.att(z, z, z, need_weights=False)[0]
        h = h + self.fc2(torch.relu(self.fc(h)))
        return self.head(h)


class MaskedAttention(nn.Module):
    """Self-attention with a causal float mask, a key-padding mask and no projection biases
    (sequence-first when ``seq_first``), then cross-attention (distinct query, key and
    value) called with keyword arguments, a boolean mask and ``is_causal``."""

    def __init__(self, vocab: int = 11, d: int = 8, seq_first: bool = False) -> None:
        super().__init__()
        self.seq_first = seq_first
        self.emb = nn.Embedding(vocab, d)
        self.att = nn.MultiheadAttention(d, 2, bias=False, batch_first=not seq_first)
        self.att2 = nn.MultiheadAttention(d, 4, batch_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h0 = h = self.emb(x)
        t = x.shape[1]
        causal = torch.full((t, t), float("-inf"), dtype=h.dtype).triu(1)
        s = h.transpose(0, 1) if self.seq_first else h
        a = self.att(s, s, s, key_padding_mask=x == 0, attn_mask=causal, need_weights=False)[0]
        h = h + (a.transpose(0, 1) if self.seq_first else a)
        bool_causal = torch.ones(t, t, dtype=torch.bool).triu(1)
        h = (
            h
            + self.att2(
                query=h,
                key=h0,
                value=h0 * 2,
                attn_mask=bool_causal,
                is_causal=True,
                need_weights=False,
            )[0]
        )  # cross-attention
        return self.head(h)


class Tied(nn.Module):
    """Tied embedding/head weights, a Linear applied twice, and a Conv1d."""

    def __init__(self, vocab: int = 7, d: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.conv = nn.Conv1d(d, d, 3, padding=1)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(torch.tanh(self.mix(self.emb(x)))))
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(h)


class Convs(nn.Module):
    """Convolutions of every supported kind: 1-d with reflect padding, grouped 2-d with
    'same' padding of an even kernel, strided 2-d with circular padding, a 2-d one with few
    positions (norms by the Gram trick) and a 3-d one."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, padding="same", padding_mode="reflect")
        self.c2 = nn.Conv2d(4, 4, 2, padding="same", groups=2)
        self.c3 = nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="circular")
        self.c4 = nn.Conv2d(6, 8, 2)
        self.c5 = nn.Conv3d(2, 2, (1, 2, 2), dilation=(1, 2, 1))
        self.head = nn.Linear(32 + 24 + 40, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c4(torch.tanh(self.c3(torch.tanh(self.c2(torch.cat([x, x], 1))))))
        v = self.c1(x.mean(2))
        w = self.c5(x[:, :, None])
        return self.head(torch.cat([h.flatten(1), v.flatten(1), w.flatten(1)], 1))


class GPT2ish(nn.Module):
    """Hugging Face's ``Conv1D`` (GPT-2's projections, weight ``(in, out)``) and ``nn.RMSNorm``."""

    def __init__(self, vocab: int = 11, d: int = 8) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(vocab, d)
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.c_fc = Conv1D(2 * d, d)
        self.c_proj = Conv1D(d, 2 * d)
        self.head = nn.Linear(d, vocab)
        self.pool = Conv1D(vocab, d)  # on (B, d): one position per sample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        h = h + self.c_proj(torch.tanh(self.c_fc(self.norm(h))))
        return self.head(h) + self.pool(h.mean(1))[:, None, :]


def build(kind: str, seed: int = 0):
    """``(model, x, y)`` in float64; the batch is 9 examples (MLP), 7 (CNN), 6 (sequence)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3))
        x, y = (
            torch.randn(9, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (9,), generator=g),
        )
    elif kind == "cnn":
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(3, 4, 2, stride=2),
            nn.Flatten(),
            nn.Linear(4 * 2 * 2, 3),
        )
        x, y = (
            torch.randn(7, 2, 5, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (7,), generator=g),
        )
    elif kind == "convs":
        model = Convs()
        x, y = (
            torch.randn(5, 2, 6, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (5,), generator=g),
        )
    elif kind == "attention":
        model = Attention()
        x, y = torch.randint(0, 11, (6, 5), generator=g), torch.randint(0, 11, (6, 5), generator=g)
    elif kind in ("masked_attention", "seq_first_attention"):
        model = MaskedAttention(seq_first=kind == "seq_first_attention")
        x = torch.randint(0, 11, (6, 5), generator=g)
        x[:, 0] = torch.randint(1, 11, (6,), generator=g)  # no row fully masked
        y = torch.randint(0, 11, (6, 5), generator=g)
    elif kind == "gpt2ish":
        model = GPT2ish()
        x, y = torch.randint(0, 11, (6, 5), generator=g), torch.randint(0, 11, (6, 5), generator=g)
    elif kind == "tied":
        model = Tied()
        x, y = torch.randint(0, 7, (6, 4), generator=g), torch.randint(0, 7, (6, 4), generator=g)
    else:
        raise ValueError(kind)
    return model.double(), x, y


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over every position of every example."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{name: (B, *shape)}``: gradients of each example's own loss, by vmap over grad."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def one(ps, xi, yi):
        return loss_fn(functional_call(model, ps, (xi[None],)), yi[None])

    return vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)


def layer_of(model: nn.Module) -> dict[str, str]:
    """Parameter name -> layer name (its owning module's name), as the monitor names layers."""
    out = {}
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            out.setdefault(f"{mname}.{pname}" if mname else pname, mname or "model")
    return out


def stats(grads: dict[str, torch.Tensor], names: list[str] | None = None):
    """Within-batch ``(Σ_i ‖g_i‖², ‖ḡ‖², tr Σ̂ (ddof 1), |G|²_unb, GSNR sum, size)``."""
    names = list(grads) if names is None else names
    g = torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in names], 1)
    b = g.shape[0]
    gbar = g.mean(0)
    tr = g.var(0, correction=1).sum()
    mean_sq = gbar.square().sum()
    return g.square().sum(), mean_sq, tr, mean_sq - tr / b, g, gbar


def rel_err(a, b) -> float:
    """The largest entrywise relative error."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(((a - b).abs() / b.abs().clamp_min(1e-300)).max())


def rel_err_max(a, b) -> float:
    """Relative to the largest entry (for tensors with exact zeros, e.g. attention key bias)."""
    return float((a - b).abs().max() / b.abs().max())


KINDS = ["mlp", "cnn", "convs", "attention", "masked_attention", "gpt2ish", "tied"]


# -- per-sample norms -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["auto", "func"])
@pytest.mark.parametrize("need_elem", [False, True])
def test_per_sample_norms_match_torch_func(kind, mode, need_elem):
    model, x, y = build(kind)
    engine, ref = engine_matches_torch_func(model, x, y, mode, need_elem)
    b = x.shape[0]
    for i, (n, _) in enumerate(model.named_parameters()):
        want = ref[n].reshape(b, -1).square().sum(1)
        assert rel_err(engine.sums(x.device)[i] * b * b, want.sum()) < REL, n
        assert engine.count[i] == b


def engine_matches_torch_func(model, x, y, mode, need_elem):
    """One backward of ``model`` through a per-sample engine: every parameter covered, its
    per-sample squared norms (and elementwise sums) those of ``torch.func``. Returns the
    engine and ``torch.func``'s per-sample gradients."""
    ref = per_sample_grads(model, x, y)
    engine = PerSampleEngine(
        model, list(model.parameters()), mode=mode, need_elem=need_elem, keep_last=True
    )
    handles = engine.attach()
    try:
        loss_fn(model(x), y).backward()
    finally:
        for h in handles:
            h.remove()
    b = x.shape[0]
    assert all(engine.covered)
    for i, (n, _) in enumerate(model.named_parameters()):
        want = ref[n].reshape(b, -1).square().sum(1)
        # mean loss: the hooks see c_s = g_s / B
        assert rel_err(engine.last_sq[i] * b * b, want) < REL, n
        if need_elem:
            assert rel_err_max(engine.elem[i] * b * b, ref[n].square().sum(0)) < REL, n
    return engine, ref


class ConvPaths(nn.Module):
    """One convolution per per-sample conv path on the CPU: the unfolded matmul for few input
    channels (strided and dilated; and a 1-d one with uneven 'same' zero padding, called
    twice) and for many, the grouped backward for 5-64 (zero padding inside it, and uneven
    'same' padding)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 66, 3, stride=2, dilation=2, padding=2)  # 9x9 -> 5x5
        self.b = nn.Conv2d(66, 6, 3, padding=1)
        self.c = nn.Conv2d(6, 6, 3, padding=1)
        self.e = nn.Conv2d(6, 6, 2, padding="same")
        self.d = nn.Conv1d(3, 3, 4, padding="same")
        self.head = nn.Linear(6 * 25 + 3 * 9, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.e(torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))))
        v = self.d(torch.tanh(self.d(x.mean(2))))
        return self.head(torch.cat([h.flatten(1), v.flatten(1)], 1))


@pytest.mark.parametrize("need_elem", [False, True])
def test_per_sample_conv_paths_match_torch_func(need_elem):
    torch.manual_seed(0)
    model = ConvPaths().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 9, 9, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=g)
    engine_matches_torch_func(model, x, y, "hooks", need_elem)


def test_sequence_first_attention_is_left_out_of_the_torch_func_rule():
    model, x, y = build("seq_first_attention")
    engine = PerSampleEngine(model, list(model.parameters()), mode="func")
    handles = engine.attach()
    with pytest.warns(UserWarning, match="sequence-first"):
        loss_fn(model(x), y).backward()
    for h in handles:
        h.remove()
    names = [n for n, _ in model.named_parameters()]
    assert {n for n, c in zip(names, engine.covered) if not c} == {
        "att.in_proj_weight",
        "att.out_proj.weight",
    }


@pytest.mark.parametrize("need_elem", [False, True])
def test_sequence_first_attention_rule(need_elem):
    """The attention rule reads ``batch_first=False`` inputs (the ``torch.func`` fallback
    needs the batch in dimension 0, so there is no "func" variant of this model)."""
    model, x, y = build("seq_first_attention")
    ref = per_sample_grads(model, x, y)
    engine = PerSampleEngine(model, list(model.parameters()), need_elem=need_elem, keep_last=True)
    handles = engine.attach()
    loss_fn(model(x), y).backward()
    for h in handles:
        h.remove()
    b = x.shape[0]
    for i, (n, _) in enumerate(model.named_parameters()):
        want = ref[n].reshape(b, -1).square().sum(1)
        assert rel_err(engine.last_sq[i] * b * b, want) < REL, n
        if need_elem:
            e = ref[n].square().sum(0)
            assert rel_err_max(engine.elem[i] * b * b, e) < REL, n


def test_attention_weights_in_the_loss_go_to_torch_func():
    """The attention rule differentiates the attended values only: when the returned attention
    weights reach the loss too, that backward goes through torch.func, still exact."""

    class WeightsUsed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.att = nn.Embedding(11, 8), nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 11)

        def forward(self, x):
            h = self.emb(x)
            out, weights = self.att(h, h, h)  # need_weights=True: head-averaged weights
            return self.head(out) + weights[:, :, :1] * torch.arange(11.0)  # on the first token

    torch.manual_seed(0)
    model = WeightsUsed().double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 11, (6, 5), generator=g), torch.randint(0, 11, (6, 5), generator=g)
    ref = per_sample_grads(model, x, y)
    engine = PerSampleEngine(model, list(model.parameters()), keep_last=True)
    handles = engine.attach()
    loss_fn(model(x), y).backward()
    for h in handles:
        h.remove()
    for i, (n, _) in enumerate(model.named_parameters()):
        want = ref[n].reshape(6, -1).square().sum(1)
        assert rel_err(engine.last_sq[i] * 36, want) < REL, n


def test_hooks_mode_leaves_unruled_modules_out():
    model, x, y = build("attention")
    params = list(model.parameters())
    engine = PerSampleEngine(model, params, mode="hooks", keep_last=True)
    names = [n for n, _ in model.named_parameters()]
    uncovered = {n for n, c in zip(names, engine.covered) if not c}
    # a bare parameter of the model (no rule) and the attention (its rule re-runs it: "auto")
    assert uncovered == {
        "pos",
        "att.in_proj_weight",
        "att.in_proj_bias",
        "att.out_proj.weight",
        "att.out_proj.bias",
    }
    # an attention layer in a form the rule does not take: torch.func in "auto", out in "hooks"
    att = nn.MultiheadAttention(8, 2, add_zero_attn=True)
    assert not any(PerSampleEngine(att, list(att.parameters()), mode="hooks").covered)
    auto = PerSampleEngine(att, list(att.parameters()))
    assert all(auto.covered) and auto.units[0].rule.__name__ == "func_rule"
    units = PerSampleEngine(model, params).units
    assert next(u for u in units if u.module is model.att).rule.__name__ == "attention"


# -- NoiseScale against the within-batch reference -------------------------------------------


def _monitor(model, lens, opt=None, log_every=1):
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.05)
    return opt, PhaseMonitor(opt, model=model, lenses=[lens], log_every=log_every, detector=False)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "attention"])
def test_per_sample_estimator_matches_reference(kind):
    model, x, y = build(kind)
    decay, steps = 0.7, 3
    opt, mon = _monitor(model, NoiseScale("per_sample", decay=decay))
    lay = layer_of(model)
    layers = list(dict.fromkeys(lay.values()))
    ema = {name: [0.0, 0.0] for name in [*layers, ""]}
    for t in range(1, steps + 1):
        ref = per_sample_grads(model, x, y)
        per = {name: [n for n in ref if lay[n] == name] for name in layers}
        for name, ns in [*per.items(), ("", list(ref))]:
            _, _, tr, g2, _, _ = stats(ref, ns)
            if name:
                ema[name][0] = decay * ema[name][0] + (1 - decay) * float(g2)
                ema[name][1] = decay * ema[name][1] + (1 - decay) * float(tr)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        rec = mon.history.records[-1]
        corr = 1 - decay**t
        tot_g2 = sum(ema[n][0] for n in layers) / corr
        tot_tr = sum(ema[n][1] for n in layers) / corr
        for name in layers:
            g2, tr = ema[name][0] / corr, ema[name][1] / corr
            assert rel_err(rec[f"grad_sq_norm/{name}"], g2) < REL, name
            assert rel_err(rec[f"grad_noise_tr/{name}"], tr) < REL, name
            assert rel_err(rec[f"noise_scale/{name}"], tr / g2) < REL, name
            assert rel_err(rec[f"batch_over_noise_scale/{name}"], x.shape[0] * g2 / tr) < REL
        assert rel_err(rec["grad_sq_norm"], tot_g2) < REL
        assert rel_err(rec["grad_noise_tr"], tot_tr) < REL
        assert rel_err(rec["noise_scale"], tot_tr / tot_g2) < REL
    mon.close()


def test_single_step_is_the_within_batch_estimate_and_sum_reduction():
    for reduction in ["mean", "sum"]:
        model, x, y = build("mlp")
        ref = per_sample_grads(model, x, y)
        _, _, tr, g2, _, _ = stats(ref)
        opt, mon = _monitor(model, NoiseScale(decay=0.0, reduction=reduction))
        out = model(x)
        loss = loss_fn(out, y) * (x.shape[0] if reduction == "sum" else 1)
        loss.backward()
        opt.step()
        rec = mon.history.records[-1]
        assert mon.lenses[0]._mode == "per_sample"  # auto: one backward per step
        assert rel_err(rec["grad_noise_tr"], tr) < REL
        assert rel_err(rec["grad_sq_norm"], g2) < REL
        assert rel_err(rec["noise_scale"], tr / g2) < REL
        mon.close()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_per_sample_over_micro_batches_matches_reference_on_both_paths(reduction, mask_path):
    """Two micro-batches per step, through the CPU's host-flag path (per-layer sums and the
    estimates in one product) and the device path (``step.ok`` as a tensor) alike."""
    model, x, y = build("mlp")
    ref = per_sample_grads(model, x, y)
    _, _, tr, g2, _, _ = stats(ref)
    scale = x.shape[0] if reduction == "sum" else 1
    opt, mon = _monitor(model, NoiseScale("per_sample", decay=0.0, reduction=reduction))
    for xb, yb in zip(x.chunk(2), y.chunk(2)):
        # the micro-batch mean loss, weighted so that .grad is the full batch's mean (or sum)
        (loss_fn(model(xb), yb) * (xb.shape[0] * scale / x.shape[0])).backward()
    opt.step()
    rec = mon.history.records[-1]
    assert rel_err(rec["grad_noise_tr"], tr) < REL
    assert rel_err(rec["grad_sq_norm"], g2) < REL
    assert rel_err(rec["noise_scale"], tr / g2) < REL
    mon.close()


def test_two_batch_formula_with_b_small_one_is_the_within_batch_estimate():
    g = torch.randn(12, 5, dtype=torch.float64)
    small = g.square().sum(1).mean()
    big = g.mean(0).square().sum()
    g2, tr = two_batch_estimates(small, big, 1, 12)
    tr_ref = g.var(0, correction=1).sum()
    assert rel_err(tr, tr_ref) < 1e-12
    assert rel_err(g2, big - tr_ref / 12) < 1e-12


# -- the micro-batch estimator ----------------------------------------------------------------


def _accumulate(model, opt, x, y, m):
    opt.zero_grad()
    for xb, yb in zip(x.chunk(m), y.chunk(m)):
        (loss_fn(model(xb), yb) / m).backward()
    opt.step()


# norms batched per 1 or ~40 elements, or taken at once (the CPU's path)
@pytest.mark.parametrize("pending", [1, 40, 1 << 23])
@pytest.mark.parametrize("m", [2, 3])
def test_accumulation_matches_micro_batch_gradients(m, pending, monkeypatch):
    from sgdlens.lenses import _micro_batches

    monkeypatch.setattr(_micro_batches, "PENDING", pending)
    monkeypatch.setattr(_micro_batches, "AT_ONCE", set() if pending < 1 << 23 else {"cpu"})
    model, x, y = build("cnn")
    x, y = x[:6], y[:6]
    opt, mon = _monitor(model, NoiseScale(decay=0.0))
    # an abandoned step first: its gradients must not reach the next step's estimate
    (loss_fn(model(x[:3]), y[:3])).backward()
    (loss_fn(model(x[3:]), y[3:])).backward()
    ref = per_sample_grads(model, x, y)
    b = 6 // m
    small = torch.stack(
        [sum(ref[n][j * b : (j + 1) * b].mean(0).square().sum() for n in ref) for j in range(m)]
    ).mean()
    big = sum(ref[n].mean(0).square().sum() for n in ref)
    g2, tr = two_batch_estimates(small, big, b, 6)
    _accumulate(model, opt, x, y, m)
    rec = mon.history.records[-1]
    assert mon.lenses[0]._mode == "accumulation"
    assert rel_err(rec["grad_sq_norm"], g2) < REL
    assert rel_err(rec["grad_noise_tr"], tr) < REL
    assert rel_err(rec["noise_scale"], tr / g2) < REL
    assert rel_err(rec["batch_over_noise_scale"], 6 * g2 / tr) < REL
    mon.close()


class _Linear(nn.Module):
    """Per-example loss w·z: per-example gradient z, so G = μ and Σ = diag(σ²) are known."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d, dtype=torch.float64))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.w


@settings(max_examples=12)
@given(b=st.integers(1, 6), m=st.integers(2, 4), seed=st.integers(0, 2**16))
def test_accumulation_estimator_is_unbiased(b, m, seed):
    d, steps = 3, 300
    mu = torch.tensor([0.5, -1.0, 0.25], dtype=torch.float64)
    sigma = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    model = _Linear(d)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights stay put: i.i.d. steps
    mon = PhaseMonitor(
        opt,
        model=model,
        log_every=1,
        detector=False,
        lenses=[NoiseScale("accumulation", batch_size=b, decay=0.0)],
    )
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(m):
            z = mu + sigma * torch.randn(b, d, generator=g, dtype=torch.float64)
            (model(z).mean() / m).backward()
        opt.step()
    g2 = torch.tensor([r["grad_sq_norm"] for r in mon.history.records])
    tr = torch.tensor([r["grad_noise_tr"] for r in mon.history.records])
    mon.close()
    true_g2, true_tr = float(mu.square().sum()), float(sigma.square().sum())
    # each step's estimate is unbiased: the mean over steps is within 5 standard errors
    for est, truth in [(g2, true_g2), (tr, true_tr)]:
        se = float(est.std()) / math.sqrt(steps)
        assert abs(float(est.mean()) - truth) < 5 * se + 1e-9, (float(est.mean()), truth, se)


def test_accumulation_infers_micro_batch_size_from_inputs():
    model, x, y = build("mlp")
    x, y = x[:8], y[:8]
    opt, mon = _monitor(model, NoiseScale("accumulation", decay=0.0))
    opt2, mon2 = _monitor(build("mlp")[0], NoiseScale("accumulation", batch_size=2, decay=0.0))
    _accumulate(model, opt, x, y, 4)
    _accumulate(mon2.model, opt2, x, y, 4)
    a, b = mon.history.records[-1], mon2.history.records[-1]
    assert a["noise_scale"] == b["noise_scale"]
    mon.close()
    mon2.close()


def test_accumulation_without_accumulating_warns_and_logs_nothing():
    model, x, y = build("mlp")
    opt, mon = _monitor(model, NoiseScale("accumulation", batch_size=9))
    with pytest.warns(UserWarning, match="micro-batches"):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    assert "noise_scale" not in mon.history.records[-1]
    mon.close()


# -- guarantees -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lens",
    [
        NoiseScale(),
        NoiseScale("accumulation"),
        NoiseScale("per_sample", per_sample="func"),
        lenses.BatchSNR(),
    ],
    ids=["auto", "accumulation", "func", "batch_snr"],
)
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_training_is_unchanged(lens, opt_name):
    make = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    }[opt_name]
    finals = []
    for watched in (False, True):
        model, x, y = build("attention")
        model = model.float()
        opt = make(model.parameters())
        mon = None
        if watched:
            mon = PhaseMonitor(opt, model=model, lenses=[lens], log_every=2)
        for _ in range(4):
            _accumulate(model, opt, x, y, 2)
        finals.append([p.detach().clone() for p in model.parameters()])
        if mon is not None:
            assert any("noise_scale" in r or "batch_snr" in r for r in mon.history.records)
            mon.close()
            assert not any(m._forward_hooks for m in model.modules())
            assert not any(p._backward_hooks for p in model.parameters())
    for a, b in zip(*finals):
        assert torch.equal(a, b)


def test_nonfinite_step_is_skipped(mask_path):
    model, x, y = build("mlp")
    opt, mon = _monitor(
        model, NoiseScale(decay=0.5), opt=torch.optim.SGD(model.parameters(), lr=0.0)
    )
    for bad in (False, True, False):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        if bad:
            model[0].weight.grad[0, 0] = float("nan")
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        opt.step()
        model.load_state_dict(saved)  # lr 0 would still turn the weights into NaN
    recs = mon.history.records
    assert math.isfinite(recs[-1]["noise_scale"])
    assert recs[1]["noise_scale"] == pytest.approx(recs[0]["noise_scale"], rel=1e-12)
    assert recs[2]["noise_scale"] == pytest.approx(recs[0]["noise_scale"], rel=1e-12)  # lr 0
    assert recs[-1]["nonfinite_steps"] == 1
    mon.close()


def test_state_dict_round_trip():
    model, x, y = build("mlp")
    opt, mon = _monitor(model, NoiseScale(decay=0.9), log_every=2)
    for _ in range(4):
        _accumulate(model, opt, x, y, 1)
    sd = mon.state_dict()
    model2, _, _ = build("mlp")
    model2.load_state_dict(model.state_dict())
    opt2, mon2 = _monitor(model2, NoiseScale(decay=0.9), log_every=2)
    mon2.load_state_dict(sd)
    for m_, o_ in ((model, opt), (model2, opt2)):
        for _ in range(2):
            _accumulate(m_, o_, x, y, 1)
    assert mon.history.records[-1]["noise_scale"] == pytest.approx(
        mon2.history.records[-1]["noise_scale"], rel=1e-12
    )
    mon.close()
    mon2.close()


def test_validation():
    with pytest.raises(ValueError, match="estimator='bogus'"):
        NoiseScale("bogus")
    with pytest.raises(TypeError, match=r"ddp=None.*DistributedDataParallel"):
        NoiseScale("ranks")
    with pytest.raises(ValueError, match=r"ddp=.*only read by estimator='ranks'"):
        NoiseScale("auto", ddp=object())
    with pytest.raises(TypeError, match="batch_size"):
        NoiseScale(batch_size=2.5)
    with pytest.raises(ValueError, match="batch_size=0"):
        NoiseScale(batch_size=0)
    with pytest.raises(ValueError, match=r"decay=1\.0"):
        NoiseScale(decay=1.0)
    with pytest.raises(TypeError, match="decay"):
        NoiseScale(decay="0.9")
    with pytest.raises(ValueError, match="reduction='none'"):
        NoiseScale(reduction="none")
    with pytest.raises(ValueError, match="per_sample='vmap'"):
        NoiseScale(per_sample="vmap")
    opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="needs the model"):
        PhaseMonitor(opt, lenses=[NoiseScale("per_sample")])
    with pytest.raises(ValueError, match="batch_size"):
        PhaseMonitor(opt, lenses=[NoiseScale("accumulation")])
    with pytest.raises(ValueError, match="batch_size"):
        PhaseMonitor(opt, lenses=[NoiseScale()])
    assert "NoiseScale('auto'" in repr(NoiseScale())


def test_bfloat16_per_sample_and_micro_batch_norms_are_float32_accurate():
    """A bfloat16 MLP: the per-sample squared norms and the micro-batch norms equal float64
    computations on the same bfloat16 activations and gradients to 1e-5."""
    from sgdlens.lenses._micro_batches import MicroBatches

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 4)).to(torch.bfloat16)
    params = list(model.parameters())
    seen, incoming = {}, [[] for _ in params]

    def keep(name):
        def hook(mod, args, out):
            out.register_hook(lambda g: seen.__setitem__(name, (args[0], g)))

        return hook

    for i in (0, 2):
        model[i].register_forward_hook(keep(i))
    engine = PerSampleEngine(model, params, keep_last=True)
    micro = MicroBatches(params, torch.float64, torch.device("cpu"))
    handles = engine.attach() + micro.attach()
    for j, p in enumerate(params):  # the gradients the lens's hooks see, kept in float64
        handles.append(p.register_hook(lambda g, j=j: incoming[j].append(g.double())))
    g = torch.Generator().manual_seed(1)
    for step in range(2):
        model(torch.randn(8, 32, generator=g).to(torch.bfloat16)).float().square().mean().backward()
        if step == 0:  # the per-sample sums of the first backward
            sums = engine.sums(torch.device("cpu"))
            for k, i in enumerate((0, 2)):
                a, go = (t.double() for t in seen[i])
                assert rel_err(sums[2 * k], (a.square().sum(1) * go.square().sum(1)).sum()) < 1e-5
                assert rel_err(sums[2 * k + 1], go.square().sum()) < 1e-5
    for h in handles:
        h.remove()
    want = torch.tensor([sum(float(d.square().sum()) for d in ds) for ds in incoming])
    assert all(len(ds) == 2 for ds in incoming)
    assert rel_err(micro.sums(torch.device("cpu")), want) < 1e-5


@pytest.mark.parametrize("estimator", ["accumulation", "per_sample"])
def test_grad_scaler_runs_give_the_unscaled_estimates(estimator):
    """A float16-style run through ``torch.amp.GradScaler`` (here on float64, scale 2¹⁰): with
    ``grad_scaler=`` every key equals the unscaled run's; without it they do not."""
    from sgdlens.lenses import BatchSNR

    def run(scaler, tell):
        model, x, y = build("cnn")
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        kw = {"grad_scaler": scaler} if tell else {}
        mon = PhaseMonitor(
            opt,
            model=model,
            log_every=1,
            detector=False,
            lenses=[NoiseScale(estimator, decay=0.5, **kw), BatchSNR(**kw)],
        )
        for _ in range(3):
            opt.zero_grad()
            for xb, yb in zip(x.chunk(2), y.chunk(2)):
                loss = loss_fn(model(xb), yb) / 2
                (loss if scaler is None else scaler.scale(loss)).backward()
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
        mon.close()
        return mon.history.records[-1]

    plain = run(None, False)
    scaled = run(torch.amp.GradScaler("cpu", init_scale=1024.0), True)
    keys = [k for k in plain if k.startswith(("noise_scale", "grad_noise", "grad_sq", "batch"))]
    assert keys and all(rel_err(scaled[k], plain[k]) < 1e-9 for k in keys)
    wrong = run(torch.amp.GradScaler("cpu", init_scale=1024.0), False)
    assert rel_err(wrong["grad_noise_tr"], plain["grad_noise_tr"]) > 1.0


def test_grad_scaler_must_be_a_grad_scaler():
    from sgdlens.lenses import BatchSNR

    for lens in (NoiseScale, BatchSNR):
        with pytest.raises(TypeError, match=r"grad_scaler=1\.0\).*GradScaler"):
            lens(grad_scaler=1.0)


def test_hugging_face_gpt2_per_sample_norms_are_exact():
    """A (tiny, randomly initialised) Hugging Face GPT-2: every parameter's per-sample norms
    from the layer rules (Conv1D, LayerNorm, Embedding, the tied head) equal torch.func's,
    except the position embedding, whose output is shared by the whole batch: it is left
    out, with a warning, instead of being measured wrong."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=23,
        n_positions=8,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(cfg).double()
    x = torch.randint(0, 23, (4, 6), generator=torch.Generator().manual_seed(1))

    def lm_loss(logits, ids):
        return F.cross_entropy(logits[:, :-1].reshape(-1, 23), ids[:, 1:].reshape(-1))

    params = {n: p.detach() for n, p in model.named_parameters()}

    def one(ps, xi):
        return lm_loss(functional_call(model, ps, (), {"input_ids": xi[None]}).logits, xi[None])

    ref = vmap(grad(one), in_dims=(None, 0))(params, x)
    engine = PerSampleEngine(model, list(model.parameters()), mode="hooks", keep_last=True)
    handles = engine.attach()
    with pytest.warns(UserWarning, match=r"Embedding parameters \['weight'\].*has 1 along"):
        lm_loss(model(input_ids=x).logits, x).backward()
    for h in handles:
        h.remove()
    names = list(params)
    assert [n for n, c in zip(names, engine.covered) if not c] == ["transformer.wpe.weight"]
    for i, n in enumerate(names):
        if engine.covered[i]:
            want = ref[n].reshape(4, -1).square().sum(1)
            assert rel_err(engine.last_sq[i] * 16, want) < REL, n
    # in a monitor: NoiseScale leaves the position embedding out of every key
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    lens = NoiseScale("per_sample", per_sample="hooks")
    mon = PhaseMonitor(opt, model=model, lenses=[lens], log_every=2, detector=False)
    for _ in range(2):
        opt.zero_grad()
        with pytest.warns(UserWarning, match="position embeddings") if _ == 0 else nullcontext():
            lm_loss(model(input_ids=x).logits, x).backward()
        opt.step()
    mon.close()
    rec = mon.history.records[-1]
    assert math.isfinite(rec["noise_scale"]) and "noise_scale/transformer.wte" in rec
    assert not any("wpe" in k for k in rec)
    assert mon.lenses[0].uncovered == ["transformer.wpe[1]"]


def test_a_loss_output_first_and_a_module_the_rules_cannot_split():
    """A module returning (loss, logits) with parameters of its own (the torch.func rule):
    used through its logits, the batch check skips the 0-d loss and the per-sample norms are
    exact; backpropagated through its own loss (no per-sample split exists), it is left out
    with a warning, and training goes on."""

    class LossFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))

        def forward(self, x, y):
            logits = x @ self.w
            return loss_fn(logits, y), logits

    torch.manual_seed(0)
    model = LossFirst()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    ref = vmap(grad(lambda w, xi, yi: loss_fn(xi[None] @ w, yi[None])), in_dims=(None, 0, 0))(
        model.w.detach(), x, y
    )
    engine = PerSampleEngine(model, [model.w], keep_last=True)
    handles = engine.attach()
    loss_fn(model(x, y)[1], y).backward()  # through the logits
    assert engine.covered == [True]
    assert rel_err(engine.last_sq[0] * 25, ref.reshape(5, -1).square().sum(1)) < REL
    model.w.grad = None
    engine.reset()
    with pytest.warns(UserWarning, match="no batch dimension and gets a gradient"):
        model(x, y)[0].backward()  # through the module's own loss
    for h in handles:
        h.remove()
    assert engine.covered == [False] and model.w.grad is not None
