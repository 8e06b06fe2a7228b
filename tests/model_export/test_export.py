"""End-to-end tests of the exported bundle, run with plain onnxruntime (no fedflock runtime)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edge_agent.errors import ConfigError, ExportError, IntegrityError
from edge_agent.protocol.manifest import Manifest, load_manifest
from edge_agent.protocol.tensors import read_tensor_file
from model_export import DigitsCNN, export_bundle, load_factory

LR = 0.05
MOMENTUM = 0.9
TOL = 1e-5

State = dict[str, np.ndarray]


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(1234)
    return DigitsCNN()


@pytest.fixture(scope="module")
def bundle(model: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle")
    return export_bundle(
        model, input_shape=(1, 8, 8), num_classes=10, out_dir=out, lr=LR, momentum=MOMENTUM, name="digits"
    )


@pytest.fixture(scope="module")
def manifest(bundle: Path) -> Manifest:
    return load_manifest(bundle)[0]


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def train_session(bundle: Path) -> ort.InferenceSession:
    return _session(bundle / "train_step.onnx")


@pytest.fixture(scope="module")
def inference_session(bundle: Path) -> ort.InferenceSession:
    return _session(bundle / "inference.onnx")


def _initial_state(bundle: Path, manifest: Manifest) -> State:
    state = read_tensor_file(bundle / manifest.weights_file)
    for spec in manifest.tensors_with_role("optimizer_state"):
        state[spec.name] = np.zeros(spec.shape, dtype=spec.dtype)
    return state


def _ort_step(
    session: ort.InferenceSession, manifest: Manifest, state: State, x: np.ndarray, y: np.ndarray
) -> tuple[float, int, State]:
    graph = manifest.graphs["train_step"]
    fixed = {"x": x, "y": y, "lr": np.array(LR, np.float32), "step": np.array(1, np.float32), "seed": np.array(0)}
    feeds = {onnx: fixed[name] for name, onnx in graph.inputs.items()}
    feeds |= {graph.tensor_inputs[name]: value for name, value in state.items()}
    feeds |= {onnx: np.array(0.0, np.float32) for onnx in graph.hyper_inputs.values()}  # label_smoothing
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, feeds), strict=True))
    new_state = {name: outputs[onnx_name] for name, onnx_name in graph.tensor_outputs.items()}
    return float(outputs[graph.outputs["loss"]]), int(outputs[graph.outputs["correct"]]), new_state


def _batch(seed: int, n: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 8, 8), dtype=np.float32), rng.integers(0, 10, n, dtype=np.int64)


def test_manifest_describes_bundle(bundle: Path, manifest: Manifest, model: nn.Module) -> None:
    params = [t.name for t in manifest.tensors_with_role("parameter")]
    buffers = [t.name for t in manifest.tensors_with_role("buffer")]
    momentum = manifest.tensors_with_role("optimizer_state")
    assert params == [name for name, _ in model.named_parameters()]
    assert buffers == ["bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var"]
    assert [t.name for t in momentum] == [f"{p}.momentum" for p in params]
    assert all(t.of == t.name.removesuffix(".momentum") and not t.aggregate for t in momentum)
    assert manifest.input.shape == (None, 1, 8, 8) and manifest.label.shape == (None,)
    assert manifest.optimizer == {
        "type": "sgd",
        "lr": LR,
        "momentum": MOMENTUM,
        "weight_decay": 0.0,
        "nesterov": False,
    }
    assert manifest.format_version == 2 and manifest.task == "classification" and manifest.accuracy_defined
    weights = read_tensor_file(bundle / "weights.fft")
    assert list(weights) == params + buffers  # no num_batches_tracked, no optimizer state
    state = model.state_dict()
    for name, value in weights.items():
        np.testing.assert_array_equal(value, state[name].numpy())


def test_train_steps_match_torch_sgd(
    bundle: Path, manifest: Manifest, train_session: ort.InferenceSession, model: nn.Module
) -> None:
    reference = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(reference.parameters(), lr=LR, momentum=MOMENTUM)
    state = _initial_state(bundle, manifest)
    for step in range(2):  # the second step has non-zero momentum buffers
        x, y = _batch(step)
        loss, correct, state = _ort_step(train_session, manifest, state, x, y)

        optimizer.zero_grad()
        logits = reference(torch.from_numpy(x))
        torch_loss = F.cross_entropy(logits, torch.from_numpy(y))
        torch_loss.backward()
        optimizer.step()

        assert loss == pytest.approx(torch_loss.item(), abs=TOL)
        assert correct == int((logits.argmax(1) == torch.from_numpy(y)).sum())
        expected = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
        for name, param in reference.named_parameters():
            expected[f"{name}.momentum"] = optimizer.state[param]["momentum_buffer"].numpy()
        for name, value in state.items():
            np.testing.assert_allclose(value, expected[name], rtol=0, atol=TOL, err_msg=f"step {step}: {name}")


def test_running_stats_change(bundle: Path, manifest: Manifest, train_session: ort.InferenceSession) -> None:
    before = _initial_state(bundle, manifest)
    _, _, after = _ort_step(train_session, manifest, before, *_batch(7))
    for name in ("bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var"):
        assert not np.allclose(before[name], after[name]), name


def test_loss_decreases_on_fixed_batch(bundle: Path, manifest: Manifest, train_session: ort.InferenceSession) -> None:
    state = _initial_state(bundle, manifest)
    x, y = _batch(42)
    losses = []
    for _ in range(20):
        loss, _, state = _ort_step(train_session, manifest, state, x, y)
        losses.append(loss)
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("batch", [5, 32])
def test_dynamic_batch(
    bundle: Path,
    manifest: Manifest,
    train_session: ort.InferenceSession,
    inference_session: ort.InferenceSession,
    batch: int,
) -> None:
    x, y = _batch(batch, n=batch)
    state = _initial_state(bundle, manifest)
    loss, correct, new_state = _ort_step(train_session, manifest, state, x, y)
    assert np.isfinite(loss) and 0 <= correct <= batch
    assert {k: v.shape for k, v in new_state.items()} == {k: v.shape for k, v in state.items()}
    feeds = {"x": x} | {name: state[name] for name in manifest.graphs["inference"].tensor_inputs}
    (logits,) = inference_session.run(None, feeds)
    assert logits.shape == (batch, 10)


def test_train_graph_is_plain_onnx(bundle: Path) -> None:
    graph = onnx.load(str(bundle / "train_step.onnx"))
    assert {node.domain for node in graph.graph.node} <= {"", "ai.onnx"}
    assert not graph.functions
    assert "BatchNormalization" not in {node.op_type for node in graph.graph.node}
    assert [i.name for i in graph.graph.input][:5] == ["x", "y", "seed", "lr", "step"]
    assert [o.name for o in graph.graph.output][:2] == ["loss", "correct"]
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value


def test_inference_matches_eval_mode(
    bundle: Path, manifest: Manifest, inference_session: ort.InferenceSession, model: nn.Module
) -> None:
    # Use non-trivial running stats so eval-mode BatchNorm is really exercised.
    trained = copy.deepcopy(model).train()
    with torch.no_grad():
        for seed in range(3):
            trained(torch.from_numpy(_batch(seed)[0]) * 2 + 1)
    trained.eval()
    x, _ = _batch(99)
    state = {k: v.numpy() for k, v in trained.state_dict().items()}
    graph = manifest.graphs["inference"]
    feeds = {graph.inputs["x"]: x} | {onnx_name: state[name] for name, onnx_name in graph.tensor_inputs.items()}
    (logits,) = inference_session.run(None, feeds)
    with torch.no_grad():
        expected = trained(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=0, atol=TOL)


def test_tampered_file_fails_integrity(bundle: Path, tmp_path: Path) -> None:
    copy_dir = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    load_manifest(copy_dir)  # intact copy verifies
    target = copy_dir / "train_step.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"train_step\.onnx"):
        load_manifest(copy_dir)


def test_missing_file_fails_integrity(bundle: Path, tmp_path: Path) -> None:
    copy_dir = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    (copy_dir / "weights.fft").unlink()
    with pytest.raises(IntegrityError, match=r"weights\.fft"):
        load_manifest(copy_dir)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss": "hinge"}, "unsupported loss 'hinge'"),
        ({"optimizer": "rmsprop"}, "unsupported optimizer 'rmsprop'"),
        ({"momentum": 0.0, "nesterov": True}, "nesterov"),
    ],
)
def test_unsupported_configuration(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ExportError, match=message):
        export_bundle(DigitsCNN(), input_shape=(1, 8, 8), num_classes=10, out_dir=tmp_path, **kwargs)  # type: ignore[arg-type]


def test_cumulative_batchnorm_is_rejected(tmp_path: Path) -> None:
    model = DigitsCNN()
    model.bn2.momentum = None
    with pytest.raises(ExportError, match="bn2"):
        export_bundle(model, input_shape=(1, 8, 8), num_classes=10, out_dir=tmp_path)


def test_wrong_input_shape_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="input_shape"):
        export_bundle(DigitsCNN(), input_shape=(1, 8, 8), num_classes=7, out_dir=tmp_path)


def test_load_factory() -> None:
    factory = load_factory("model_export.models:digits_cnn")
    assert isinstance(factory(num_classes=3), DigitsCNN)
    with pytest.raises(ConfigError):
        load_factory("model_export.models")
    with pytest.raises(ConfigError):
        load_factory("model_export.models:nope")


def test_signer_signs_the_exact_manifest_bytes(tmp_path: Path) -> None:
    import hashlib

    from model_export.exporter import SIGNATURE_FILE

    seen: list[bytes] = []

    def signer(data: bytes) -> bytes:
        seen.append(data)
        return b"sig:" + hashlib.sha256(data).digest()

    out = export_bundle(
        nn.Sequential(nn.Linear(3, 2)), input_shape=(3,), num_classes=2, out_dir=tmp_path / "b", signer=signer
    )
    manifest_bytes = (out / "manifest.json").read_bytes()
    assert seen == [manifest_bytes]
    assert (out / SIGNATURE_FILE).read_bytes() == b"sig:" + hashlib.sha256(manifest_bytes).digest()
    load_manifest(out)  # an extra signature file does not disturb verification
