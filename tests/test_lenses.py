"""Every lens against a slow float64 reference, for every optimizer in the table."""

from __future__ import annotations

import math

import pytest
import torch

from sgdlens import lenses
from tests._reference import ema_snr, layer_vectors, window_snr
from tests._train import OPTIMIZERS, train

LAYER_OF = [0, 0, 1, 1]  # fc1.weight, fc1.bias, fc2.weight, fc2.bias
NAMES = ["fc1", "fc2"]
K = 5
STEPS = 20


def close(a, b, rel=1e-5, abs_=1e-9):
    return a == pytest.approx(b, rel=rel, abs=abs_)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_default_lenses_match_reference(opt_name):
    _, _, mon, tr = train(opt_name, STEPS, {"log_every": K}, record=True)
    records = mon.history.records
    assert [r["step"] for r in records] == list(range(K, STEPS + 1, K))
    for rec in records:
        s = rec["step"]
        # GradSNR: the window of the K steps ending at s
        window = [layer_vectors(g, LAYER_OF, 2) for g in tr["grads"][s - K : s]]
        tot_m2 = tot_v = 0.0
        for li, name in enumerate(NAMES):
            m, sd, snr = window_snr([w[li] for w in window])
            assert close(rec[f"grad_mean/{name}"], m), (name, rec[f"grad_mean/{name}"], m)
            assert close(rec[f"grad_std/{name}"], sd, rel=1e-4), (name, rec[f"grad_std/{name}"], sd)
            assert close(rec[f"grad_snr/{name}"], snr, rel=1e-4)
            tot_m2, tot_v = tot_m2 + m * m, tot_v + sd * sd
        assert close(rec["grad_snr"], math.sqrt(tot_m2 / tot_v), rel=1e-4)
        # WeightNorms
        after = layer_vectors(tr["after"][s - 1], LAYER_OF, 2)
        before = layer_vectors(tr["before"][s - 1], LAYER_OF, 2)
        init = layer_vectors(tr["init"], LAYER_OF, 2)
        for li, name in enumerate(NAMES):
            assert close(rec[f"weight_norm/{name}"], float(after[li].norm()))
            assert close(rec[f"weight_dist/{name}"], float((after[li] - init[li]).norm()))
            upd = float((after[li] - before[li]).norm())
            assert close(rec[f"update_size/{name}"], upd, rel=1e-4, abs_=1e-7)
            assert close(
                rec[f"update_ratio/{name}"], upd / float(after[li].norm()), rel=1e-4, abs_=1e-7
            )
        w = torch.cat(after)
        assert close(rec["weight_norm"], float(w.norm()))
        assert close(rec["weight_dist"], float((w - torch.cat(init)).norm()))
        # GradNorm: the gradient of step s
        g = layer_vectors(tr["grads"][s - 1], LAYER_OF, 2)
        for li, name in enumerate(NAMES):
            assert close(rec[f"grad_norm/{name}"], float(g[li].norm()))
        assert close(rec["grad_norm"], float(torch.cat(g).norm()))
        assert rec["nonfinite_steps"] == 0


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam", "lbfgs"])
def test_ema_and_weights_only_match_reference(opt_name, mask_path):
    beta = 0.8
    _, _, mon, tr = train(
        opt_name,
        STEPS,
        {"log_every": K, "lenses": [lenses.GradSNR(decay=beta, weights_only=True)]},
        record=True,
    )
    for rec in mon.history.records:
        s = rec["step"]
        weights = [[g[0], g[2]] for g in tr["grads"][:s]]  # weight matrices only
        for li, name in enumerate(NAMES):
            m, sd, snr = ema_snr([w[li].reshape(-1) for w in weights], beta)
            assert close(rec[f"grad_mean/{name}"], m)
            assert close(rec[f"grad_std/{name}"], sd, rel=1e-4)
            assert close(rec[f"grad_snr/{name}"], snr, rel=1e-4)


def test_weights_only_window_skips_biases():
    _, _, mon, tr = train(
        "sgd", 10, {"log_every": 10, "lenses": [lenses.GradSNR(weights_only=True)]}, record=True
    )
    rec = mon.history.records[-1]
    m, sd, _ = window_snr([g[0].reshape(-1) for g in tr["grads"]])
    assert close(rec["grad_mean/fc1"], m) and close(rec["grad_std/fc1"], sd, rel=1e-4)


def test_window_longer_than_log_interval_reports_last_completed_window(mask_path):
    _, _, mon, tr = train(
        "sgd", 20, {"log_every": 5, "lenses": [lenses.GradSNR(window=10)]}, record=True
    )
    recs = mon.history.records
    assert "grad_snr" not in recs[0]  # no window completed at step 5
    m, sd, _ = window_snr([layer_vectors(g, LAYER_OF, 2)[1] for g in tr["grads"][:10]])
    for rec in recs[1:3]:  # steps 10 and 15 report the window 1..10
        assert close(rec["grad_mean/fc2"], m) and close(rec["grad_std/fc2"], sd, rel=1e-4)
