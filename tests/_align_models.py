"""Small networks of every architecture that alignment supports (tests/test_align.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

D = torch.float64


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 12, 3, padding=1)
        self.b2 = nn.BatchNorm2d(12)
        self.fc1 = nn.Linear(12 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        x = F.max_pool2d(F.relu(self.b2(self.c2(x))), 2)
        x = x.view(x.size(0), -1)
        return self.fc2(F.relu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.short(x))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.layers = nn.Sequential(
            Block(8, 8, 1), Block(8, 8, 1), Block(8, 16, 2), Block(16, 16, 1)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.pool(self.layers(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


class MyBlock(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, h, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    def __init__(self, own=False, vocab=11, d=16, h=4, T=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(T, d) * 0.1)
        if own:
            self.blocks = nn.Sequential(MyBlock(d, h), MyBlock(d, h))
        else:
            self.blocks = nn.Sequential(
                *[
                    nn.TransformerEncoderLayer(d, h, 32, dropout=0.0, batch_first=True)
                    for _ in range(2)
                ]
            )
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, tok):
        x = self.emb(tok) + self.pos
        x = self.ln(self.blocks(x))
        return self.head(x.mean(dim=1))


def mlp():
    return nn.Sequential(
        nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )


class Depthwise(nn.Module):
    """A separable conv net with GroupNorm and a residual 1x1 block (MobileNet-like)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.gn = nn.GroupNorm(1, 8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.silu(self.stem(x))
        x = x + self.pw(F.silu(self.gn(self.dw(x))))
        return self.head(x.mean(dim=(2, 3)))


class Tied(nn.Module):
    """A square weight used twice (tied), a frozen per-unit scale, BatchNorm1d, dropout, a sum
    over the units at the end, and an unused layer."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(4, 6, bias=False)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.3)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 4, bias=False)  # never called
        self.dec = nn.Linear(6, 6)
        self.dec.weight = self.mid.weight
        self.frozen = nn.Parameter(torch.rand(6) + 0.5, requires_grad=False)

    def forward(self, x):
        h = self.drop(torch.relu(self.bn(self.emb(x))))
        h = torch.tanh(self.mid(h)) * self.frozen
        return self.dec(h).sum(-1)


ARCHS = {
    "tied": (Tied, lambda g: torch.randn(10, 4, generator=g, dtype=D)),
    "mlp": (mlp, lambda g: torch.randn(10, 4, generator=g, dtype=D)),
    "cnn_bn": (CNN, lambda g: torch.randn(6, 3, 16, 16, generator=g, dtype=D)),
    "depthwise": (Depthwise, lambda g: torch.randn(6, 3, 8, 8, generator=g, dtype=D)),
    "resnet": (ResNet, lambda g: torch.randn(6, 3, 8, 8, generator=g, dtype=D)),
    "transformer": (
        lambda: Transformer(False),
        lambda g: torch.randint(0, 11, (5, 6), generator=g),
    ),
    "own_block": (lambda: Transformer(True), lambda g: torch.randint(0, 11, (5, 6), generator=g)),
}
