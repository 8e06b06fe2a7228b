"""Export-time safety: unsupported layers, failed conversions and divergent graphs are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import model_export.decompositions as decompositions
import model_export.exporter as exporter
from edge_agent.errors import ExportError
from model_export import export_bundle
from model_export.verify import prepare_for_export


class Encoder(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class Net(nn.Module):
    def __init__(self, act: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = Encoder(act or nn.ReLU())
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class Pooled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(2 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(self.conv(x))
        return self.fc(pooled.flatten(1))


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (nn.RReLU(), r"module 'encoder.act' \(nn.RReLU\(lower=.*\)\) is not supported: its random"),
        (nn.Dropout2d(0.2), r"module 'encoder.act' \(nn.Dropout2d\(p=0.2.*\)\) is not supported"),
        (nn.MultiheadAttention(6, 2, dropout=0.1), r"module 'encoder.act' \(nn.MultiheadAttention.*dropout=0.0"),
    ],
)
def test_unsupported_layer_is_named(layer: nn.Module, message: str) -> None:
    with pytest.raises(ExportError, match=message):
        prepare_for_export(Net(layer))


def test_unsupported_layer_fails_export_before_tracing(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"module 'encoder.act' \(nn.RReLU"):
        export_bundle(Net(nn.RReLU()), input_shape=(6,), num_classes=3, out_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_rnn_with_relu_is_named() -> None:
    model = nn.Sequential(nn.RNN(4, 4, nonlinearity="relu", batch_first=True))
    with pytest.raises(ExportError, match=r"module '0' \(nn.RNN\(4, 4.*nonlinearity='tanh'"):
        prepare_for_export(model)


def test_missing_lowering_names_op_and_source_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def without_avg_pool_backward() -> decompositions.DecompositionTable:
        table = decompositions.training_decompositions()
        del table[torch.ops.aten.avg_pool2d_backward.default]
        return table

    monkeypatch.setattr(exporter, "training_decompositions", without_avg_pool_backward)
    with pytest.raises(ExportError) as info:
        export_bundle(Pooled(), input_shape=(1, 4, 4), num_classes=3, out_dir=tmp_path)
    message = str(info.value)
    assert "aten op 'avg_pool2d_backward'" in message, message
    assert "test_verify.py" in message and "self.pool(self.conv(x))" in message, message
    assert "Traceback" not in message and len(message) < 1000


def test_divergent_graph_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def wrong_relu_backward(grad: torch.Tensor, inp: torch.Tensor, threshold: float) -> torch.Tensor:
        return grad * (inp > threshold).to(grad.dtype) * 0.5  # a decomposition bug: half the gradient

    monkeypatch.setattr(decompositions, "threshold_backward", wrong_relu_backward)
    with pytest.raises(ExportError, match=r"new\.encoder\.fc\.weight differs: max abs err \S+ > \S+"):
        export_bundle(Net(), input_shape=(6,), num_classes=3, out_dir=tmp_path)
    assert not (tmp_path / "manifest.json").exists() and not (tmp_path / "train_step.onnx").exists()
