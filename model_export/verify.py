"""Export-time safety: refuse what cannot be trained faithfully, and prove what was exported.

* :func:`prepare_for_export` runs on the prepared training copy of a model *before* tracing: it
  refuses layer configurations the exported graph cannot reproduce (random layers that cannot be
  seeded from the graph, attention dropout, ...) with an :class:`ExportError` naming the module
  path and type, tags every module with its path, and swaps ``nn.Dropout`` for the seeded dropout
  of :mod:`model_export.dropout`.
* :func:`explain_failure` turns an exception raised while tracing or converting a graph into an
  :class:`ExportError` naming the aten op and, where it can be found, the module and source line,
  instead of a torch stack trace.
* :func:`check_against_eager` runs every exported graph in onnxruntime on the example batch and
  compares each output with the traced Python function run eagerly on the same inputs; it deletes
  the written graphs and raises if any output diverges.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from edge_agent.errors import ExportError, FedflockError
from model_export.dropout import replace_dropout

INPUT_DTYPES = ("float32", "int64")
#: attribute set on every module of the prepared copy: its path in the model
PATH_ATTR = "_fedflock_path"
#: divergence limit: max |onnxruntime - eager| <= ATOL + RTOL * max |eager|
ATOL = 1e-4
RTOL = 1e-4
#: |exp_avg| below this (a gradient of ~1e-5 or less after (1 - beta1)) counts as rounding noise
NOISE_GRADIENT = 1e-6

_RANDOM_LAYERS = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.RReLU)


def example_input(model: nn.Module, shape: Sequence[int], dtype: str) -> torch.Tensor:
    """A random example batch: normal floats, or token ids below every ``nn.Embedding``'s vocabulary."""
    if dtype == "float32":
        return torch.randn(*shape)
    if dtype == "int64":
        vocab = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
        return torch.randint(0, min(vocab, default=2), tuple(shape))
    raise ExportError(f"unsupported input_dtype {dtype!r}; supported: {', '.join(INPUT_DTYPES)}")


def _unsupported(module: nn.Module) -> str | None:
    """Why ``module`` cannot be exported for training, or ``None``."""
    if isinstance(module, _RANDOM_LAYERS):
        return (
            "its random mask/slope cannot be seeded from the train step's seed input, so onnxruntime "
            "could not reproduce a step; use nn.Dropout (exported as a seeded dropout) or remove it"
        )
    if type(module) is nn.Dropout and module.p >= 1.0:
        return "p=1 drops every activation"
    if isinstance(module, nn.MultiheadAttention) and module.dropout > 0.0:
        return (
            f"attention-weight dropout (dropout={module.dropout}) runs inside the fused attention kernel "
            "and cannot be seeded; construct it with dropout=0.0 (nn.TransformerEncoderLayer's other "
            "Dropout layers are supported, but its self_attn dropout must be set to 0.0)"
        )
    if isinstance(module, nn.RNNBase) and module.num_layers > 1 and module.dropout > 0.0:
        return f"dropout={module.dropout} between stacked layers cannot be seeded; stack layers with nn.Dropout"
    if isinstance(module, nn.RNN) and module.nonlinearity != "tanh":
        return "only nonlinearity='tanh' is lowered to plain ONNX ops"
    if isinstance(module, nn.Embedding | nn.EmbeddingBag) and module.sparse:
        return "sparse gradients are not supported; use sparse=False"
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return "max_norm renormalises the weight in place during the forward pass"
    return None


def _describe(module: nn.Module) -> str:
    extra = module.extra_repr()
    return f"nn.{type(module).__name__}" + (f"({extra})" if extra else "")


def prepare_for_export(model: nn.Module) -> list[str]:
    """Check, tag and adapt the prepared training copy in place; returns the replaced dropout paths."""
    for name, module in model.named_modules():
        reason = _unsupported(module)
        if reason is not None:
            where = f"module {name!r}" if name else "the model"
            raise ExportError(f"{where} ({_describe(module)}) is not supported: {reason}")
    for name, module in model.named_modules():
        object.__setattr__(module, PATH_ATTR, name or "<model>")
    return replace_dropout(model)


_OP_PATTERNS = (
    re.compile(r"target=torch\.ops\.aten\.([\w.]+?)(?:\.default)?\]"),
    re.compile(r"OpOverload\(op='aten\.(\w+)'"),
    re.compile(r"aten\.(\w+)\.(?:default|Tensor|input|Scalar)"),
    re.compile(r"aten::(\w+)"),
)


def _aten_op(message: str) -> str | None:
    for pattern in _OP_PATTERNS:
        found = pattern.search(message)
        if found:
            return found.group(1)
    return None


def _module_in_traceback(exc: BaseException) -> str | None:
    """Path of the innermost model module whose ``forward`` was running when ``exc`` was raised."""
    found = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and hasattr(owner, PATH_ATTR):
            found = f"module {getattr(owner, PATH_ATTR)!r} ({_describe(owner)})"
    return found


def _user_line(stack_trace: str) -> str | None:
    """The innermost source line of the stack trace that is neither torch nor fedflock code."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)\n\s*(.*)', stack_trace)
    skip = (str(Path(torch.__file__).parent), str(Path(__file__).parent))
    for path, line, func, code in reversed(frames):
        if path.startswith(skip):
            continue
        return f"{Path(path).name}:{line} in {func}: {code.strip()}"
    return None


def _module_in_graph(
    op: str, fn: Callable[..., Any], args: Sequence[torch.Tensor], decompositions: dict[Any, Any]
) -> str | None:
    """Re-trace with stack traces and find the source line that produced ``op`` (or its forward)."""
    wanted = {op, op.removesuffix("_backward")}
    try:
        graph = make_fx(fn, decomposition_table=decompositions, tracing_mode="fake", record_stack_traces=True)(*args)
    except Exception:
        return None
    for node in graph.graph.nodes:
        target = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        if node.op == "call_function" and target in wanted and node.meta.get("stack_trace"):
            line = _user_line(node.meta["stack_trace"])
            if line:
                return f"model code {line}"
    return None


def explain_failure(
    exc: Exception,
    fn: Callable[..., Any],
    args: Sequence[torch.Tensor],
    decompositions: dict[Any, Any],
    graph_name: str,
) -> FedflockError:
    """An :class:`ExportError` for a failed trace/conversion: aten op, module or source line, short cause."""
    if isinstance(exc, FedflockError):
        where = _module_in_traceback(exc)
        return ExportError(f"{graph_name}: {where}: {exc.reason}") if where else exc
    message = str(exc)
    op = _aten_op(message)
    where = _module_in_traceback(exc) or (_module_in_graph(op, fn, args, decompositions) if op else None)
    first_line = message.strip().splitlines()[0] if message.strip() else type(exc).__name__
    parts = [f"exporting {graph_name} failed"]
    if op:
        parts.append(f"aten op {op!r} has no ONNX lowering or decomposition")
    if where:
        parts.append(f"used by {where}")
    cause = f"{type(exc).__name__}: {first_line[:300]}"
    return ExportError("; ".join(parts) + f" ({cause})")


def _run_onnx(path: Path, inputs: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return list(session.run(None, {name: feeds[name] for name in inputs}))


def _divergence(name: str, actual: np.ndarray, expected: np.ndarray, skip: np.ndarray | None) -> str | None:
    if actual.shape != expected.shape:
        return f"{name} has shape {actual.shape}, eager PyTorch gives {expected.shape}"
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    both_nan = np.isnan(a) & np.isnan(e)
    if skip is not None and skip.shape == a.shape:
        both_nan |= skip
    diff = np.where(both_nan, 0.0, np.abs(a - e))
    err = float(np.max(diff, initial=0.0))
    limit = ATOL + RTOL * float(np.max(np.abs(np.nan_to_num(e)), initial=0.0))
    if not err <= limit:
        return f"{name} differs: max abs err {err:.1e} > {limit:.1e}"
    return None


def _noise_mask(name: str, expected: dict[str, np.ndarray]) -> np.ndarray | None:
    """Elements of an Adam-updated parameter whose gradient is float32 noise: not comparable.

    Adam divides by the gradient's magnitude, so a gradient that is zero up to rounding (the bias of
    a convolution followed by BatchNorm, the key bias of attention) gives a +-lr step whose sign
    depends on the rounding: eager PyTorch and onnxruntime legitimately disagree there. Their
    ``exp_avg`` is still compared.
    """
    exp_avg = expected.get(name + ".exp_avg") if name.startswith("new.") else None
    return None if exp_avg is None else np.abs(exp_avg) < NOISE_GRADIENT


def check_against_eager(planned: Sequence[Any], examples: dict[str, torch.Tensor], out: Path) -> None:
    """Run each exported graph in onnxruntime and eagerly in PyTorch on ``examples``; refuse divergence."""
    feeds = {name: value.detach().numpy() for name, value in examples.items()}
    problems: list[str] = []
    for item in planned:
        graph = item.graph
        try:
            actual = _run_onnx(out / item.file, graph.inputs, feeds)
        except Exception as exc:
            problems.append(f"{item.file} does not run in onnxruntime: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        eager = graph.fn(*(examples[n] for n in graph.inputs))
        expected = {n: e.detach().numpy() for n, e in zip(graph.outputs, eager, strict=True)}
        for name, a in zip(graph.outputs, actual, strict=True):
            problem = _divergence(name, np.asarray(a), expected[name], _noise_mask(name, expected))
            if problem:
                problems.append(f"{item.file}: {problem}")
    if problems:
        for item in planned:
            (out / item.file).unlink(missing_ok=True)
        raise ExportError(
            "exported graph diverges from PyTorch on the example batch, bundle not written: " + "; ".join(problems)
        )
