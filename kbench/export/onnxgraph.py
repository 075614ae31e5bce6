"""An ONNX graph indexed for rewriting (``Graph``: who makes each value, who reads it, the constants,
the shapes ONNX shape inference proves) and the small edits the clean-up passes in ``kbench.export.graph``
make with it. Pure ONNX and numpy.

>>> indexed = Graph(onnx.load("exports/b0.onnx"))  # doctest: +SKIP
>>> indexed.only_consumer(indexed.graph.input[0].name).op_type  # doctest: +SKIP
'Transpose'
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


class Graph:
    """Indexes over a GraphProto: who makes each value, who reads it, the constants, the known shapes."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.refresh()

    def refresh(self) -> None:
        graph = self.graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.outputs = {value.name for value in graph.output}
        self.initializers = {tensor.name: tensor for tensor in graph.initializer}
        self.shapes = inferred_shapes(self.model)

    def constant(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and len(node.attribute) == 1:
            if node.attribute[0].name == "value":
                return numpy_helper.to_array(node.attribute[0].t)
        return None

    def only_consumer(self, name: str):
        """The single node reading ``name``, or None (several readers, or a graph output)."""
        readers = self.consumers.get(name, [])
        return readers[0] if len(readers) == 1 and name not in self.outputs else None

    def add_initializer(self, array: np.ndarray, hint: str) -> str:
        name, index = f"kbench_graph/{hint}", 0
        while name in self.initializers or name in self.producer:
            index += 1
            name = f"kbench_graph/{hint}_{index}"
        tensor = numpy_helper.from_array(array, name)
        self.graph.initializer.append(tensor)
        self.initializers[name] = tensor
        return name


def inferred_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Value name -> list of dims: an int, a symbol (str), or None for unknown."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # an op shape inference doesn't know: fewer shapes, fewer rewrites
        inferred = model
    shapes = {}
    graph = inferred.graph
    for value in [*graph.input, *graph.value_info, *graph.output]:
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            continue
        dims = []
        for dim in tensor.shape.dim:
            if dim.HasField("dim_value"):
                dims.append(int(dim.dim_value))
            elif dim.HasField("dim_param") and dim.dim_param:
                dims.append(dim.dim_param)
            else:
                dims.append(None)
        shapes[value.name] = dims
    for tensor in graph.initializer:
        shapes[tensor.name] = list(tensor.dims)
    return shapes


def attribute(node, name: str, default=None):
    for item in node.attribute:
        if item.name == name:
            return helper.get_attribute_value(item)
    return default


def set_attribute(node, name: str, value) -> None:
    for index, item in enumerate(node.attribute):
        if item.name == name:
            del node.attribute[index]
            break
    node.attribute.append(helper.make_attribute(name, value))


def remove_nodes(graph: Graph, nodes) -> None:
    doomed = {id(node) for node in nodes}
    kept = [node for node in graph.graph.node if id(node) not in doomed]
    del graph.graph.node[:]
    graph.graph.node.extend(kept)


def sort_topologically(graph_proto) -> None:
    available = {value.name for value in graph_proto.input} | {t.name for t in graph_proto.initializer} | {""}
    pending, ordered = list(graph_proto.node), []
    while pending:
        progress = False
        for node in list(pending):
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
                pending.remove(node)
                progress = True
        if not progress:  # a subgraph's outer names, or a cycle: keep the rest in their order
            ordered.extend(pending)
            break
    del graph_proto.node[:]
    graph_proto.node.extend(ordered)
