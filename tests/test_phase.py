"""Tests for sgdlens.phase: the drift/diffusion detector on synthetic record streams."""

from __future__ import annotations

import io
import itertools
import json
import math
import random

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from sgdlens.phase import PhaseDetector, PhaseEvent, displacement_exponent, robust_z

LOG_A = math.log(0.8)  # enter_diffusion
LOG_B = math.log(1.25)  # enter_drift
LOG_C = 0.5 * (LOG_A + LOG_B)  # band centre (log 1.0)


# The record-counting detector's defaults (5-record window, 3-record dwell, 5 warm-up records,
# 50-record loss window) expressed in steps for streams with one record per step.
PER_STEP = {"window": 5, "dwell": 2, "warmup": 4, "spike_window": 50}


def feed(det: PhaseDetector, records: list[dict]) -> list[PhaseEvent]:
    out: list[PhaseEvent] = []
    for r in records:
        out.extend(det.update(r))
    return out


def snr_records(values: list[float], layer: str = "fc1", every: int = 10) -> list[dict]:
    return [{"step": every * i, f"grad_snr/{layer}": v} for i, v in enumerate(values)]


def transitions(events: list[PhaseEvent], layer: str) -> list[tuple[int, str, str]]:
    return [(e.step, e.old, e.new) for e in events if e.layer == layer and e.new != "spike"]


def key(events: list[PhaseEvent]) -> list[tuple[int, str, str, str]]:
    return [(e.step, e.layer, e.old, e.new) for e in events]


# --------------------------------------------------------------------------------------------
# Change point: bounded delay
# --------------------------------------------------------------------------------------------


def expected_delay(window: int, dwell: int, k: int) -> int:
    """Steps from the first record beyond a threshold to the switch, records every k steps."""
    n = -(-window // k)  # records in a window
    return (n - 1) // 2 * k + -(-dwell // k) * k


@pytest.mark.parametrize(("k", "steps"), [(1, 224), (10, 220), (25, 200), (50, 200), (100, 200)])
def test_default_delay_in_steps_is_about_the_same_at_every_cadence(k: int, steps: int) -> None:
    assert expected_delay(250, 100, k) == steps


@given(
    seed=st.integers(0, 2**32 - 1),
    sigma=st.floats(0.0, 0.25),
    up=st.booleans(),
    pre_far=st.floats(0.0, 4.0),
    post_far=st.floats(0.0, 4.0),
    n_pre=st.integers(27, 200),
    n_post=st.integers(25, 100),
)
def test_change_point_reported_after_documented_delay(
    seed: int, sigma: float, up: bool, pre_far: float, post_far: float, n_pre: int, n_post: int
) -> None:
    """Log-normal noise around a level on one side, then the other: switch 220 steps later."""
    rng = random.Random(seed)
    margin = 4 * sigma + 1e-3
    if not up:  # drift (above the band) → diffusion (below it)
        pre_level, post_level = LOG_C + margin + pre_far, LOG_A - margin - post_far
    else:  # diffusion → drift
        pre_level, post_level = LOG_C - margin - pre_far, LOG_B + margin + post_far
    pre = [math.exp(pre_level + rng.gauss(0, sigma)) for _ in range(n_pre)]
    post = [math.exp(post_level + rng.gauss(0, sigma)) for _ in range(n_post)]
    # The premise of the documented bound; with a 4-sigma margin it fails rarely.
    if not up:
        assume(min(pre) >= 1.0 and max(post) < 0.8)
    else:
        assume(max(pre) < 1.0 and min(post) > 1.25)
    events = feed(PhaseDetector(), snr_records(pre + post))
    first, second = ("drift", "diffusion") if not up else ("diffusion", "drift")
    # warm-up: drift at the first record above enter_drift, else the median at step 250
    entry = next((10 * i for i, v in enumerate(pre) if v > 1.25 and 10 * i < 250), 250)
    assert transitions(events, "fc1") == [
        (entry, "warmup", first),
        (10 * n_pre + 220, first, second),
    ]


@given(
    seed=st.integers(0, 2**32 - 1),
    window=st.integers(1, 300),
    dwell=st.integers(0, 200),
    warmup=st.integers(0, 300),
    k=st.sampled_from([1, 7, 10, 25, 50, 100]),
    extra_pre=st.integers(0, 10),
    up=st.booleans(),
)
def test_delay_formula_for_every_setting(
    seed: int, window: int, dwell: int, warmup: int, k: int, extra_pre: int, up: bool
) -> None:
    """Clean level changes: the switch comes expected_delay(window, dwell, k) steps later."""
    rng = random.Random(seed)
    n_pre = -(-(max(window, warmup) + k) // k) + 1 + extra_pre
    n_post = -(-(window + dwell) // k) + 3
    hi = [rng.uniform(1.0, 50.0) for _ in range(n_pre)]
    lo = [rng.uniform(0.001, 0.79) for _ in range(n_post)]
    if up:
        hi, lo = [v / 50.0 * 0.99 for v in hi], [1.26 + v * 10 for v in lo]
        # pre: values in (0, 0.99) (below the centre), post: values in (1.26, 9.2)
    det = PhaseDetector(window=window, dwell=dwell, warmup=warmup)
    events = feed(det, snr_records(hi + lo, every=k))
    got = transitions(events, "fc1")
    assert len(got) == 2
    entry = next(k * i for i, v in enumerate(hi) if v > 1.25 or k * i >= warmup)
    assert got[0][0] == entry
    assert got[1][0] == k * n_pre + expected_delay(window, dwell, k)


# --------------------------------------------------------------------------------------------
# Stationary streams: no false alarms
# --------------------------------------------------------------------------------------------


@given(
    seed=st.integers(0, 2**32 - 1),
    above=st.booleans(),
    beyond=st.floats(0.0, 2.0),
    frac=st.floats(0.0, 1.0),
)
def test_stationary_stream_outside_band_gives_only_the_entry(
    seed: int, above: bool, beyond: float, frac: float
) -> None:
    """10,000 records around a level outside the band: one event (the entry), then none.

    Noise: log-normal with log-sd up to min(0.25, delta/4), delta the log-distance from the
    level to the band centre (the boundary the first phase is decided on).
    """
    rng = random.Random(seed)
    level = LOG_B + beyond if above else LOG_A - beyond
    sigma = frac * min(0.25, abs(level - LOG_C) / 4)
    det = PhaseDetector()
    values = [math.exp(level + rng.gauss(0, sigma)) for _ in range(10_000)]
    events = feed(det, snr_records(values))
    expected = "drift" if above else "diffusion"
    assert [(o, n) for _, o, n in transitions(events, "fc1")] == [("warmup", expected)]
    assert det.phases == {"fc1": expected}


@given(
    seed=st.integers(0, 2**32 - 1),
    above=st.booleans(),
    beyond=st.floats(0.0, 2.0),
    frac=st.floats(0.0, 1.0),
)
def test_no_switch_after_entry_with_noise_up_to_quarter_of_distance(
    seed: int, above: bool, beyond: float, frac: float
) -> None:
    """Once in its phase, a layer at a level on or beyond the band edge stays for 10,000 records.

    Noise: log-normal with log-sd up to delta/4, delta the log-distance from the level to the
    far threshold (0.446 / 4 = 0.11 on the band edge).
    """
    rng = random.Random(seed)
    level = LOG_B + beyond if above else LOG_A - beyond
    far = LOG_A if above else LOG_B
    sigma = frac * abs(level - far) / 4
    det = PhaseDetector()
    values = [math.exp(level)] * 26 + [math.exp(level + rng.gauss(0, sigma)) for _ in range(10_000)]
    events = feed(det, snr_records(values))
    assert len(transitions(events, "fc1")) == 1


def test_band_edge_without_noise_never_switches() -> None:
    det = PhaseDetector()
    assert len(feed(det, snr_records([1.25] * 1000 + [0.8] * 1000))) == 1
    assert det.phases == {"fc1": "drift"}  # 0.8 is not *below* enter_diffusion


# --------------------------------------------------------------------------------------------
# Invariances and structure
# --------------------------------------------------------------------------------------------

segment = st.tuples(st.floats(-3.0, 3.0), st.floats(0.0, 1.0), st.integers(1, 40))


def random_stream(rng: random.Random, segments: list[tuple[float, float, int]]) -> list[float]:
    values: list[float] = []
    for level, sigma, n in segments:
        values.extend(math.exp(level + rng.gauss(0, sigma)) for _ in range(n))
    return values


@given(
    seed=st.integers(0, 2**32 - 1),
    segments=st.lists(segment, min_size=1, max_size=8),
    k=st.integers(-30, 30),
    j=st.integers(-30, 30),
    dwell=st.integers(0, 40),
)
def test_scaling_signal_and_thresholds_together_changes_nothing(
    seed: int, segments: list[tuple[float, float, int]], k: int, j: int, dwell: int
) -> None:
    """SNR × c with both thresholds × c (c a power of two, exact in floating point): same events.

    The loss is scaled and shifted too (spikes use robust z, which ignores both).
    """
    rng = random.Random(seed)
    snr = random_stream(rng, segments)
    loss = [rng.lognormvariate(0, 0.2) * (30.0 if rng.random() < 0.02 else 1.0) for _ in snr]
    c, s = 2.0**k, 2.0**j

    def records(scale: float, lscale: float) -> list[dict]:
        return [
            {"step": i, "grad_snr/a.b": v * scale, "grad_snr": v * scale, "loss": lscale * x}
            for i, (v, x) in enumerate(zip(snr, loss))
        ]

    base = feed(PhaseDetector(dwell=dwell), records(1.0, 1.0))
    scaled_det = PhaseDetector(enter_diffusion=0.8 * c, enter_drift=1.25 * c, dwell=dwell)
    scaled = feed(scaled_det, records(c, s))
    assert key(base) == key(scaled)


@given(
    seed=st.integers(0, 2**32 - 1),
    segments=st.lists(segment, min_size=1, max_size=10),
    window=st.integers(1, 60),
    dwell=st.integers(0, 30),
    k=st.integers(1, 20),
    holes=st.floats(0.0, 0.5),
)
def test_events_alternate_and_respect_dwell(
    seed: int,
    segments: list[tuple[float, float, int]],
    window: int,
    dwell: int,
    k: int,
    holes: float,
) -> None:
    """Per layer: warmup → X → Y → X …, never two equal transitions, switches >= dwell steps apart."""
    rng = random.Random(seed)
    values = random_stream(rng, segments)
    det = PhaseDetector(window=window, dwell=dwell, warmup=window)
    for i, v in enumerate(values):
        rec: dict = {"step": k * (i + 1)}
        for name, val in (("l1", v), ("l2", 1.0 / v if v > 0 else v)):
            if rng.random() >= holes:
                rec[f"grad_snr/{name}"] = val
        det.update(rec)
    for name in ("l1", "l2"):
        trs = [(e.old, e.new) for e in det.events if e.layer == name]
        for (o1, n1), (o2, n2) in itertools.pairwise(trs):
            assert n1 == o2 and o1 != n1 and (o1, n1) != (o2, n2)
        if trs:
            assert trs[0][0] == "warmup"
            assert all(o != "warmup" for o, _ in trs[1:])
        steps = [e.step for e in det.events if e.layer == name]
        for a, b in itertools.pairwise(steps):
            assert b - a >= max(dwell, k)
        assert det.phases.get(name, "warmup") == (trs[-1][1] if trs else "warmup")


# --------------------------------------------------------------------------------------------
# Loss spikes
# --------------------------------------------------------------------------------------------


@given(
    seed=st.integers(0, 2**32 - 1),
    level=st.floats(-100.0, 100.0),
    noise=st.floats(1e-6, 1.0),
    jump=st.floats(30.0, 1e6),
    n_pre=st.integers(50, 300),
    n_post=st.integers(0, 200),
    sustained=st.booleans(),
    trend=st.floats(0.0, 0.1),
)
# a sustained 30-sd jump whose spread the window takes in: z dipped to 9.95 and back to 10.67
@example(
    seed=50, level=0.0, noise=1.0, jump=30.0, n_pre=50, n_post=15, sustained=True, trend=0.0625
)
def test_one_loss_jump_is_reported_once_at_its_step(
    seed: int,
    level: float,
    noise: float,
    jump: float,
    n_pre: int,
    n_post: int,
    sustained: bool,
    trend: float,
) -> None:
    """A jump of >= 30 noise sds (one outlier, or a new level that stays): one spike, right step."""
    rng = random.Random(seed)
    loss = [level - trend * noise * i + noise * rng.gauss(0, 1) for i in range(n_pre)]
    top = loss[-1] + jump * noise
    tail_level = top if sustained else loss[-1]
    loss.append(top)
    loss += [tail_level + noise * rng.gauss(0, 1) for _ in range(n_post)]
    det = PhaseDetector(spike_window=350)  # 50 records; tested from the 26th on
    events = feed(det, [{"step": 7 * i, "loss": x} for i, x in enumerate(loss)])
    spikes = [e for e in events if e.new == "spike"]
    assert [(e.step, e.layer, e.old) for e in spikes] == [(7 * n_pre, "", "warmup")]
    assert spikes[0].evidence["robust_z"] > 10
    assert spikes[0].evidence["loss"] == top


def diffused(det: PhaseDetector, n: int = 30) -> int:
    """Drive fc1 and the whole model into diffusion with a steady loss; return the next step."""
    for i in range(n):
        det.update({"step": i, "grad_snr/fc1": 0.3, "grad_snr": 0.3, "loss": 1.0 + 0.01 * (i % 3)})
    assert det.phase == "diffusion" and det.phases == {"fc1": "diffusion"}
    return n


@pytest.mark.parametrize("kick", ["global", "all", "none"])
def test_spike_kicks_back_to_drift(kick: str) -> None:
    """Smith & Topin: a loss spike in diffusion is a spike event, then diffusion → drift."""
    det = PhaseDetector(spike_kick=kick, **PER_STEP)
    s = diffused(det)
    events = det.update({"step": s, "grad_snr/fc1": 0.3, "grad_snr": 0.3, "loss": 30.0})
    expected = [(s, "", "diffusion", "spike")]
    if kick in ("global", "all"):
        expected.append((s, "", "diffusion", "drift"))
    if kick == "all":
        expected.append((s, "fc1", "diffusion", "drift"))
    assert key(events) == expected
    assert events[0].evidence["robust_z"] > 10
    # SNR stays low: the kicked phases return to diffusion after `dwell` records.
    later = feed(det, [{"step": s + i, "grad_snr/fc1": 0.3, "grad_snr": 0.3} for i in (1, 2, 3)])
    assert [(e.step, e.new) for e in later] == [(s + 3, "diffusion")] * (len(expected) - 1)
    assert det.phase == "diffusion"


def test_spike_in_drift_resets_the_count_towards_diffusion() -> None:
    det = PhaseDetector(**PER_STEP)
    feed(det, [{"step": i, "grad_snr": 3.0, "loss": 1.0 + 0.01 * (i % 3)} for i in range(30)])
    feed(det, [{"step": 30 + i, "grad_snr": 0.1} for i in range(4)])  # median low on 2 records
    ev = det.update({"step": 34, "grad_snr": 0.1, "loss": 50.0})  # would be the 3rd
    assert key(ev) == [(34, "", "drift", "spike")]
    ev = feed(det, [{"step": 35 + i, "grad_snr": 0.1} for i in range(3)])
    assert key(ev) == [(36, "", "drift", "diffusion")]  # counted again from the spike


# --------------------------------------------------------------------------------------------
# Bad values, missing keys, checkpoints
# --------------------------------------------------------------------------------------------

BAD = [math.nan, math.inf, -math.inf, None, "x", True, -1.0]


def full_stream(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    level = 1.0
    for i in range(n):
        if rng.random() < 0.05:
            level = rng.uniform(-2.5, 2.5)
        snr = math.exp(level + rng.gauss(0, 0.3))
        rec = {
            "step": 10 * (i + 1),
            "time": 1.7e9 + i,
            "grad_snr/enc.layers.0.linear1": snr,
            "grad_snr/head": snr * rng.uniform(0.5, 2.0),
            "grad_snr": snr,
            "weight_dist/enc.layers.0.linear1": 0.1 * (i + 1) ** rng.uniform(0.3, 1.0),
            "weight_dist": 0.2 * (i + 1) ** 0.5,
            "update_size/enc.layers.0.linear1": 0.01 * rng.uniform(0.5, 1.5),
            "update_size": 0.02,
            "loss": math.exp(-i / 50) * (40.0 if rng.random() < 0.03 else 1.0)
            + 0.01 * rng.random(),
            "nonfinite_steps": 0,
        }
        out.append(rec)
    return out


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 300), p=st.floats(0.0, 0.5))
def test_bad_and_missing_values_are_skipped(seed: int, n: int, p: float) -> None:
    """nan/inf/None/str/bool/negative or missing values act exactly as an absent key."""
    rng = random.Random(seed + 1)
    clean, dirty = [], []
    for rec in full_stream(seed, n):
        c, d = dict(rec), dict(rec)
        for k in list(rec):
            if k != "time" and rng.random() < p:
                del c[k]
                if k == "step" or rng.random() < 0.5:
                    del d[k]
                else:
                    bad = rng.choice(BAD)
                    if bad == -1.0 and k in ("loss", "step"):  # negative loss/step are valid
                        bad = math.nan
                    d[k] = bad
        clean.append(c)
        dirty.append(d)
    a, b = PhaseDetector(), PhaseDetector()
    assert key(feed(a, clean)) == key(feed(b, dirty))
    assert a.state_dict() == b.state_dict()
    json.dumps(b.state_dict(), allow_nan=False)  # nothing non-finite got in


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 400), cut=st.floats(0.0, 1.0))
def test_state_dict_round_trip_gives_identical_future_events(seed: int, n: int, cut: float) -> None:
    records = full_stream(seed, n)
    k = int(cut * n)
    ref = PhaseDetector(dwell=2, spike_kick="all")
    feed(ref, records)
    first = PhaseDetector(dwell=2, spike_kick="all")
    feed(first, records[:k])
    state = json.loads(json.dumps(first.state_dict(), allow_nan=False))
    resumed = PhaseDetector()  # other knobs: the saved configuration wins
    resumed.load_state_dict(state)
    tail = feed(resumed, records[k:])
    assert key(tail) == key(ref.events[len(first.events) :])
    assert resumed.events == ref.events
    assert resumed.state_dict() == ref.state_dict()
    assert resumed.phase == ref.phase and resumed.phases == ref.phases


def test_state_dict_loads_with_torch_weights_only() -> None:
    import torch

    det = PhaseDetector()
    feed(det, full_stream(3, 200))
    buf = io.BytesIO()
    torch.save({"phase": det.state_dict()}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["phase"]
    other = PhaseDetector()
    other.load_state_dict(loaded)
    assert other.state_dict() == det.state_dict()


def test_load_state_dict_rejects_garbage() -> None:
    det = PhaseDetector()
    with pytest.raises(TypeError, match="state_dict"):
        det.load_state_dict([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="version"):
        det.load_state_dict({"version": 99})
    bad = det.state_dict()
    del bad["layers"]
    with pytest.raises(ValueError, match="malformed"):
        det.load_state_dict(bad)
    bad = det.state_dict()
    bad["config"]["dwell"] = -1
    with pytest.raises(ValueError, match="dwell"):
        det.load_state_dict(bad)
    assert det.state_dict() == PhaseDetector().state_dict()  # unchanged by failed loads


def test_update_rejects_non_mapping() -> None:
    with pytest.raises(TypeError, match="mapping"):
        PhaseDetector().update([("step", 1)])  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Public surface, evidence, annotate
# --------------------------------------------------------------------------------------------


def test_annotate_and_phases() -> None:
    det = PhaseDetector(warmup=1, window=1)
    assert det.annotate({"grad_snr/x.y": 2.0}) == {"phase": "warmup", "phase/x.y": "warmup"}
    det.update({"step": 1, "grad_snr/x.y": 2.0, "grad_snr/z": 0.5, "grad_snr": 0.9})
    assert det.phase == "diffusion"
    assert det.phases == {"x.y": "drift", "z": "diffusion"}
    assert det.annotate({"step": 2}) == {
        "phase": "diffusion",
        "phase/x.y": "drift",
        "phase/z": "diffusion",
    }
    assert "events=3" in repr(det)
    with pytest.raises(AttributeError):
        det.events[0].step = 5  # type: ignore[misc]  # frozen


@pytest.mark.parametrize("exponent", [1.0, 0.5, 0.25])
def test_motion_exponent_evidence(exponent: float) -> None:
    """The switch carries the log-log slope of weight_dist against step."""
    det = PhaseDetector()
    for i in range(1, 40):
        t = 100 * i
        det.update(
            {"step": t, "grad_snr/fc": 3.0 if i < 20 else 0.2, "weight_dist/fc": 0.01 * t**exponent}
        )
    ev = next(e for e in det.events if e.new == "diffusion").evidence
    assert ev["motion_exponent"] == pytest.approx(exponent, abs=1e-9)
    assert ev["snr"] == 0.2 and ev["snr_median"] == 0.2 and ev["threshold"] == 0.8
    assert ev["steps"] == 100  # the dwell
    assert "net_to_path" not in ev  # no update_size in these records


@pytest.mark.parametrize("walk", [False, True])
def test_net_to_path_evidence(walk: bool) -> None:
    """Straight drift: net/path = 1. Random walk with steps of size u: about t^(-1/2)."""
    det = PhaseDetector()
    u = 0.01
    for i in range(1, 40):
        t = 100 * i
        dist = u * math.sqrt(t) if walk else u * t
        det.update(
            {"step": t, "grad_snr": 3.0 if i < 20 else 0.2, "weight_dist": dist, "update_size": u}
        )
    ev = next(e for e in det.events if e.new == "diffusion")
    expected = 1 / math.sqrt(ev.step) if walk else 1.0
    assert ev.evidence["net_to_path"] == pytest.approx(expected)


@given(
    c=st.floats(-2.0, 2.0),
    scale=st.floats(1e-6, 1e6),
    ts=st.lists(st.integers(1, 10**7), min_size=3, max_size=20, unique=True),
)
def test_displacement_exponent_closed_form(c: float, scale: float, ts: list[int]) -> None:
    got = displacement_exponent((t, scale * t**c) for t in ts)
    assert got == pytest.approx(c, abs=1e-6)


def test_displacement_exponent_needs_three_points() -> None:
    assert displacement_exponent([(1, 1.0), (2, 2.0)]) is None
    assert displacement_exponent([(0, 1.0), (2, 2.0), (3, -1.0), (4, math.nan)]) is None
    assert displacement_exponent([(5, 1.0), (5, 2.0), (5, 3.0)]) is None


def test_robust_z() -> None:
    z, med, scale = robust_z([1.0, 2.0, 3.0, 4.0, 5.0], 13.0)
    assert med == 3.0 and scale == pytest.approx(1.4826) and z == pytest.approx(10 / 1.4826)
    z, _, _ = robust_z([0.0] * 10, 1.0)
    assert z == 1e300  # constant history: large but finite


# --------------------------------------------------------------------------------------------
# Constructor validation
# --------------------------------------------------------------------------------------------

INVALID = [
    ("enter_diffusion", "0.8", TypeError),
    ("enter_diffusion", True, TypeError),
    ("enter_diffusion", 0.0, ValueError),
    ("enter_diffusion", math.nan, ValueError),
    ("enter_diffusion", 2.0, ValueError),  # above enter_drift
    ("enter_drift", None, TypeError),
    ("enter_drift", -1.0, ValueError),
    ("enter_drift", math.inf, ValueError),
    ("enter_drift", 0.8, ValueError),  # equal to enter_diffusion: no band
    ("window", 5.0, TypeError),
    ("window", 0, ValueError),
    ("dwell", 2.5, TypeError),
    ("dwell", -1, ValueError),
    ("warmup", "5", TypeError),
    ("warmup", -3, ValueError),
    ("spike_threshold", [10], TypeError),
    ("spike_threshold", 0, ValueError),
    ("spike_window", False, TypeError),
    ("spike_window", 0, ValueError),
    ("spike_kick", 1, TypeError),
    ("spike_kick", "layers", ValueError),
    ("motion_window", 8.0, TypeError),
    ("motion_window", 2, ValueError),
    ("signal", 3, TypeError),
    ("signal", "", ValueError),
    ("signal", "grad_snr/fc1", ValueError),
]


@pytest.mark.parametrize(("name", "value", "exc"), INVALID)
def test_constructor_validation(name: str, value: object, exc: type[Exception]) -> None:
    with pytest.raises(exc) as info:
        PhaseDetector(**{name: value})
    msg = str(info.value)
    assert name in msg and repr(value) in msg and "pass" in msg


def test_arguments_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        PhaseDetector(0.8)  # type: ignore[misc]


def test_every_argument_is_covered_by_validation_tests() -> None:
    import inspect

    params = set(inspect.signature(PhaseDetector).parameters)
    assert params == {name for name, _, _ in INVALID}


def test_other_signal_key() -> None:
    det = PhaseDetector(signal="gsnr", warmup=1, window=1)
    det.update({"step": 1, "gsnr/fc1": 0.1, "grad_snr/fc1": 9.0, "gsnr": 5.0})
    assert det.phases == {"fc1": "diffusion"} and det.phase == "drift"


def test_noise_scale_is_carried_as_evidence_and_survives_a_round_trip() -> None:
    det = PhaseDetector(window=50, dwell=20)
    for i in range(12):
        snr = 3.0 if i < 6 else 0.2
        det.update(
            {
                "step": 10 * i,
                "grad_snr/fc1": snr,
                "grad_snr": snr,
                "batch_over_noise_scale/fc1": 0.5 + i,
                "batch_over_noise_scale": 7.0,
            }
        )
    switch = next(e for e in det.events if e.layer == "fc1" and e.new == "diffusion")
    assert switch.evidence["batch_over_noise_scale"] == 0.5 + switch.step // 10
    clone = PhaseDetector()
    clone.load_state_dict(json.loads(json.dumps(det.state_dict())))
    assert clone.state_dict() == det.state_dict()


def test_a_record_counting_checkpoint_is_refused_with_an_explanation() -> None:
    """Version 1 states (window/dwell/warmup in records) cannot be converted: say so."""
    old = {"version": 1, "config": {"window": 5, "dwell": 3, "warmup": 5}, "layers": {}}
    det = PhaseDetector()
    with pytest.raises(ValueError, match=r"version 1.*counted records.*optimizer steps"):
        det.load_state_dict(old)
    assert det.state_dict() == PhaseDetector().state_dict()


@given(
    seed=st.integers(0, 2**32 - 1),
    segments=st.lists(segment, min_size=1, max_size=6),
    k=st.sampled_from([1, 10, 25, 50, 100]),
)
def test_warm_up_never_hides_a_drift_the_snr_shows(
    seed: int, segments: list[tuple[float, float, int]], k: int
) -> None:
    """SNR above 1.5 on two records before a layer's first diffusion: drift is reported first."""
    values = random_stream(random.Random(seed), segments)
    det = PhaseDetector()
    events = feed(det, snr_records(values, every=k))
    trs = transitions(events, "fc1")
    first_diffusion = next((s for s, _, new in trs if new == "diffusion"), math.inf)
    shown = sum(v > 1.5 for i, v in enumerate(values) if k * i < first_diffusion)
    if shown >= 2:
        assert trs[0][1:] == ("warmup", "drift"), trs
