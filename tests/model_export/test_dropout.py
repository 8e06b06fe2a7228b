"""Seeded dropout: deterministic from the seed, identical in eager PyTorch and onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from model_export.dropout import SeededDropout, keep_mask, replace_dropout, salt_for
from model_export.rng import seed_scope


def test_mask_is_a_function_of_seed_and_salt() -> None:
    x = torch.ones(64, 50)
    a = keep_mask(torch.tensor(3), x, 11, 0.3)
    assert torch.equal(a, keep_mask(torch.tensor(3), x, 11, 0.3))
    assert not torch.equal(a, keep_mask(torch.tensor(4), x, 11, 0.3))
    assert not torch.equal(a, keep_mask(torch.tensor(3), x, 12, 0.3))
    assert abs(a.float().mean().item() - 0.7) < 0.02


def test_identity_without_seed_or_in_eval() -> None:
    layer = SeededDropout(0.5, salt=1).train()
    x = torch.randn(4, 8)
    assert torch.equal(layer(x), x)  # no train step around it
    with seed_scope(torch.tensor(1)):
        dropped = layer(x)
        assert torch.equal(layer.eval()(x), x)
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], x[kept] * 2.0)


def test_replace_dropout_uses_module_paths() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.25), nn.Sequential(nn.Dropout(0.5)))
    assert replace_dropout(model) == ["1", "2.0"]
    assert isinstance(model[1], SeededDropout) and model[1].p == 0.25 and model[1].salt == salt_for("1")
    assert isinstance(model[2][0], SeededDropout) and model[2][0].salt != model[1].salt


def test_onnx_reproduces_the_mask_bit_for_bit(tmp_path: Path) -> None:
    layer = SeededDropout(0.3, salt=salt_for("block.drop")).train()

    def step(seed: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor]:
        with seed_scope(seed):
            return (layer(x),)

    graph = make_fx(step, tracing_mode="symbolic")(torch.tensor(0), torch.ones(3, 7, 5))

    class Wrapper(nn.Module):
        def forward(self, *args: torch.Tensor) -> object:
            return graph(*args)

    path = tmp_path / "dropout.onnx"
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        Wrapper(), (torch.tensor(0), torch.ones(3, 7, 5)), str(path), dynamo=True,
        input_names=["seed", "x"], dynamic_shapes=((None, {0: batch}),), opset_version=18, verbose=False,
    )  # fmt: skip
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert not {op for op in ops if op.startswith("Random")} and "Div" not in ops, ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for seed, n in [(0, 1), (1, 3), (-5, 4), (2**62, 2), (12345, 9)]:
        x = np.random.default_rng(seed % 97).standard_normal((n, 7, 5)).astype(np.float32)
        (actual,) = session.run(None, {"seed": np.array(seed, dtype=np.int64), "x": x})
        (expected,) = step(torch.tensor(seed, dtype=torch.int64), torch.from_numpy(x))
        np.testing.assert_array_equal(actual, expected.numpy(), err_msg=f"seed {seed}")


def test_probability_one_is_rejected() -> None:
    with pytest.raises(ValueError, match="probability"):
        SeededDropout(1.0, salt=0)
