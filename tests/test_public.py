"""The public surface: names exported, nothing heavy imported, data set pinned."""

from __future__ import annotations

import subprocess
import sys

import torch

import sgdlens
from sgdlens.datasets import tishby12


def test_every_public_name_resolves():
    for name in sgdlens.__all__:
        assert getattr(sgdlens, name) is not None, name
    for name in sgdlens.lenses.__all__:
        assert getattr(sgdlens.lenses, name) is not None, name


def test_import_pulls_in_no_framework():
    code = (
        "import sys, sgdlens, sgdlens.lenses, sgdlens.sinks;"
        "heavy = {'lightning', 'pytorch_lightning', 'transformers', 'tensorboard', 'matplotlib',"
        " 'pandas', 'sklearn', 'accelerate', 'scipy'};"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_tishby12_is_the_authors_data_set():
    x, y = tishby12()
    assert x.shape == (4096, 12) and int(y.sum()) == 2118
    weight = x.sum(1).long()
    per_weight = [int(y[weight == k].sum()) for k in range(13)]
    assert per_weight == [0, 0, 0, 0, 0, 60, 532, 732, 495, 220, 66, 12, 1]
    assert torch.equal(x[5], torch.tensor([0.0] * 9 + [1, 0, 1]))  # binary counting, MSB first


def test_importing_sgdlens_does_not_load_torch_dynamo():
    """``import sgdlens`` stays as light as ``import torch``: torch._dynamo (about 0.8 s) loads
    only when a per-sample engine first wraps its hooks for torch.compile."""
    import subprocess
    import sys

    code = (
        "import sys, sgdlens, sgdlens.lenses, sgdlens.probes, sgdlens.integrations; "
        "print('torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
