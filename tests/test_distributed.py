"""DDP with real processes (gloo on CPU): records equal a one-process run on the whole batches."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from sgdlens import PhaseMonitor
from tests._dist_worker import GLOBAL_BATCH, LOG_EVERY, STEPS, model_without_dropout, worker
from tests._train import batches


def reference():
    model = model_without_dropout()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mon = PhaseMonitor(opt, model=model, log_every=LOG_EVERY)
    for x, y in batches(STEPS, size=GLOBAL_BATCH):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        mon.observe(loss=loss)
        opt.step()
    return list(model.parameters()), mon.history.records


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_records_match_one_process_and_only_rank0_writes(tmp_path, world):
    mp.spawn(
        worker, args=(world, str(tmp_path / "init"), str(tmp_path), -1), nprocs=world, join=True
    )
    params, records = reference()
    results = [torch.load(tmp_path / f"result{r}.pt", weights_only=True) for r in range(world)]
    for res in results:
        for a, b in zip(res["params"], params):
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
        assert [r["step"] for r in res["records"]] == [r["step"] for r in records]
        for got, want in zip(res["records"], records):
            for key, value in want.items():
                if key == "time":
                    continue
                if isinstance(value, str):
                    assert got[key] == value, key
                else:
                    assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key

    # every rank sees the same records, phases included; only rank 0 wrote its file
    def untimed(res):
        return [{k: v for k, v in r.items() if k != "time"} for r in res["records"]]

    assert all(untimed(res) == untimed(results[0]) for res in results)
    assert (tmp_path / "rank0.jsonl").exists()
    assert not any((tmp_path / f"rank{r}.jsonl").exists() for r in range(1, world))


def test_a_crashed_rank_fails_the_run_with_its_error(tmp_path):
    with pytest.raises(Exception, match="rank 1 crashed on purpose"):
        mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path), 1), nprocs=2, join=True)
    assert not os.path.exists(tmp_path / "result0.pt")
