"""The public surface of sgdlens.probes: names, docstrings, lazy extras, data handling."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch

from sgdlens import probes
from sgdlens.probes import Batches
from sgdlens.probes._common import as_batches


def test_every_public_name_is_documented_with_an_example():
    for name in probes.__all__:
        obj = getattr(probes, name)
        doc = inspect.getdoc(obj) or ""
        assert doc, name
        if inspect.isfunction(obj) or name == "Batches":
            assert "Example:" in doc and ">>>" in doc, name
        if inspect.isfunction(obj) and name != "preserved":
            assert "Cost" in doc, name


def test_import_does_not_pull_optional_extras():
    code = (
        "import sys, torch, numpy\n"
        "before = set(sys.modules)\n"  # torch itself may import tqdm when installed
        "import sgdlens.probes\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "bad = [m for m in ('matplotlib', 'tqdm', 'sklearn') if m in new]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_batch_or_batches():
    x, y = torch.zeros(2, 3), torch.zeros(2)
    assert as_batches((x, y)) == [(x, y)]
    assert len(as_batches([x, y])) == 1  # a DataLoader-style [x, y] batch
    assert len(as_batches([(x, y), (x, y)])) == 2
    assert len(as_batches(iter([(x, y)] * 3))) == 3
    assert len(as_batches(Batches([x, x]))) == 2
    assert as_batches({"x": x}) == [{"x": x}]
    with pytest.raises(ValueError, match="no batches"):
        as_batches([])
    with pytest.raises(TypeError, match="one batch"):
        as_batches("data.csv")


def test_dataloader_batches_are_averaged_equally():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 2, generator=g), torch.randn(10, generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(ds, batch_size=4)  # batches of 4, 4, 2
    m = torch.nn.Linear(2, 1)

    def mse(model, b):
        return (model(b[0]).squeeze(-1) - b[1]).square().mean()

    res = probes.interpolate(m, m, mse, loader, steps=2)
    with torch.no_grad():
        want = sum(float(mse(m, (x[i : i + 4], y[i : i + 4]))) for i in (0, 4, 8)) / 3
    assert float(res.losses[0]) == pytest.approx(want, rel=1e-6)
