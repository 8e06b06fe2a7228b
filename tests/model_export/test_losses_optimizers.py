"""Every loss and every optimizer: onnxruntime steps == PyTorch steps (torch.optim, direct formulas).

Each exported bundle pairs one loss with one optimizer, so 8 MLP bundles cover all 8 losses and
all optimizer variants, and 3 digits-CNN bundles repeat the check through convolutions and
BatchNorm. Three steps with the ``step`` input at 1, 2, 3 check Adam's bias correction and the
momentum buffers; parameters and optimizer state must agree within 1e-5 relative.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edge_agent.errors import ExportError
from edge_agent.protocol.manifest import Manifest, load_manifest
from edge_agent.protocol.tensors import read_tensor_file
from edge_agent.runtime.feeds import GraphRunner, resolve_hyperparameters
from model_export import DigitsCNN, export_bundle
from model_export.federated import FederatedSpec
from model_export.losses import LossSpec
from model_export.optimizers import OptimizerSpec

RTOL, ATOL = 1e-5, 1e-6
LR = 0.05
TorchLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def user_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A user-supplied loss (also reachable as ``tests.model_export.test_losses_optimizers:user_loss``)."""
    return F.cross_entropy(logits, y) + 0.01 * (logits**2).mean()


def _focal_softmax(alpha: list[float], gamma: float) -> TorchLoss:
    def loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p_t = torch.softmax(z, dim=1)[torch.arange(len(y)), y]
        return (-torch.tensor(alpha)[y] * (1 - p_t) ** gamma * torch.log(p_t)).mean()

    return loss


def _focal_sigmoid(alpha: float, gamma: float) -> TorchLoss:
    def loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(z)
        positive = -alpha * y * (1 - p) ** gamma * torch.log(p)
        negative = -(1 - alpha) * (1 - y) * p**gamma * torch.log(1 - p)
        return (positive + negative).mean()

    return loss


@dataclass(frozen=True)
class Case:
    id: str
    loss: LossSpec
    optimizer: OptimizerSpec
    reference: TorchLoss
    label: str  # "class", "binary", "real"


CASES = {
    "ce_weighted_smoothed-sgd": Case(
        "ce",
        LossSpec(kind="cross_entropy", class_weights=(1.0, 5.0, 0.5, 2.0), label_smoothing=0.1),
        OptimizerSpec(kind="sgd", lr=LR),
        lambda z, y: F.cross_entropy(z, y, weight=torch.tensor([1.0, 5.0, 0.5, 2.0]), label_smoothing=0.1),
        "class",
    ),
    "focal_softmax-sgd_momentum_wd": Case(
        "focal",
        LossSpec(kind="focal", focal_alpha=(0.25, 1.0, 2.0, 0.5), focal_gamma=2.0),
        OptimizerSpec(kind="sgd", lr=LR, momentum=0.9, weight_decay=0.01),
        _focal_softmax([0.25, 1.0, 2.0, 0.5], 2.0),
        "class",
    ),
    "focal_sigmoid-sgd_nesterov": Case(
        "focal_binary",
        LossSpec(kind="focal", binary=True, focal_alpha=0.9, focal_gamma=1.5),
        OptimizerSpec(kind="sgd", lr=LR, momentum=0.8, nesterov=True),
        _focal_sigmoid(0.9, 1.5),
        "binary",
    ),
    "bce_pos_weight-adam_wd": Case(
        "bce",
        LossSpec(kind="bce", pos_weight=(3.0, 1.0, 0.5, 10.0)),
        OptimizerSpec(kind="adam", lr=0.01, weight_decay=0.01),
        lambda z, y: F.binary_cross_entropy_with_logits(z, y, pos_weight=torch.tensor([3.0, 1.0, 0.5, 10.0])),
        "binary",
    ),
    "mse-adamw": Case(
        "mse",
        LossSpec(kind="mse"),
        OptimizerSpec(kind="adamw", lr=0.01, weight_decay=0.05, betas=(0.8, 0.99)),
        F.mse_loss,
        "real",
    ),
    "l1-adam": Case("l1", LossSpec(kind="l1"), OptimizerSpec(kind="adam", lr=0.01), F.l1_loss, "real"),
    "huber-sgd_momentum": Case(
        "huber",
        LossSpec(kind="huber", huber_delta=0.5),
        OptimizerSpec(kind="sgd", lr=LR, momentum=0.9),
        lambda z, y: F.huber_loss(z, y, delta=0.5),
        "real",
    ),
    "user-adamw": Case(
        "user", LossSpec(kind="custom", fn=user_loss), OptimizerSpec(kind="adamw", lr=0.01), user_loss, "class"
    ),
}
# Adam/AdamW are left out on the CNN: its conv biases sit before BatchNorm, so their gradients are
# float noise (~1e-9) that Adam normalises to ±lr; no two implementations agree on noise.
CNN_CASES = ("ce_weighted_smoothed-sgd", "focal_softmax-sgd_momentum_wd")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(DigitsCNN):
    """The digits CNN with 4 outputs (so one case table serves both models)."""

    def __init__(self) -> None:
        super().__init__(num_classes=4)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], tuple[Path, nn.Module]]:
    cache: dict[tuple[str, str], tuple[Path, nn.Module]] = {}

    def get(model_kind: str, case_id: str) -> tuple[Path, nn.Module]:
        if (model_kind, case_id) not in cache:
            torch.manual_seed(7)
            model: nn.Module = MLP() if model_kind == "mlp" else SmallCNN()
            case = CASES[case_id]
            shape = (6,) if model_kind == "mlp" else (1, 8, 8)
            out = tmp_path_factory.mktemp(f"{model_kind}-{case.id}")
            export_bundle(
                model, input_shape=shape, num_classes=4, out_dir=out, loss=case.loss, optimizer=case.optimizer
            )
            cache[(model_kind, case_id)] = (out, model)
        return cache[(model_kind, case_id)]

    return get


def _batch(case: Case, model_kind: str, seed: int, n: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (n, 6) if model_kind == "mlp" else (n, 1, 8, 8)
    x = rng.standard_normal(shape, dtype=np.float32)
    if case.label == "class":
        return x, rng.integers(0, 4, n, dtype=np.int64)
    if case.label == "binary":
        return x, rng.integers(0, 2, (n, 4)).astype(np.float32)
    return x, rng.standard_normal((n, 4), dtype=np.float32)


class OrtSteps:
    """Runs a bundle's train-step graph from its manifest (hyper-parameter defaults, step counter)."""

    def __init__(self, bundle: Path) -> None:
        self.manifest: Manifest = load_manifest(bundle)[0]
        self.session = ort.InferenceSession(str(bundle / "train_step.onnx"), providers=["CPUExecutionProvider"])
        self.runner = GraphRunner(self.session, self.manifest.graphs["train_step"])
        self.state = read_tensor_file(bundle / self.manifest.weights_file)
        for spec in self.manifest.tensors_with_role("optimizer_state"):
            self.state[spec.name] = np.zeros(spec.shape, dtype=spec.dtype)
        self.hyper = resolve_hyperparameters(self.manifest, None)
        self.steps = 0

    def step(self, x: np.ndarray, y: np.ndarray, lr: float) -> tuple[float, int]:
        self.steps += 1
        fixed = {
            "x": x,
            "y": y,
            "lr": np.array(lr, np.float32),
            "step": np.array(self.steps, np.float32),
            "seed": np.array(self.steps, np.int64),
        }
        out, new_state, _ = self.runner.run(fixed, tensors=self.state, hyper=self.hyper)
        self.state.update(new_state)
        return float(out["loss"]), int(out["correct"])


def _torch_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, np.ndarray]:
    expected = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    renames = {"momentum_buffer": "momentum", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}
    for name, param in model.named_parameters():
        for key, value in optimizer.state[param].items():
            if key in renames and isinstance(value, torch.Tensor):
                expected[f"{name}.{renames[key]}"] = value.numpy().copy()
    return expected


def _torch_optimizer(spec: OptimizerSpec, model: nn.Module) -> torch.optim.Optimizer:
    if spec.kind == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=spec.lr,
            momentum=spec.momentum,
            nesterov=spec.nesterov,
            weight_decay=spec.weight_decay,
        )
    cls = torch.optim.Adam if spec.kind == "adam" else torch.optim.AdamW
    return cls(model.parameters(), lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)


def _check_parity(exported: Callable[[str, str], tuple[Path, nn.Module]], model_kind: str, case_id: str) -> None:
    case = CASES[case_id]
    bundle, model = exported(model_kind, case_id)
    steps = OrtSteps(bundle)
    reference = copy.deepcopy(model).train()
    optimizer = _torch_optimizer(case.optimizer, reference)
    for step in range(3):
        x, y = _batch(case, model_kind, step)
        loss, correct = steps.step(x, y, case.optimizer.lr)
        optimizer.zero_grad()
        logits = reference(torch.from_numpy(x))
        torch_loss = case.reference(logits, torch.from_numpy(y))
        torch_loss.backward()
        optimizer.step()
        assert loss == pytest.approx(torch_loss.item(), rel=RTOL, abs=ATOL)
        if case.label == "class":
            assert correct == int((logits.argmax(1) == torch.from_numpy(y)).sum())
        elif case.label == "binary":
            hits = ((logits > 0) == (torch.from_numpy(y) > 0.5)).all(dim=1)
            assert correct == int(hits.sum())
        else:
            assert correct == 0
        expected = _torch_state(reference, optimizer)
        assert set(steps.state) == set(expected) - {k for k in expected if k.endswith("num_batches_tracked")}
        for name, value in steps.state.items():
            np.testing.assert_allclose(value, expected[name], rtol=RTOL, atol=ATOL, err_msg=f"step {step}: {name}")


@pytest.mark.parametrize("case_id", list(CASES))
def test_mlp_step_matches_torch(exported: Callable[[str, str], tuple[Path, nn.Module]], case_id: str) -> None:
    _check_parity(exported, "mlp", case_id)


@pytest.mark.parametrize("case_id", CNN_CASES)
def test_digits_cnn_step_matches_torch(exported: Callable[[str, str], tuple[Path, nn.Module]], case_id: str) -> None:
    _check_parity(exported, "cnn", case_id)


@pytest.mark.parametrize("case_id", list(CASES))
def test_a_few_steps_lower_the_loss(exported: Callable[[str, str], tuple[Path, nn.Module]], case_id: str) -> None:
    case = CASES[case_id]
    steps = OrtSteps(exported("mlp", case_id)[0])
    x, y = _batch(case, "mlp", 99, n=32)
    losses = [steps.step(x, y, case.optimizer.lr)[0] for _ in range(12)]
    assert losses[-1] < 0.95 * losses[0], losses


def test_manifest_declares_label_hyperparameters_and_accuracy(
    exported: Callable[[str, str], tuple[Path, nn.Module]],
) -> None:
    focal = load_manifest(exported("mlp", "focal_sigmoid-sgd_nesterov")[0])[0]
    assert focal.task == "binary" and focal.accuracy_defined
    assert focal.label.dtype == "float32" and focal.label.shape == (None, 4)
    assert {h.name: h.default for h in focal.hyperparameters} == {"focal_alpha": (0.9,), "focal_gamma": (1.5,)}
    assert focal.loss == {"type": "focal", "task": "binary", "normalizer": "count", "binary": True}
    mse = load_manifest(exported("mlp", "mse-adamw")[0])[0]
    assert mse.task == "regression" and not mse.accuracy_defined
    assert mse.optimizer == {"type": "adamw", "lr": 0.01, "weight_decay": 0.05, "betas": [0.8, 0.99], "eps": 1e-8}
    states = [t.name for t in mse.tensors_with_role("optimizer_state")]
    assert states[:2] == ["net.0.weight.exp_avg", "net.0.weight.exp_avg_sq"]
    ce = load_manifest(exported("mlp", "ce_weighted_smoothed-sgd")[0])[0]
    assert ce.label.dtype == "int64" and ce.loss["normalizer"] == "class_weights"
    assert set(ce.graphs["train_step"].inputs) == {"x", "y", "seed", "lr", "step"}
    assert set(ce.graphs["train_step"].hyper_inputs) == {"label_smoothing", "class_weights"}


def test_hyperparameters_are_graph_inputs(exported: Callable[[str, str], tuple[Path, nn.Module]]) -> None:
    """A device's own focal alpha/gamma change the loss exactly as the formula says."""
    case = CASES["focal_softmax-sgd_momentum_wd"]
    bundle, model = exported("mlp", "focal_softmax-sgd_momentum_wd")
    steps = OrtSteps(bundle)
    steps.hyper = resolve_hyperparameters(steps.manifest, {"focal_alpha": [1.0, 1.0, 1.0, 9.0], "focal_gamma": 0.5})
    x, y = _batch(case, "mlp", 3)
    loss, _ = steps.step(x, y, LR)
    expected = _focal_softmax([1.0, 1.0, 1.0, 9.0], 0.5)(model(torch.from_numpy(x)), torch.from_numpy(y))
    assert loss == pytest.approx(expected.item(), rel=RTOL)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss": "hinge"}, "unsupported loss 'hinge'"),
        ({"loss": LossSpec(kind="focal", label_smoothing=0.1)}, "does not take option 'label_smoothing'"),
        ({"loss": LossSpec(kind="mse", class_weights=(1.0, 2.0))}, "does not take option 'class_weights'"),
        ({"loss": LossSpec(kind="cross_entropy", class_weights=(1.0, 2.0))}, "class_weights has 2 values"),
        ({"loss": LossSpec(kind="cross_entropy", label_smoothing=1.0)}, "label_smoothing"),
        ({"loss": LossSpec(kind="focal", binary=True, focal_alpha=(0.2, 0.3))}, "one number"),
        ({"loss": LossSpec(kind="custom")}, "give the loss function"),
        ({"loss": LossSpec(kind="huber", huber_delta=0.0)}, "delta must be > 0"),
        ({"optimizer": "rmsprop"}, "unsupported optimizer 'rmsprop'"),
        ({"optimizer": OptimizerSpec(kind="adam", momentum=0.9)}, "adam does not take momentum"),
        ({"optimizer": OptimizerSpec(kind="sgd", betas=(0.8, 0.9))}, "sgd does not take betas"),
        ({"optimizer": OptimizerSpec(kind="adamw"), "lr": 0.1}, "inside the OptimizerSpec"),
        ({"momentum": 0.0, "nesterov": True}, "nesterov"),
        ({"federated": FederatedSpec(personal=("head.*",))}, "personal pattern 'head.*' matches no tensor"),
        ({"federated": FederatedSpec(personal=("*",))}, "every tensor is personal"),
        ({"federated": FederatedSpec(fedprox_mu=-1.0)}, "mu must be >= 0"),
        ({"micro_batch": 0}, "micro_batch must be >= 1"),
    ],
)
def test_unsupported_combinations(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ExportError, match=message.replace("*", r"\*").replace("(", r"\(")):
        export_bundle(MLP(), input_shape=(6,), num_classes=4, out_dir=tmp_path, **kwargs)  # type: ignore[arg-type]
