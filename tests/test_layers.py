"""PhaseMonitor(layers=...): how parameters group into the per-layer keys of a record."""

import warnings

import pytest
import torch
from torch import nn

from sgdlens import Layers, PhaseMonitor
from sgdlens.layers import AUTO_MODULES, group_names


def _gpt2(n_layer=12):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(
        n_layer=n_layer,
        n_embd=32,
        n_head=2,
        vocab_size=64,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def _train_gpt2(model, steps=4, **kwargs):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = PhaseMonitor(opt, model=model, log_every=2, **kwargs)
    x = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        opt.zero_grad()
        out = model(x, labels=x)
        out.loss.backward()
        monitor.observe(loss=out.loss)
        opt.step()
    monitor.close()
    return monitor


def test_gpt2_default_record_is_bounded_and_per_block():
    model = _gpt2()
    assert len(list(model.parameters())) == 148
    monitor = _train_gpt2(model)
    record = monitor.history.records[-1]
    assert len(record) <= 120, len(record)
    blocks = [f"transformer.h.{i}" for i in range(12)]
    assert list(monitor.view.layers) == ["transformer", *blocks]
    for name in ["transformer", *blocks]:
        for metric in ("grad_snr", "grad_norm", "weight_norm", "update_ratio", "phase"):
            assert f"{metric}/{name}" in record, (metric, name)


def test_gpt2_per_tensor_detail_is_one_argument_away():
    monitor = _train_gpt2(_gpt2(n_layer=2), layers="params")
    record = monitor.history.records[-1]
    assert len(monitor.view.layers) == 2 * 12 + 4
    assert "grad_snr/transformer.h.1.mlp.c_fc.weight" in record
    assert "grad_snr/transformer.wte.weight" in record


def test_block_sums_equal_the_sums_of_their_modules():
    """A block's squared gradient norm is the sum over the modules in it (same run twice)."""
    by_module = _train_gpt2(_gpt2(n_layer=2), layers="modules").history.records[-1]
    by_block = _train_gpt2(_gpt2(n_layer=2), layers="blocks").history.records[-1]
    for block in ("transformer.h.0", "transformer.h.1"):
        parts = [k for k in by_module if k.startswith(f"grad_norm/{block}.")]
        assert len(parts) == 6
        want = sum(by_module[k] ** 2 for k in parts) ** 0.5
        assert by_block[f"grad_norm/{block}"] == pytest.approx(want, rel=1e-12)
    assert by_block["grad_norm"] == pytest.approx(by_module["grad_norm"], rel=1e-12)


def _resnet_like():
    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, padding=1)
            self.bn = nn.BatchNorm2d(c)

        def forward(self, x):
            return x + self.bn(self.conv(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3)
            self.layer1 = nn.Sequential(Block(4), Block(4))
            self.layer2 = nn.Sequential(Block(4), Block(4), Block(4))
            self.fc = nn.Linear(4, 2)

    return Net()


def test_blocks_of_a_resnet_shaped_model():
    net = _resnet_like()
    names = group_names(net, list(net.parameters()), "blocks")
    assert list(dict.fromkeys(names)) == [
        "conv1",
        "layer1.0",
        "layer1.1",
        "layer2.0",
        "layer2.1",
        "layer2.2",
        "fc",
    ]
    modules = group_names(net, list(net.parameters()), "modules")
    assert len(set(modules)) == 12 and "layer2.1.bn" in modules
    assert group_names(net, list(net.parameters()), "auto") == modules  # 12 <= AUTO_MODULES


def test_auto_keeps_modules_for_small_models():
    net = nn.Sequential(*[nn.Linear(4, 4) for _ in range(AUTO_MODULES)])
    assert group_names(net, list(net.parameters())) == [str(i) for i in range(16) for _ in "wb"]


def test_a_function_and_patterns():
    net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 4), nn.Linear(4, 1))
    params = list(net.parameters())
    assert group_names(net, params, lambda n: n.split(".")[1]) == ["weight", "bias"] * 3
    assert group_names(net, params, Layers("modules", exclude=["2.*"])) == [
        "0",
        "0",
        None,
        None,
        "3",
        "3",
    ]
    assert group_names(net, params, Layers("params", include=["*.weight"])) == [
        "0.weight",
        None,
        "2.weight",
        None,
        "3.weight",
        None,
    ]


def test_excluded_parameters_still_count_in_the_whole_model_keys():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    monitor = PhaseMonitor(opt, model=net, log_every=1, layers=Layers(exclude=["2.*"]))
    opt.zero_grad()
    net(torch.randn(5, 2)).sum().backward()
    want = torch.cat([p.grad.double().flatten() for p in net.parameters()]).norm().item()
    opt.step()
    record = monitor.history.records[-1]
    assert "grad_norm/0" in record and not any(k.endswith("/2") for k in record)
    assert not any(k.endswith("/") for k in record)
    assert record["grad_norm"] == pytest.approx(want, rel=1e-6)  # float32 norms
    monitor.close()


@pytest.mark.parametrize(
    "layers, error, match",
    [
        ("block", ValueError, r"layers='block'.*'blocks'"),
        (3, TypeError, "layers=..."),
        (Layers(include="fc*"), TypeError, "include="),
    ],
)
def test_bad_groupings_are_refused_at_construction(layers, error, match):
    net = nn.Linear(2, 1)
    with pytest.raises(error, match=match):
        PhaseMonitor(torch.optim.SGD(net.parameters(), lr=0.1), model=net, layers=layers)


def test_a_pattern_that_matches_nothing_warns_with_its_name():
    net = nn.Linear(2, 1)
    with pytest.warns(UserWarning, match=r"\['trnsformer\.\*'\] match no parameter"):
        PhaseMonitor(
            torch.optim.SGD(net.parameters(), lr=0.1),
            model=net,
            layers=Layers(exclude=["trnsformer.*"]),
        )


def test_a_grouping_function_returning_no_string_is_refused():
    net = nn.Linear(2, 1)
    with pytest.raises(TypeError, match="returned 3"), warnings.catch_warnings():
        PhaseMonitor(torch.optim.SGD(net.parameters(), lr=0.1), model=net, layers=lambda n: 3)
