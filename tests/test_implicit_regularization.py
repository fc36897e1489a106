"""examples/implicit_regularization.py: SGD's minimum-norm bias, and random labels through sgdlens."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from implicit_regularization import digits_run, least_squares, plot, problem

TOL = 1e-6
LAYERS = ("fc1", "fc2", "fc3")
# shortened digits runs: 512 training examples, batch 128 (4 steps an epoch), lr 0.05
SHORT = {"n_train": 512, "batch_size": 128, "lr": 0.05, "max_epochs": 600}


def rel(a, b) -> float:
    return abs(float(a) - float(b)) / abs(float(b))


@pytest.fixture(scope="module")
def linear():
    return least_squares("zero", steps=600), least_squares("random", steps=600)


@pytest.fixture(scope="module")
def short_digits():
    return digits_run("true", **SHORT), digits_run("random", **SHORT)


def test_sgd_from_zero_converges_to_the_minimum_norm_interpolant(linear):
    run, _ = linear
    h = run.monitor.history
    assert run.w_min.dtype == torch.float64
    assert run.rel_error(run.w_min) < TOL
    assert run.residual < TOL
    assert rel(h["weight_norm"][-1], run.w_min.norm()) < TOL
    # from zero, the distance travelled is the norm itself
    assert rel(h["weight_dist"][-1], h["weight_norm"][-1]) < 1e-12
    # and weight_norm climbed to the minimum norm: SGD never overshot into the null space
    assert h["weight_norm"][0] < h["weight_norm"][-1]


def test_a_nonzero_start_lands_on_the_interpolant_nearest_it(linear):
    _, run = linear
    h = run.monitor.history
    assert run.w0.norm() > 1
    assert run.rel_error(run.w_near) < TOL
    assert run.residual < TOL
    assert run.rel_error(run.w_min) > 0.5  # not the minimum-norm solution (measured 1.54)
    assert rel(h["weight_norm"][-1], run.w_near.norm()) < TOL
    # weight_dist = ‖w_T − w0‖ ends at the distance from w0 to the set of interpolants
    assert rel(h["weight_dist"][-1], (run.w_near - run.w0).norm()) < TOL
    assert run.dist_to_near[-1] < TOL * float(run.w_near.norm())
    # w_near is that nearest interpolant: it moved w0 only within the row space of X
    x, y = problem()
    null = torch.eye(x.shape[1], dtype=x.dtype) - torch.linalg.pinv(x) @ x
    assert float((null @ (run.w_near - run.w0)).norm()) < 1e-10
    assert float((x @ run.w_near - y).norm()) < 1e-10


def test_random_labels_are_fitted_and_records_hold_both_phase_timelines(short_digits):
    true, rnd = short_digits
    for run in (true, rnd):
        assert run.n_train == 512
        assert run.fit_step is not None, (run.labels, run.train_acc[-5:])
        assert run.train_acc[-1] == 1.0
        assert run.monitor.step == run.fit_step
        h = run.monitor.history
        for key in ("phase", *(f"phase/{n}" for n in LAYERS)):
            assert key in h.records[-1], (run.labels, key)
            assert set(h.column(key)) <= {"warmup", "drift", "diffusion"}
        assert run.monitor.events, run.labels
        # every detector event is also an event record in the history
        assert [(e.step, e.layer, e.new) for e in run.monitor.events] == [
            (r["step"], r["layer"], r["event"]) for r in h.events
        ]
        assert h["weight_dist"][-1] > 0
    # random labels take longer to fit (measured: 1196 steps against 232) and generalise to
    # nothing: test accuracy at chance against the true labels
    assert rnd.fit_step > 2 * true.fit_step
    assert true.test_acc > 0.8
    assert rnd.test_acc < 0.3
    # memorisation runs in diffusion: no layer of the random-label run ever drifts, while
    # every layer of the true-label run starts in drift and ends in diffusion
    for n in LAYERS:
        assert "drift" not in rnd.monitor.history.column(f"phase/{n}")
        first = next(e for e in true.monitor.events if e.layer == n)
        assert first.new == "drift"
        assert true.monitor.phases[n] == "diffusion"
    assert rnd.monitor.history["weight_dist"][-1] > true.monitor.history["weight_dist"][-1]


def test_plot_writes_the_figure(linear, short_digits, tmp_path):
    path = plot(*linear, *short_digits, path=str(tmp_path / "implicit_regularization.png"))
    assert path is not None and Path(path).stat().st_size > 10_000
