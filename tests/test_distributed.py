"""DDP and FSDP2 with real processes (gloo on CPU): records equal a one-process run."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from sgdlens import PhaseMonitor
from tests._dist_worker import GLOBAL_BATCH, LOG_EVERY, STEPS, model_without_dropout, worker
from tests._train import batches


def reference(with_probes=False):
    from sgdlens import probes
    from tests._dist_worker import probe_loss

    model = model_without_dropout()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batch = batches(1, seed=9, size=8)[0]
    probe_list = [probes.sharpness_probe(probe_loss, batch, every=10, per_decade=None)]
    mon = PhaseMonitor(
        opt,
        model=model,
        log_every=LOG_EVERY,
        probe_budget=1.0,
        probes=probe_list if with_probes else [],
    )
    for x, y in batches(STEPS, size=GLOBAL_BATCH):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        mon.observe(loss=loss)
        opt.step()
    return list(model.parameters()), mon.history.records


def unsharded_trace(params):
    from sgdlens import probes
    from tests._dist_worker import probe_loss

    plain = model_without_dropout()
    with torch.no_grad():
        for p, q in zip(plain.parameters(), params):
            p.copy_(q)
    g = torch.Generator().manual_seed(0)
    return probes.hessian_trace(plain, probe_loss, batches(1, seed=9, size=8)[0], generator=g).trace


@pytest.mark.parametrize(
    ("wrap", "world", "with_probes"),
    [
        ("ddp", 2, False),
        ("ddp", 4, False),
        ("fsdp", 2, False),
        ("fsdp1", 2, False),
        ("fsdp1_flat", 2, False),
        ("ddp", 2, True),
        ("fsdp", 2, True),
        ("fsdp1", 2, True),
    ],
)
def test_records_match_one_process_and_only_rank0_writes(tmp_path, wrap, world, with_probes):
    args = (world, str(tmp_path / "init"), str(tmp_path), -1, wrap, with_probes)
    mp.spawn(worker, args=args, nprocs=world, join=True)
    params, records = reference(with_probes)
    results = [torch.load(tmp_path / f"result{r}.pt", weights_only=True) for r in range(world)]
    for res in results:
        assert len(res["params"]) == len(params)
        refused = res["refused"]
        if wrap != "ddp":  # probes, on demand or scheduled, refuse FSDP models
            assert "model holds FSDP-managed parameters" in refused[0]
            assert "cannot run under FSDP" in refused[1]
            assert all("run the probe on an unsharded copy" in m for m in refused[:2])
        if wrap == "fsdp1":  # the unwrapped model cannot tell the monitor how it is sharded
            assert "pass the wrapped model" in refused[2]
            assert res["ndims"] == tuple(p.dim() for p in params)  # not the 1-D shards
        if wrap == "fsdp1_flat":
            assert "use_orig_params=True" in refused[2]
        assert len(refused) == {"ddp": 0, "fsdp": 2}.get(wrap, 3)
        if wrap != "ddp":  # ... unless given an unsharded copy to run on
            assert "probe_model=" in refused[1]
        if wrap == "fsdp":  # the documented way round: probe a gathered, unsharded copy
            assert res["unsharded_trace"] == pytest.approx(unsharded_trace(params), rel=1e-4)
        for a, b in zip(res["params"], params):
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
        assert [r["step"] for r in res["records"]] == [r["step"] for r in records]
        for got, want in zip(res["records"], records):
            if not with_probes:  # the same layers, keys and nothing else
                assert set(got) == set(want)
            for key, value in want.items():
                if key in ("time", "probe_time_fraction", "sharpness_hvps"):
                    continue
                if key in ("sharpness", "eos_ratio"):  # Lanczos to 1e-3 from a random start
                    assert got[key] == pytest.approx(value, rel=1e-2), key
                    continue
                if isinstance(value, str):
                    assert got[key] == value, key
                else:
                    assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key

        # probes ran on every rank at the same steps (rank 0 decides), without changing training
        assert [r["step"] for r in res["records"] if "sharpness" in r] == (
            [10, 20] if with_probes else []
        )

    # every rank sees the same records, phases included; only rank 0 wrote its file
    def untimed(res):
        per_rank = ("time", "probe_time_fraction")  # wall-clock readings differ between ranks
        return [{k: v for k, v in r.items() if k not in per_rank} for r in res["records"]]

    assert all(untimed(res) == untimed(results[0]) for res in results)
    assert (tmp_path / "rank0.jsonl").exists()
    assert not any((tmp_path / f"rank{r}.jsonl").exists() for r in range(1, world))


def test_a_crashed_rank_fails_the_run_with_its_error(tmp_path):
    with pytest.raises(Exception, match="rank 1 crashed on purpose"):
        mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path), 1), nprocs=2, join=True)
    assert not os.path.exists(tmp_path / "result0.pt")


def _noise_scale_reference(decay, split, b_small, b_big):
    """One process on the global batches: the two-batch estimates per layer with the small
    batches ``split(x, y)`` gives, EMA-smoothed as NoiseScale does. Returns the model, its
    optimizer and {log step: (per-layer noise scale, whole-model noise scale)}."""
    from sgdlens.lenses.noise_scale import two_batch_estimates

    model = model_without_dropout()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    layers = {"fc1": [model.fc1.weight, model.fc1.bias], "fc2": [model.fc2.weight, model.fc2.bias]}

    def layer_sq():
        return torch.stack(
            [sum(p.grad.double().square().sum() for p in ps) for ps in layers.values()]
        )

    g2 = tr = torch.zeros(2, dtype=torch.float64)
    expected = {}
    for step, (x, y) in enumerate(batches(STEPS, size=GLOBAL_BATCH), 1):
        small = []
        for xs, ys in split(x, y):
            opt.zero_grad()
            F.cross_entropy(model(xs), ys).backward()
            small.append(layer_sq())
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        est = two_batch_estimates(torch.stack(small).mean(0), layer_sq(), b_small, b_big)
        g2, tr = g2.lerp(est[0], 1 - decay), tr.lerp(est[1], 1 - decay)
        opt.step()
        if step % LOG_EVERY == 0:
            corr = 1 - decay**step
            expected[step] = (tr / corr) / (g2 / corr), tr.sum() / g2.sum()
    return model, opt, expected


def _assert_noise_records(records, expected):
    assert [rec["step"] for rec in records] == sorted(expected)
    for rec in records:
        per_layer, total = expected[rec["step"]]
        assert rec["noise_scale/fc1"] == pytest.approx(float(per_layer[0]), rel=1e-4)
        assert rec["noise_scale/fc2"] == pytest.approx(float(per_layer[1]), rel=1e-4)
        assert rec["noise_scale"] == pytest.approx(float(total), rel=1e-4)


def test_noise_scale_from_ranks_matches_the_two_batch_reference(tmp_path):
    from tests._dist_worker import worker_noise_scale

    world, decay = 2, 0.5
    mp.spawn(
        worker_noise_scale,
        args=(world, str(tmp_path / "init"), str(tmp_path), decay),
        nprocs=world,
        join=True,
    )
    # reference: one process; each rank's local gradient and the full-batch one, per layer
    b = GLOBAL_BATCH // world
    model, opt, expected = _noise_scale_reference(
        decay, lambda x, y: zip(x.chunk(world), y.chunk(world)), b, world * b
    )
    x, y = batches(1, seed=5, size=GLOBAL_BATCH)[0]  # the step after the monitor closed
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for r in range(world):
        result = torch.load(tmp_path / f"noise{r}.pt", weights_only=True)
        # after close DDP's hook still all-reduces (the full-batch gradient), recording nothing
        for got, p in zip(result["grads"], model.parameters()):
            torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-6)
        assert not result["recorded_after_close"].any()
        records = result["records"]
        _assert_noise_records(records, expected)
        for rec in records:
            _, total = expected[rec["step"]]
            assert rec["batch_over_noise_scale"] == pytest.approx(
                GLOBAL_BATCH / float(total), rel=1e-4
            )


@pytest.mark.parametrize(
    ("strategies", "match"),
    [
        (None, r"model=NoneType.*pass the wrapped model"),
        (["HYBRID_SHARD"], r"\['HYBRID_SHARD'\].*use FULL_SHARD or SHARD_GRAD_OP"),
        (["NO_SHARD", "FULL_SHARD"], r"mix.*\['FULL_SHARD', 'NO_SHARD'\].*same sharding_strategy"),
    ],
)
def test_fsdp1_parameters_the_monitor_cannot_reduce_are_refused(monkeypatch, strategies, match):
    from types import SimpleNamespace

    from sgdlens import _torch

    model = torch.nn.Linear(3, 2)
    for p in model.parameters():
        p._fsdp_flattened = True  # how FSDP1 marks the parameters it flattened
    fake = [SimpleNamespace(sharding_strategy=SimpleNamespace(name=s)) for s in strategies or []]
    monkeypatch.setattr(_torch, "fsdp1_modules", lambda m: fake)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=match):
        PhaseMonitor(opt, model=None if strategies is None else model)
    monkeypatch.setattr(_torch, "fsdp1_modules", lambda m: fake[:1])  # one NO_SHARD: replicated
    if strategies and strategies[0] == "NO_SHARD":
        assert not PhaseMonitor(opt, model=model).view.sharded


@pytest.mark.parametrize("estimator", ["accumulation", "per_sample"])
def test_noise_scale_from_local_batches_under_ddp(tmp_path, estimator):
    """Under DDP the small batches are each rank's micro-batches (gradient accumulation with
    ``no_sync`` for all but the last) or samples, the big one the global batch that DDP's
    all-reduce averages (world × local), and the estimates average over ranks. Training equals
    one process on the global batch."""
    from tests._dist_worker import worker_noise_scale_no_sync

    world, decay = 2, 0.5
    micro = 2 if estimator == "accumulation" else GLOBAL_BATCH // world  # small batches a rank
    mp.spawn(
        worker_noise_scale_no_sync,
        args=(world, str(tmp_path / "init"), str(tmp_path), decay, estimator),
        nprocs=world,
        join=True,
    )

    def every_micro_batch(x, y):  # every rank's every micro-batch (or sample)
        for xr, yr in zip(x.chunk(world), y.chunk(world)):
            yield from zip(xr.chunk(micro), yr.chunk(micro))

    b = GLOBAL_BATCH // world // micro
    model, _, expected = _noise_scale_reference(decay, every_micro_batch, b, world * micro * b)
    for r in range(world):
        result = torch.load(tmp_path / f"{estimator}{r}.pt", weights_only=True)
        for got, p in zip(result["params"], model.parameters()):
            torch.testing.assert_close(got, p.detach(), rtol=1e-5, atol=1e-6)
        _assert_noise_records(result["records"], expected)


def test_sampling_ranks_read_the_same_steps(tmp_path):
    """Each rank times its own steps, but all of them read the steps rank 0 chooses: under
    FSDP a read step holds a collective, and the records must agree."""
    from tests._dist_worker import worker_records

    mp.spawn(
        worker_records,
        args=(2, str(tmp_path / "init"), str(tmp_path), "sampled"),
        nprocs=2,
        join=True,
    )
    records = [torch.load(tmp_path / f"sampled{r}.pt", weights_only=True) for r in range(2)]
    assert [r["update_every"] for r in records[0]] == [1, 1]  # rank 0 affords every step

    def untimed(recs):
        return [{k: v for k, v in r.items() if k != "time"} for r in recs]

    assert untimed(records[0]) == untimed(records[1])


def test_batch_snr_under_ddp_is_the_global_batchs(tmp_path):
    """Under DDP ``.grad`` is the mean over every rank's batch; BatchSNR's per-sample sums
    cover every rank's samples too, so the records equal one process on the global batch."""
    from sgdlens.lenses import BatchSNR
    from tests._dist_worker import worker_records

    mp.spawn(
        worker_records,
        args=(2, str(tmp_path / "init"), str(tmp_path), "batch_snr"),
        nprocs=2,
        join=True,
    )
    model = model_without_dropout()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mon = PhaseMonitor(opt, model=model, lenses=[BatchSNR()], log_every=LOG_EVERY, detector=False)
    for x, y in batches(STEPS, size=GLOBAL_BATCH):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    mon.close()
    want = mon.history.records
    keys = [k for k in want[-1] if k.startswith(("batch_snr", "gsnr"))]
    assert len(keys) == 6  # whole model and two layers, two metrics
    for r in range(2):
        got = torch.load(tmp_path / f"batch_snr{r}.pt", weights_only=True)
        assert [g["step"] for g in got] == [w["step"] for w in want]
        for g, w in zip(got, want):
            for k in keys:
                assert g[k] == pytest.approx(w[k], rel=1e-4), (r, g["step"], k)


def test_declared_sums_take_one_all_reduce_per_record(tmp_path):
    """Under FSDP2 every lens's log-point sums (a user's lens among them) and the observed
    scalars are added up in one all-reduce per record, windows closing off the log steps take
    none, and the records equal one process's on the global batch; so do the event records'
    per-step trace (the loss the mean of the ranks', the gradient norm the whole model's), at
    one more all-reduce per record that has events."""
    from tests._dist_worker import declared_lenses, quick_detector, worker_records

    mp.spawn(
        worker_records,
        args=(2, str(tmp_path / "init"), str(tmp_path), "declared"),
        nprocs=2,
        join=True,
    )
    model = model_without_dropout()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mon = PhaseMonitor(
        opt, model=model, detector=quick_detector(), log_every=LOG_EVERY, lenses=declared_lenses()
    )
    for x, y in batches(STEPS, size=GLOBAL_BATCH):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        mon.observe(loss=0.5)  # the mean of the ranks' 0 and 1
        opt.step()
    want, want_events = mon.history.records, mon.history.events
    assert "param_sq" in want[0] and "grad_snr" in want[0] and "weight_dist" in want[0]
    assert want_events and "trace/grad_norm" in want_events[0]
    event_steps = {e["step"] for e in want_events}

    def same(got, want):
        assert set(got) == set(want)
        for key, value in want.items():
            if isinstance(value, str):
                assert got[key] == value, key
            elif key != "time":
                assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key

    for r in range(2):
        got = torch.load(tmp_path / f"declared{r}.pt", weights_only=True)
        assert [g["step"] for g in got] == [w["step"] for w in want]
        for g, w in zip(got, want):
            same(g, w)
        events = torch.load(tmp_path / f"declared_events{r}.pt", weights_only=True)
        assert len(events) == len(want_events)
        for g, w in zip(events, want_events):
            same(g, w)
        # one all-reduce per step (the finite flag every rank must agree on), one more per
        # record, one more per record with events (their trace)
        calls = torch.load(tmp_path / f"declared_calls{r}.pt", weights_only=True)
        assert calls == [1 + (t % LOG_EVERY == 0) + (t in event_steps) for t in range(1, STEPS + 1)]
