"""Reference models that export and train at parity (the "parity zoo"); copy them freely.

Each :class:`ZooEntry` has a factory, the shape and dtype of one example (no batch dimension)
and the number of classes: ``export_bundle(entry.factory(), input_shape=entry.input_shape,
input_dtype=entry.input_dtype, num_classes=entry.num_classes, out_dir=...)``. Models are tiny on
purpose: the test suite exports every one of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from model_export.models import DigitsCNN


@dataclass(frozen=True, kw_only=True)
class ZooEntry:
    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int
    input_dtype: str = "float32"
    #: what the model exercises
    covers: str = ""


class MLP(nn.Module):
    def __init__(self, features: int = 12, hidden: int = 16, num_classes: int = 4, p: float = 0.2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Dropout(p), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MobileNetBlock(nn.Module):
    """Stem, depthwise-separable block (depthwise 3x3 + pointwise 1x1, ReLU6), global pooling."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.depthwise = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6()
        )
        self.pointwise = nn.Sequential(nn.Conv2d(8, 12, 1, bias=False), nn.BatchNorm2d(12), nn.Hardswish())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pointwise(self.depthwise(self.stem(x)))
        return self.fc(self.pool(x).flatten(1))


class ResNetBlock(nn.Module):
    """A ResNet basic block with a strided projection shortcut, then average pooling."""

    def __init__(self, channels: int = 4, num_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.shortcut = nn.Sequential(nn.Conv2d(channels, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
        self.relu = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(8 * 2 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))
        return self.fc(self.pool(out).reshape(out.shape[0], -1))


class RecurrentClassifier(nn.Module):
    """Token ids -> Embedding (padding_idx 0) -> GRU/LSTM (batch_first) -> last hidden state -> Linear."""

    def __init__(self, cell: str = "gru", vocab: int = 30, embed: int = 8, hidden: int = 12, num_classes: int = 3):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed, padding_idx=0)
        rnn = nn.GRU if cell == "gru" else nn.LSTM
        self.rnn = rnn(embed, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embedding(tokens))
        return self.fc(out[:, -1])


class TransformerClassifier(nn.Module):
    """Token ids -> Embedding + learned positions -> one TransformerEncoderLayer -> mean pool -> Linear.

    The layer's Dropout modules are exported as seeded dropout; attention-weight dropout cannot be
    seeded, so ``self_attn.dropout`` is 0 (see ``model_export.verify``).
    """

    def __init__(self, vocab: int = 30, length: int = 10, dim: int = 16, num_classes: int = 3) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim, padding_idx=0)
        self.position = nn.Parameter(torch.randn(1, length, dim) * 0.1)
        self.encoder = nn.TransformerEncoderLayer(dim, 2, dim_feedforward=32, dropout=0.1, batch_first=True)
        self.encoder.self_attn.dropout = 0.0
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(self.embedding(tokens) + self.position).mean(dim=1))


class PersonalHead(nn.Module):
    """A shared body and a per-device ``head`` (mark ``head.*`` personal when exporting)."""

    def __init__(self, features: int = 10, num_classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class ConvTransposeNet(nn.Module):
    """Encoder-decoder style: strided Conv2d down, ConvTranspose2d (stride 2, output_padding) up."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.down = nn.Conv2d(2, 6, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1)
        self.grouped_up = nn.ConvTranspose2d(4, 4, 2, stride=1, groups=2)
        self.fc = nn.Linear(4 * 7 * 7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.up(torch.relu(self.down(x))))  # [N, 4, 6, 6]
        return self.fc(torch.tanh(self.grouped_up(x)).flatten(1))


class NormsNet(nn.Module):
    """Conv1d (stride, dilation, groups) + GroupNorm, LayerNorm, BatchNorm1d."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2)
        self.group_norm = nn.GroupNorm(3, 6)
        self.layer_norm = nn.LayerNorm(6 * 6)
        self.fc1 = nn.Linear(36, 12)
        self.batch_norm = nn.BatchNorm1d(12)
        self.fc2 = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.group_norm(self.conv(x)).flatten(1)  # [N, 36]
        return self.fc2(torch.relu(self.batch_norm(self.fc1(self.layer_norm(x)))))


class ActivationsNet(nn.Module):
    """Every supported activation on two branches, joined by concat, with a reshape/permute."""

    def __init__(self, features: int = 10, num_classes: int = 4) -> None:
        super().__init__()
        self.left = nn.Sequential(
            nn.Linear(features, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU6(), nn.Linear(12, 12),
            nn.LeakyReLU(0.1), nn.Linear(12, 12), nn.GELU(), nn.Linear(12, 12), nn.SiLU(),
        )  # fmt: skip
        self.right = nn.Sequential(
            nn.Linear(features, 12), nn.Hardswish(), nn.Linear(12, 12), nn.Sigmoid(),
            nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 12), nn.Softmax(dim=-1),
        )  # fmt: skip
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        joined = torch.cat([self.left(x), self.right(x)], dim=1)  # [N, 24]
        mixed = joined.reshape(-1, 4, 6).permute(0, 2, 1).reshape(-1, 24)
        return self.fc(mixed)


class PoolsNet(nn.Module):
    """Overlapping MaxPool (padding), AvgPool with padding, AdaptiveAvgPool2d to a non-divisor size."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.max_pool = nn.MaxPool2d(3, stride=2, padding=1)  # 12 -> 6
        self.avg_pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)  # 6 -> 6
        self.adaptive = nn.AdaptiveAvgPool2d((4, 4))  # 6 -> 4, overlapping windows
        self.fc = nn.Linear(6 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.adaptive(self.avg_pool(self.max_pool(torch.relu(self.conv(x)))))
        return self.fc(x.flatten(1))


ZOO: tuple[ZooEntry, ...] = (
    ZooEntry(name="mlp", factory=MLP, input_shape=(12,), num_classes=4, covers="Linear, ReLU, Dropout"),
    ZooEntry(
        name="cnn_bn", factory=DigitsCNN, input_shape=(1, 8, 8), num_classes=10, covers="Conv2d, BatchNorm2d, MaxPool"
    ),
    ZooEntry(
        name="mobilenet_block",
        factory=MobileNetBlock,
        input_shape=(3, 8, 8),
        num_classes=5,
        covers="depthwise Conv2d, ReLU6, Hardswish, AdaptiveAvgPool2d(1)",
    ),
    ZooEntry(
        name="resnet_block", factory=ResNetBlock, input_shape=(4, 8, 8), num_classes=3, covers="residual, AvgPool2d"
    ),
    ZooEntry(
        name="gru_text",
        factory=lambda: RecurrentClassifier("gru"),
        input_shape=(9,),
        input_dtype="int64",
        num_classes=3,
        covers="Embedding(padding_idx), GRU",
    ),
    ZooEntry(
        name="lstm_text",
        factory=lambda: RecurrentClassifier("lstm"),
        input_shape=(9,),
        input_dtype="int64",
        num_classes=3,
        covers="Embedding(padding_idx), LSTM",
    ),
    ZooEntry(
        name="transformer",
        factory=TransformerClassifier,
        input_shape=(10,),
        input_dtype="int64",
        num_classes=3,
        covers="TransformerEncoderLayer, multi-head self-attention, LayerNorm, seeded Dropout",
    ),
    ZooEntry(name="personal_head", factory=PersonalHead, input_shape=(10,), num_classes=4, covers="`head` module"),
    ZooEntry(
        name="conv_transpose",
        factory=ConvTransposeNet,
        input_shape=(2, 6, 6),
        num_classes=3,
        covers="ConvTranspose2d (strided, grouped)",
    ),
    ZooEntry(
        name="norms",
        factory=NormsNet,
        input_shape=(4, 11),
        num_classes=3,
        covers="Conv1d, GroupNorm, LayerNorm, BatchNorm1d",
    ),
    ZooEntry(
        name="activations",
        factory=ActivationsNet,
        input_shape=(10,),
        num_classes=4,
        covers="ReLU6, LeakyReLU, GELU, SiLU, Hardswish, Sigmoid, Tanh, Softmax, concat, permute",
    ),
    ZooEntry(
        name="pools", factory=PoolsNet, input_shape=(3, 12, 12), num_classes=3, covers="MaxPool, AvgPool, adaptive"
    ),
)


def zoo_entry(name: str) -> ZooEntry:
    for entry in ZOO:
        if entry.name == name:
            return entry
    raise KeyError(name)
