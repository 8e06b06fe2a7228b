"""Post-export checks on an ONNX file: what a device running plain onnxruntime relies on."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import onnx

from edge_agent.errors import ExportError

DEFAULT_DOMAINS = ("", "ai.onnx")


def iter_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    """Every node of the model: main graph, nested subgraphs and local functions."""

    def walk(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
        for node in graph.node:
            yield node
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        yield from walk(sub)

    yield from walk(model.graph)
    for function in model.functions:
        yield from function.node


def check_graph(
    path: Path, input_names: Sequence[str], output_names: Sequence[str], *, forbid_ops: Sequence[str]
) -> None:
    """Raise :class:`ExportError` unless the graph has the expected I/O and only default-domain ops."""
    model = onnx.load(str(path))
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in iter_nodes(model) if n.domain not in DEFAULT_DOMAINS})
    if foreign:
        raise ExportError(f"{path.name}: ops outside the default ONNX domain (unsupported layers?): {foreign}")
    forbidden = sorted({n.op_type for n in iter_nodes(model) if n.op_type in forbid_ops})
    if forbidden:
        raise ExportError(
            f"{path.name}: {forbidden} left in the training graph; a BatchNormalization node here runs "
            "in inference mode, so the loss would be wrong and running stats would never update"
        )
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    if inputs != list(input_names) or outputs != list(output_names):
        raise ExportError(
            f"{path.name}: exported graph I/O does not match the manifest: "
            f"inputs {inputs} != {list(input_names)} or outputs {outputs} != {list(output_names)}"
        )


def strip_debug_metadata(path: Path) -> None:
    """Drop per-node exporter metadata (FX node text, Python stack traces with local paths).

    It is two thirds of the train-step file, is downloaded by every device and makes the file
    (and so the bundle digest) depend on where the exporter ran.
    """
    model = onnx.load(str(path))
    for function in model.functions:
        for node in function.node:
            del node.metadata_props[:]
    for node in iter_nodes(model):
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.save(model, str(path))
