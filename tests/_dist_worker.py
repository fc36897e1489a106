"""The per-rank body of tests/test_distributed.py (importable by spawned processes)."""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from sgdlens import PhaseMonitor
from sgdlens.lenses import Key, Lens
from sgdlens.sinks import JSONLSink
from tests._train import batches, make_model

STEPS, LOG_EVERY, GLOBAL_BATCH = 20, 5, 16


def model_without_dropout():
    model = make_model()
    model.drop.p = 0.0
    return model


def init(rank: int, world: int, init_file: str) -> None:
    """Join the gloo process group (60 s timeout on every collective)."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )


def leave() -> None:
    """End a rank whose group is already destroyed without finalising the interpreter.

    Under load a rank sometimes aborted (SIGABRT, "terminate called without an active
    exception") after its results were written and the group destroyed: gloo's threads may
    still hold futures of DDP's Python comm hooks while the interpreter tears down (see
    pytorch/pytorch#179291). That is torch's teardown, not what the tests check, so a rank
    that got this far exits at once with status 0; a rank that raised never reaches here.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def probe_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def worker(
    rank: int,
    world: int,
    init_file: str,
    out_dir: str,
    crash_rank: int,
    wrap: str = "ddp",
    with_probes: bool = False,
) -> None:
    init(rank, world, init_file)
    try:
        model = model_without_dropout()
        watched = model  # the model= the monitor gets
        refused = []  # the errors of the set-ups the monitor and the probes refuse
        if wrap == "ddp":
            net: torch.nn.Module = DDP(model)
        elif wrap == "fsdp":  # FSDP2: every parameter sharded across the ranks
            from torch.distributed.fsdp import fully_shard

            net = fully_shard(model)
        else:  # FSDP1: "fsdp1" one flat shard of original parameters (size 0 on some ranks),
            # "fsdp1_flat" a FlatParameter per Linear (use_orig_params=False)
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            flat = wrap == "fsdp1_flat"
            net = watched = FSDP(
                model,
                device_id=torch.device("cpu"),
                use_orig_params=not flat,
                auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}) if flat else None,
            )
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        bad: list[dict] = []
        x0, y0 = batches(1, seed=9, size=8)[0]  # the probe batch
        if wrap != "ddp":  # probes under FSDP
            from sgdlens import probes

            bad.append({"model": watched, "probes": [probes.sharpness_probe(probe_loss, (x0, y0))]})
            try:
                probes.sharpness(watched, probe_loss, (x0, y0))
            except ValueError as e:
                refused.append(str(e))
        if wrap == "fsdp1":  # the inner model holds no FSDP module
            bad.append({"model": model})
        if wrap == "fsdp1_flat":  # a FlatParameter mixes weights and biases
            from sgdlens.lenses import GradSNR

            bad.append({"model": net, "lenses": [GradSNR(weights_only=True)]})
        for kwargs in bad:
            try:
                PhaseMonitor(opt, **kwargs).close()
            except ValueError as e:
                refused.append(str(e))
        sink = JSONLSink(os.path.join(out_dir, f"rank{rank}.jsonl"))
        probe_list = []
        if with_probes:  # the same fixed probe batch on every rank
            from sgdlens import probes

            probe_list = [probes.sharpness_probe(probe_loss, (x0, y0), every=10, per_decade=None)]
        replica = model_without_dropout() if with_probes and wrap != "ddp" else None
        mon = PhaseMonitor(
            opt,
            model=watched,
            log_every=LOG_EVERY,
            sinks=[sink],
            probes=probe_list,
            probe_budget=1.0,
            probe_model=replica,  # under FSDP: rank 0 probes this unsharded copy
        )
        for t, (x, y) in enumerate(batches(STEPS, size=GLOBAL_BATCH)):
            if rank == crash_rank and t == 7:
                raise RuntimeError(f"rank {rank} crashed on purpose")
            xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
            opt.zero_grad()
            loss = F.cross_entropy(net(xs), ys)
            loss.backward()
            mon.observe(loss=loss)
            opt.step()
        mon.close()
        if wrap.startswith("fsdp1"):
            with FSDP.summon_full_params(net):
                full = [p.detach().clone() for p in model.parameters()]
        else:
            full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
        unsharded_trace = None
        if wrap == "fsdp":  # the documented way: probe an unsharded copy of the model
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            from sgdlens import probes

            options = StateDictOptions(full_state_dict=True)
            plain = model_without_dropout()
            plain.load_state_dict(get_model_state_dict(model, options=options))
            g = torch.Generator().manual_seed(0)
            unsharded_trace = probes.hessian_trace(plain, probe_loss, (x0, y0), generator=g).trace
        result = {
            "params": [p.detach() for p in full],
            "records": mon.history.records,
            "refused": refused,
            "unsharded_trace": unsharded_trace,
            "ndims": mon.view.ndims,
        }
        torch.save(result, os.path.join(out_dir, f"result{rank}.pt"))
        dist.barrier()  # nobody tears the group down while another rank still uses it
    except RuntimeError as e:
        if 0 <= crash_rank != rank and "Connection closed" in str(e):
            # the crashed rank closed the group under this one; mp.spawn reports the first
            # rank to exit, and the test is about the crashed rank's own error reaching it
            time.sleep(5)
        raise
    finally:
        dist.destroy_process_group()
    leave()


def worker_noise_scale(rank: int, world: int, init_file: str, out_dir: str, decay: float) -> None:
    """DDP training with NoiseScale('ranks'): local vs all-reduced gradients."""
    from sgdlens.lenses import NoiseScale

    init(rank, world, init_file)
    try:
        model = model_without_dropout()
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        lens = NoiseScale("ranks", ddp=ddp, decay=decay)
        mon = PhaseMonitor(opt, model=model, lenses=[lens], log_every=LOG_EVERY, detector=False)
        for x, y in batches(STEPS, size=GLOBAL_BATCH):
            xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
            opt.zero_grad()
            F.cross_entropy(ddp(xs), ys).backward()
            opt.step()
        mon.close()
        # DDP keeps the comm hook: one more step, which it must still all-reduce unrecorded
        x, y = batches(1, seed=5, size=GLOBAL_BATCH)[0]
        opt.zero_grad()
        F.cross_entropy(ddp(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
        result = {
            "records": mon.history.records,
            "grads": [p.grad.clone() for p in model.parameters()],
            "recorded_after_close": mon.lenses[0]._local.clone(),
        }
        torch.save(result, os.path.join(out_dir, f"noise{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    leave()


def worker_noise_scale_no_sync(
    rank: int, world: int, init_file: str, out_dir: str, decay: float, estimator: str
) -> None:
    """DDP with NoiseScale reading this rank's small batches against the all-reduced gradient
    of the global batch: 'accumulation' over two micro-batches a step, the first under
    no_sync; 'per_sample' over the rank's samples in one backward."""
    from sgdlens.lenses import NoiseScale

    init(rank, world, init_file)
    try:
        model = model_without_dropout()
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        lens = NoiseScale(estimator, decay=decay)
        mon = PhaseMonitor(opt, model=model, lenses=[lens], log_every=LOG_EVERY, detector=False)
        for x, y in batches(STEPS, size=GLOBAL_BATCH):
            xr, yr = x.chunk(world)[rank], y.chunk(world)[rank]
            opt.zero_grad()
            if estimator == "per_sample":
                F.cross_entropy(ddp(xr), yr).backward()
            else:
                halves = list(zip(xr.chunk(2), yr.chunk(2)))
                with ddp.no_sync():
                    (F.cross_entropy(ddp(halves[0][0]), halves[0][1]) / 2).backward()
                (F.cross_entropy(ddp(halves[1][0]), halves[1][1]) / 2).backward()
            opt.step()
        mon.close()
        result = {
            "records": mon.history.records,
            "params": [p.detach().clone() for p in model.parameters()],
        }
        torch.save(result, os.path.join(out_dir, f"{estimator}{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    leave()


class ParamSquares(Lens):
    """A user's lens: Σ θ² over the whole model, declared as a sum over the ranks' shards."""

    name = "param_squares"
    keys = (Key("param_sq", "sum of squared parameters", per_layer=False),)
    reductions: ClassVar[Mapping[str, str]] = {"sq": "shards"}

    def init(self, view):
        return {}

    def local(self, state, step):
        return {"sq": sum(p.detach().double().square().sum() for p in step.view.local_params)}

    def finish(self, state, step, sums):
        return {"param_sq": sums["sq"]}


def declared_lenses():
    """Lenses whose log-point sums are declared: windows closing off the log steps (3 and 5),
    an EMA, the optimizer's moments, and a user's lens."""
    from sgdlens.lenses import GradNorm, GradSNR, WeightNorms

    return [GradSNR(window=3), GradNorm(), WeightNorms(), ParamSquares()]


def quick_detector():
    """A detector whose warm-up ends at the first record (events at step 5, with the trace)."""
    from sgdlens.phase import PhaseDetector

    return PhaseDetector(warmup=5, window=5, dwell=5)


def worker_records(rank: int, world: int, init_file: str, out_dir: str, name: str) -> None:
    """Train on this rank's share of the global batches; save the records as ``<name><rank>.pt``.

    ``"sampled"``: FSDP2 with ``overhead_budget`` set differently on each rank (rank 0 can
    afford every step, rank 1 almost none). ``"batch_snr"``: DDP with BatchSNR reading each
    rank's samples. ``"declared"``: FSDP2 with :func:`declared_lenses` and
    :func:`quick_detector`, counting the all-reduces the monitor makes at each step (saved as
    ``declared_calls<rank>.pt``, the event records as ``declared_events<rank>.pt``).
    """
    from torch.distributed.fsdp import fully_shard

    from sgdlens.lenses import BatchSNR

    init(rank, world, init_file)
    try:
        model = model_without_dropout()
        if name == "sampled":
            net: torch.nn.Module = fully_shard(model)
            kwargs: dict = {
                "log_every": LOG_EVERY * 2,
                "overhead_budget": 1.0 if rank == 0 else 1e-6,
            }
        elif name == "declared":
            net = fully_shard(model)
            kwargs = {
                "log_every": LOG_EVERY,
                "lenses": declared_lenses(),
                "detector": quick_detector(),
            }
        else:
            net, kwargs = DDP(model), {"log_every": LOG_EVERY, "lenses": [BatchSNR()]}
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        mon = PhaseMonitor(opt, model=model, **{"detector": False, **kwargs})
        calls, real = [], dist.all_reduce

        def counted(*args, **kw):
            calls[-1] += 1
            return real(*args, **kw)

        for x, y in batches(STEPS, size=GLOBAL_BATCH):
            opt.zero_grad()
            F.cross_entropy(net(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
            if name == "declared":  # every rank's observation, averaged
                mon.observe(loss=torch.tensor(float(rank)))
            calls.append(0)
            dist.all_reduce = counted  # the monitor's own collectives, inside step()
            try:
                opt.step()
            finally:
                dist.all_reduce = real
        mon.close()
        torch.save(mon.history.records, os.path.join(out_dir, f"{name}{rank}.pt"))
        torch.save(calls, os.path.join(out_dir, f"{name}_calls{rank}.pt"))
        torch.save(mon.history.events, os.path.join(out_dir, f"{name}_events{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    leave()
