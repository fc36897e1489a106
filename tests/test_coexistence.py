"""The per-sample lenses beside torch.compile and other autograd users.

Each row trains a few steps with ``NoiseScale("per_sample")`` and ``BatchSNR()`` and asserts
that (a) the records equal those of plain steps on the same weights, and (b) the parameters
equal bit for bit those of the same scenario without the monitor.
"""

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sgdlens import PhaseMonitor, probes
from sgdlens.lenses import BatchSNR, NoiseScale

STEPS, LOG = 4, 2
PER_SAMPLE_KEYS = ("noise_scale", "grad_noise_tr", "grad_sq_norm", "batch_snr", "gsnr")


class Net(nn.Module):
    def __init__(self, ckpt=False):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.ckpt = ckpt

    def block(self, h):
        return torch.tanh(self.fc2(h))

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        h = checkpoint(self.block, h, use_reentrant=False) if self.ckpt else self.block(h)
        return self.fc3(h)


torch.manual_seed(0)
BASE = Net()
G = torch.Generator().manual_seed(3)
X, Y = torch.randn(STEPS, 12, 6, generator=G), torch.randint(0, 3, (STEPS, 12), generator=G)


def ce(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def plain(model, opt, x, y):
    opt.zero_grad()
    ce(model, (x, y)).backward()


def sam(model, opt, x, y, rho=0.0):
    """Sharpness-aware minimisation: the gradient at w + ρ g/‖g‖ drives the step."""
    opt.zero_grad()
    ce(model, (x, y)).backward()
    with torch.no_grad():
        g = [p.grad.clone() for p in model.parameters()]
        norm = torch.cat([t.flatten() for t in g]).norm()
        eps = [rho * t / (norm + 1e-12) for t in g]
        for p, e in zip(model.parameters(), eps):
            p.add_(e)
    opt.zero_grad()
    ce(model, (x, y)).backward()
    with torch.no_grad():
        for p, e in zip(model.parameters(), eps):
            p.sub_(e)


def penalty(model, opt, x, y, lam=0.0):
    """A gradient penalty on the inputs: an autograd.grad pass with create_graph, then a
    double backward through it."""
    opt.zero_grad()
    x = x.clone().requires_grad_(True)
    loss = ce(model, (x, y))
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    (loss + lam * gx.square().sum()).backward()


def other_tool(model, opt, x, y):
    """Another instrumentation tool (as Cockpit does): its own module hooks in the step's
    passes, then Hessian-vector products through the same graph before step()."""
    seen = []
    hooks = [
        m.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
        for m in (model.fc1, model.fc3)
    ]
    opt.zero_grad()
    loss = ce(model, (x, y))
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, create_graph=True)
    loss.backward(retain_graph=True)
    v = [torch.ones_like(p) for p in params]
    for _ in range(2):  # two HVPs, as a power iteration would
        torch.autograd.grad(grads, params, v, retain_graph=True)
    for h in hooks:
        h.remove()
    assert len(seen) == 2


def backpack_extended(model, opt, x, y):
    """BackPACK in the same step: its module hooks extend the model, its extensions take
    per-sample gradients and variances in the step's own backward, then (as Cockpit's
    curvature quantities do) Hessian-vector products through a second graph."""
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad, Variance

    extend(model)
    loss_fn = extend(nn.CrossEntropyLoss())
    opt.zero_grad()
    with backpack(BatchGrad(), Variance()):
        loss_fn(model(x), y).backward()
    assert model.fc1.weight.grad_batch.shape == (len(x), *model.fc1.weight.shape)
    params = list(model.parameters())
    grads = torch.autograd.grad(ce(model, (x, y)), params, create_graph=True)
    torch.autograd.grad(grads, params, [torch.ones_like(p) for p in params])


def autocast_bf16(model, opt, x, y):
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ce(model, (x, y))
    loss.backward()


def probe_before(model, opt, x, y):
    opt.zero_grad()
    probes.sharpness(model, ce, (X[0][:5], Y[0][:5]), k=1)
    ce(model, (x, y)).backward()


def probe_between(model, opt, x, y):
    plain(model, opt, x, y)
    probes.sharpness(model, ce, (X[0][:5], Y[0][:5]), k=1)
    probes.interpolate(model, copy.deepcopy(BASE), ce, (X[0][:7], Y[0][:7]), steps=3)


def run(scenario, monitored=True, compiled=False, ckpt=False):
    model = copy.deepcopy(BASE)
    model.ckpt = ckpt
    target = torch.compile(model) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    monitor = None
    if monitored:
        monitor = PhaseMonitor(
            opt, model=target, log_every=LOG, lenses=[NoiseScale("per_sample"), BatchSNR()]
        )
    for i in range(STEPS):
        scenario(target, opt, X[i], Y[i])
        opt.step()
        if scenario is probe_between and i == 1:  # and a probe after a step
            probes.sharpness(model, ce, (X[0][:5], Y[0][:5]), k=1)
    params = [p.detach().clone() for p in model.parameters()]
    if monitor is None:
        return params, None
    monitor.close()
    return params, monitor.history.records


def assert_same_records(got, want, rel=1e-12):
    assert len(got) == len(want) == STEPS // LOG
    for g, w in zip(got, want):
        keys = sorted(k for k in w if k.startswith(PER_SAMPLE_KEYS))
        assert len(keys) == 5 + 5 * 3  # whole model and three layers, nothing dropped
        assert sorted(k for k in g if k.startswith(PER_SAMPLE_KEYS)) == keys
        for k in keys:
            assert g[k] == pytest.approx(w[k], rel=rel), k


@pytest.fixture(scope="module")
def reference():
    return run(plain)


@pytest.mark.parametrize(
    "scenario, ckpt",
    [
        (plain, False),
        (plain, True),
        (sam, False),
        (penalty, False),
        (other_tool, False),
        (backpack_extended, False),
        (probe_before, False),
        (probe_between, False),
    ],
    ids=[
        "plain",
        "checkpointing",
        "sam",
        "gradient-penalty",
        "other-tool-hvps",
        "backpack",
        "probe-before-forward",
        "probe-between-and-after",
    ],
)
def test_records_equal_a_plain_step_and_training_is_unchanged(reference, scenario, ckpt):
    params, records = run(scenario, ckpt=ckpt)
    bare, _ = run(scenario, monitored=False, ckpt=ckpt)
    assert all(torch.equal(a, b) for a, b in zip(params, bare))
    assert_same_records(records, reference[1], rel=1e-9)


def test_sam_with_a_perturbation_reads_the_gradient_that_drives_the_step():
    """ρ > 0: the second pass's gradient reaches .grad; the records differ from a plain
    step's (the first pass is not counted on top)."""
    params, records = run(lambda *a: sam(*a, rho=0.05))
    bare, _ = run(lambda *a: sam(*a, rho=0.05), monitored=False)
    assert all(torch.equal(a, b) for a, b in zip(params, bare))
    assert all(r["noise_scale"] == r["noise_scale"] for r in records)


def test_autocast_bfloat16():
    params, records = run(autocast_bf16)
    bare, _ = run(autocast_bf16, monitored=False)
    assert all(torch.equal(a, b) for a, b in zip(params, bare))
    ref = run(plain)[1]
    for got, want in zip(records, ref):  # bfloat16 activations: close to the float32 run
        for k in ("batch_snr", "gsnr", "grad_sq_norm"):
            assert got[k] == pytest.approx(want[k], rel=0.1), k


def test_compiled_model():
    """torch.compile: the hooks run as Python outside the compiled graphs (which split at the
    hooked modules), so the records equal the eager run's to float rounding."""
    torch.compiler.reset()
    bare, _ = run(plain, monitored=False, compiled=True)
    params, records = run(plain, compiled=True)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(params, bare))
    assert_same_records(records, run(plain)[1], rel=1e-4)
    assert [k for k in records[-1] if "_orig_mod" in k] == []  # layers named as in eager
