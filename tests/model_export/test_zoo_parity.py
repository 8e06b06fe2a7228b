"""The parity zoo: one onnxruntime step equals one PyTorch step, and training lowers the loss.

Every model of ``model_export.zoo`` is exported once per optimizer (module-scoped cache) and run
with plain onnxruntime. The PyTorch reference is the same model with the same seeded dropout
(``replace_dropout`` + ``seed_scope`` with the step's seed) trained by ``torch.optim``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edge_agent.protocol.manifest import Manifest, load_manifest
from edge_agent.protocol.tensors import read_tensor_file
from model_export import export_bundle
from model_export.dropout import replace_dropout
from model_export.rng import seed_scope
from model_export.verify import NOISE_GRADIENT
from model_export.zoo import ZOO, ZooEntry, zoo_entry

RTOL = 1e-5
BATCH = 16
SEED = 7
OPTIMIZERS = {"sgd": {"lr": 0.05, "momentum": 0.9}, "adam": {"lr": 0.01}}
#: Adam runs on the models the issue names; SGD on the whole zoo (keeps the suite fast).
ADAM_MODELS = ("mlp", "cnn_bn", "mobilenet_block", "resnet_block", "gru_text", "transformer", "personal_head")
CASES = [(e.name, "sgd") for e in ZOO] + [(name, "adam") for name in ADAM_MODELS]

State = dict[str, np.ndarray]


class Exported:
    def __init__(self, entry: ZooEntry, optimizer: str, out: Path) -> None:
        torch.manual_seed(0)
        self.entry, self.optimizer = entry, optimizer
        self.model = entry.factory()
        self.bundle = export_bundle(
            self.model,
            input_shape=entry.input_shape,
            input_dtype=entry.input_dtype,
            num_classes=entry.num_classes,
            out_dir=out,
            optimizer=optimizer,
            **OPTIMIZERS[optimizer],  # type: ignore[arg-type]
        )
        self.manifest: Manifest = load_manifest(self.bundle)[0]
        graph = self.manifest.graphs["train_step"]
        self.graph = graph
        self.session = ort.InferenceSession(str(self.bundle / graph.file), providers=["CPUExecutionProvider"])

    def initial_state(self) -> State:
        state = read_tensor_file(self.bundle / self.manifest.weights_file)
        for spec in self.manifest.tensors_with_role("optimizer_state"):
            state[spec.name] = np.zeros(spec.shape, dtype=spec.dtype)
        return state

    def step(self, state: State, x: np.ndarray, y: np.ndarray, step: int) -> tuple[float, State]:
        graph = self.graph
        values = {"x": x, "y": y, "seed": np.array(SEED + step, dtype=np.int64)}
        values |= {"lr": np.array(OPTIMIZERS[self.optimizer]["lr"], dtype=np.float32)}
        values |= {"step": np.array(step + 1, dtype=np.float32)}
        feeds = {onnx: values[logical] for logical, onnx in graph.inputs.items()}
        hyper = {h.name: h for h in self.manifest.hyperparameters}
        for name, onnx in graph.hyper_inputs.items():
            spec = hyper[name]
            feeds[onnx] = np.array(spec.default, dtype=spec.dtype).reshape(spec.shape)
        feeds |= {graph.tensor_inputs[name]: value for name, value in state.items()}
        names = [o.name for o in self.session.get_outputs()]
        outputs = dict(zip(names, self.session.run(None, feeds), strict=True))
        new_state = {name: outputs[onnx] for name, onnx in graph.tensor_outputs.items()}
        return float(outputs[graph.outputs["loss"]]), new_state


_CACHE: dict[tuple[str, str], Exported] = {}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> object:
    def get(name: str, optimizer: str) -> Exported:
        key = (name, optimizer)
        if key not in _CACHE:
            _CACHE[key] = Exported(zoo_entry(name), optimizer, tmp_path_factory.mktemp(f"{name}-{optimizer}"))
        return _CACHE[key]

    yield get
    _CACHE.clear()


def _batch(entry: ZooEntry, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (BATCH, *entry.input_shape)
    if entry.input_dtype == "int64":
        x = rng.integers(0, 30, shape, dtype=np.int64)
        x[:, :2] = 0  # padding tokens: their embedding row must get no gradient
    else:
        x = rng.standard_normal(shape, dtype=np.float32)
    return x, rng.integers(0, entry.num_classes, BATCH, dtype=np.int64)


def _torch_optimizer(model: nn.Module, optimizer: str) -> torch.optim.Optimizer:
    if optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), **OPTIMIZERS["sgd"])
    return torch.optim.Adam(model.parameters(), **OPTIMIZERS["adam"])


_STATE_KEYS = {"momentum": "momentum_buffer", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}


@pytest.mark.parametrize(("name", "optimizer"), CASES)
def test_one_step_matches_torch(exported: object, name: str, optimizer: str) -> None:
    case: Exported = exported(name, optimizer)  # type: ignore[operator]
    reference = copy.deepcopy(case.model).train()
    replace_dropout(reference)  # same salts: same paths as the exported copy
    opt = _torch_optimizer(reference, optimizer)
    state = case.initial_state()
    # SGD: two steps, the second from non-zero momentum. Adam: one step, because the noise-gradient
    # elements skipped below feed into the next step's activations (e.g. BatchNorm running stats).
    for step in range(2 if optimizer == "sgd" else 1):
        x, y = _batch(case.entry, step)
        loss, state = case.step(state, x, y, step)
        opt.zero_grad()
        with seed_scope(torch.tensor(SEED + step, dtype=torch.int64)):
            logits = reference(torch.from_numpy(x))
        torch_loss = F.cross_entropy(logits, torch.from_numpy(y))
        torch_loss.backward()
        opt.step()
        assert loss == pytest.approx(torch_loss.item(), rel=RTOL, abs=1e-6), f"step {step}"
        expected = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
        for pname, param in reference.named_parameters():
            for suffix, key in _STATE_KEYS.items():
                if key in opt.state[param]:
                    expected[f"{pname}.{suffix}"] = opt.state[param][key].numpy()
        assert set(state) <= set(expected), set(state) - set(expected)
        for tname, value in state.items():
            want = expected[tname]
            if optimizer == "adam" and f"{tname}.exp_avg" in expected:
                # Adam's step on a pure-noise gradient (conv bias before BN, attention key bias) is
                # not reproducible (see verify._noise_mask); exp_avg itself is compared
                real = np.abs(expected[f"{tname}.exp_avg"]) >= NOISE_GRADIENT
                value, want = value[real], want[real]
            # relative to the tensor's scale; 1e-6 floors float32 noise on ~0 values (conv bias before BN)
            atol = max(RTOL * float(np.abs(want).max(initial=0.0)), 1e-6)
            np.testing.assert_allclose(value, want, rtol=RTOL, atol=atol, err_msg=f"step {step}: {tname}")


@pytest.mark.parametrize(("name", "optimizer"), CASES)
def test_training_lowers_loss(exported: object, name: str, optimizer: str) -> None:
    case: Exported = exported(name, optimizer)  # type: ignore[operator]
    state = case.initial_state()
    x, y = _batch(case.entry, 42)
    losses = []
    for step in range(15):
        loss, state = case.step(state, x, y, step)
        losses.append(loss)
    assert all(np.isfinite(losses)), losses
    assert np.mean(losses[-3:]) < 0.98 * np.mean(losses[:3]), losses
