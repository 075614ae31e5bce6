"""Clean up a converted ONNX graph before it is checked and kept: pure ONNX and numpy, nothing of Keras.

tf2onnx writes what TensorFlow's graph says, and some of it costs time in ONNX Runtime (measured in
benchmarks/docs/export-graph.md):
- the preprocessing inside the model (EfficientNet's Rescaling and Normalization; the RGB -> BGR
  Gather of keras' caffe-style ResNet/VGG preprocessing) multiplies, adds and reorders NHWC channels
  before the input's Transpose, a slow broadcast over an innermost dimension of 3;
- that Transpose itself copies the whole input, when the first convolution could read the NHWC
  pixels as they are (``read_input_channels_last``).

Each pass here matches one pattern exactly and proves the rewrite keeps the result (shapes from ONNX
shape inference, constants read from the graph); anything it can't prove it leaves alone, so the
passes are safe on graphs nobody has looked at. ``clean_graph`` runs them all, then onnxslim for the
rest (constant folding, dead ends; see ``simplify``), and returns the new model with what each pass
did. The export's parity check then runs on the final graph. Each pass earns its place in
benchmarks/docs/export-graph.md ("Which passes stay"); Pad folding and Identity removal went in
version 3 (onnxslim and ONNX Runtime already do them), squeeze-and-excitation's Squeeze/Reshape pairs
and the batch-copying Reshapes in version 4 (no gain on ONNX Runtime or OpenVINO, quiet machine).

>>> model, done = clean_graph(onnx.load("exports/b0.onnx"))  # doctest: +SKIP
>>> done  # doctest: +SKIP
{'fold_input_affine': 3, 'read_input_channels_last': 1, ...}
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from kbench.export.onnxgraph import (
    Graph,
    attribute,
    remove_nodes,
    set_attribute,
    sort_topologically,
)

# Bump when a pass changes what it writes: kbench.export.onnx puts it in the key under which an exported
# file is reused, so files made by older passes are made again.
GRAPH_PASSES_VERSION = 4


# --- passes -------------------------------------------------------------------------------------


_AFFINE = ("Mul", "Add", "Sub", "Div")


def fold_input_affine(graph: Graph) -> int:
    """The preprocessing inside the model, a chain of Mul/Add/Sub/Div by per-channel constants (and
    Gathers that reorder the channels) on an NHWC graph input ahead of the Transpose to NCHW, becomes
    ``a * x + b`` after the Transpose (the reordering goes into the convolution's weights), and
    then, where the next node is a convolution (group 1, a != 0): the scale folds into its weights and
    the shift is added before it as ``b / a`` (into its bias when it pads nothing, as then every
    output sees every shifted input). Returns the number of preprocessing nodes removed."""
    done = 0
    for value in graph.graph.input:
        shape = graph.shapes.get(value.name)
        if shape is None or len(shape) != 4 or not isinstance(shape[3], int):
            continue
        channels = shape[3]
        scale, shift = np.ones(channels), np.zeros(channels)
        order = np.arange(channels)  # output channel c reads input channel order[c]
        chain, current = [], value.name
        while True:
            node = graph.only_consumer(current)
            if node is not None and node.op_type == "Gather" and node.input[0] == current:
                picked = _channel_permutation(graph, node, channels)
                if picked is None:
                    break
                order, scale, shift = order[picked], scale[picked], shift[picked]
                chain.append(node)
                current = node.output[0]
                continue
            if node is None or node.op_type not in _AFFINE:
                break
            factor = _channel_constant(graph, node, current, channels)
            if factor is None:
                break
            if node.op_type == "Mul":
                scale, shift = scale * factor, shift * factor
            elif node.op_type == "Div":
                scale, shift = scale / factor, shift / factor
            elif node.op_type == "Add":
                shift = shift + factor
            else:
                shift = shift - factor
            chain.append(node)
            current = node.output[0]
        transpose = graph.only_consumer(current)
        if not chain or transpose is None or transpose.op_type != "Transpose":
            continue
        if list(attribute(transpose, "perm", [])) != [0, 3, 1, 2]:
            continue
        if not np.all(np.isfinite(scale)) or not np.all(np.isfinite(shift)):
            continue
        if np.any(order != np.arange(channels)) and not _foldable_conv(graph, transpose.output[0], scale):
            continue  # a channel reordering needs a convolution's weights to go into
        transpose.input[0] = value.name
        remove_nodes(graph, chain)
        graph.refresh()
        _apply_affine_nchw(graph, transpose, scale, shift, order)
        done += len(chain)
        graph.refresh()
    return done


def _channel_constant(graph: Graph, node, current: str, channels: int) -> np.ndarray | None:
    """The float constant NODE applies to ``current``, as a vector over the last axis (a scalar is
    repeated); None when it isn't such a constant (or ``current`` is the divisor or subtrahend)."""
    if node.input[0] == current:
        other = node.input[1]
    elif node.op_type in ("Mul", "Add") and node.input[1] == current:
        other = node.input[0]
    else:
        return None
    constant = graph.constant(other)
    if constant is None or constant.dtype != np.float32 or constant.ndim > 4:
        return None
    if constant.size == 1:
        return np.full(channels, float(constant.ravel()[0]))
    if constant.shape[-1] != channels or constant.size != channels:
        return None
    return constant.astype(np.float64).ravel()


def _channel_permutation(graph: Graph, node, channels: int) -> np.ndarray | None:
    """The constant indices of a Gather on the last axis of an NHWC value that reorder its channels
    (keras' caffe-style preprocessing turns RGB into BGR this way); None for anything else."""
    if int(attribute(node, "axis", 0)) not in (-1, 3):
        return None
    indices = graph.constant(node.input[1])
    if indices is None or indices.dtype.kind not in "iu" or indices.shape != (channels,):
        return None
    indices = np.where(indices < 0, indices + channels, indices).astype(np.int64)
    return indices if sorted(indices.tolist()) == list(range(channels)) else None


def _foldable_conv(graph: Graph, output: str, scale: np.ndarray):
    """The convolution reading ``output`` (alone) whose weights can take a per-input-channel scale
    and reordering, or None."""
    conv = graph.only_consumer(output)
    foldable = (
        conv is not None
        and conv.op_type == "Conv"
        and conv.input[0] == output
        and int(attribute(conv, "group", 1)) == 1
        and np.all(scale != 0)
        and graph.constant(conv.input[1]) is not None
        and graph.constant(conv.input[1]).shape[1] == scale.size
        and (len(conv.input) < 3 or graph.constant(conv.input[2]) is not None)
    )
    return conv if foldable else None


def _apply_affine_nchw(graph: Graph, transpose, scale: np.ndarray, shift: np.ndarray, order: np.ndarray) -> None:
    """After the Transpose, channel c is ``scale[c] * x[order[c]] + shift[c]``: into the next
    convolution's weights (which then read channel order[c] where they read c) where it can go,
    else as a Mul and an Add (order is then the identity: the caller checked)."""
    output = transpose.output[0]
    conv = _foldable_conv(graph, output, scale)
    nodes = []
    if conv is not None:
        weights = graph.constant(conv.input[1]).astype(np.float64)
        weights = weights * scale.reshape(1, -1, *([1] * (weights.ndim - 2)))
        offset = shift / scale
        weights[:, order], offset[order] = weights.copy(), offset.copy()
        pads = list(attribute(conv, "pads", []))
        pads_nothing = attribute(conv, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET", b"VALID", "VALID") and not any(
            pads
        )
        if pads_nothing and np.any(offset):
            bias = graph.constant(conv.input[2]).astype(np.float64) if len(conv.input) > 2 else 0.0
            spread = offset.reshape(1, -1, *([1] * (weights.ndim - 2)))
            bias = bias + np.sum(weights * spread, axis=tuple(range(1, weights.ndim)))
            conv_bias = graph.add_initializer(np.asarray(bias, np.float32), "input_bias")
            if len(conv.input) > 2:
                conv.input[2] = conv_bias
            else:
                conv.input.append(conv_bias)
            offset = np.zeros_like(offset)
        conv.input[1] = graph.add_initializer(weights.astype(np.float32), "input_weights")
        if np.any(offset):
            nodes.append(("Add", offset))
    else:  # order is the identity here
        if np.any(scale != 1):
            nodes.append(("Mul", scale))
        if np.any(shift):
            nodes.append(("Add", shift))
    current = output
    readers = graph.consumers.get(output, [])
    for index, (op, vector) in enumerate(nodes):
        constant = _compact(vector).astype(np.float32)
        name = graph.add_initializer(constant, f"input_{op.lower()}")
        produced = f"kbench_graph/input_{op.lower()}_{index}_out"
        graph.graph.node.append(helper.make_node(op, [current, name], [produced], name=produced))
        current = produced
    if current != output:
        for reader in readers:
            reader.input[:] = [current if name == output else name for name in reader.input]
        sort_topologically(graph.graph)


def _compact(vector: np.ndarray) -> np.ndarray:
    """A per-channel NCHW constant: a scalar when all channels agree, else [1, C, 1, 1]."""
    if np.all(vector == vector[0]):
        return np.asarray(vector[0])
    return vector.reshape(1, -1, 1, 1)


def read_input_channels_last(graph: Graph) -> int:
    """The first convolution reads the NHWC graph input directly, without the Transpose to NCHW.

    An NHWC image [N, H, W, C] is, byte for byte, a one-channel NCHW image [N, 1, H, W*C] whose rows
    hold each pixel's C values side by side. A convolution over C channels with kernel [KH, KW],
    strides [SH, SW] and pads [T, L, B, R] is the same sum of the same products as a one-channel
    convolution over that view with kernel [KH, KW*C], strides [SH, SW*C], pads [T, L*C, B, R*C]
    (weights laid out the same way), so the Transpose goes and a free Reshape takes its place.
    Per-channel Add/Mul between the Transpose and the convolution (the preprocessing shift that
    ``fold_input_affine`` could not fold) become a [1, 1, 1, W*C] constant repeating the C values.
    Needs a static H, W, C, group 1 and no dilation. Returns the number of Transposes removed."""
    done = 0
    for value in graph.graph.input:
        shape = graph.shapes.get(value.name)
        if shape is None or len(shape) != 4 or not all(isinstance(dim, int) for dim in shape[1:]):
            continue
        _, height, width, channels = shape
        transpose = graph.only_consumer(value.name)
        if transpose is None or transpose.op_type != "Transpose":
            continue
        if list(attribute(transpose, "perm", [])) != [0, 3, 1, 2]:
            continue
        chain, constants, current = [], [], transpose.output[0]
        node = graph.only_consumer(current)
        while node is not None and node.op_type in ("Add", "Mul") and node.input[0] == current:
            vector = _nchw_channel_vector(graph.constant(node.input[1]), channels)
            if vector is None:
                break
            chain.append(node)
            constants.append(vector)
            current = node.output[0]
            node = graph.only_consumer(current)
        conv = node
        if conv is None or conv.op_type != "Conv" or conv.input[0] != current:
            continue
        weights = graph.constant(conv.input[1])
        if weights is None or weights.ndim != 4 or weights.shape[1] != channels:
            continue
        if int(attribute(conv, "group", 1)) != 1 or any(d != 1 for d in attribute(conv, "dilations", [1, 1])):
            continue
        if attribute(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        pads = list(attribute(conv, "pads", [0, 0, 0, 0]))
        strides = list(attribute(conv, "strides", [1, 1]))
        outputs, kernel = weights.shape[0], weights.shape[2:]
        view_shape = graph.add_initializer(np.array([0, 1, height, width * channels], np.int64), "channels_last_view")
        view = f"kbench_graph/channels_last_view_{done}"
        graph.graph.node.append(helper.make_node("Reshape", [value.name, view_shape], [view], name=view))
        previous = view
        for node, vector in zip(chain, constants):
            constant = vector if vector.size == 1 else np.tile(vector, width).reshape(1, 1, 1, width * channels)
            node.input[:] = [previous, graph.add_initializer(constant.astype(np.float32), "channels_last_constant")]
            previous = node.output[0]
        conv.input[0] = previous
        flat = weights.transpose(0, 2, 3, 1).reshape(outputs, 1, kernel[0], kernel[1] * channels)
        conv.input[1] = graph.add_initializer(np.ascontiguousarray(flat), "channels_last_weights")
        set_attribute(conv, "kernel_shape", [int(kernel[0]), int(kernel[1] * channels)])
        set_attribute(conv, "strides", [int(strides[0]), int(strides[1] * channels)])
        set_attribute(conv, "pads", [int(pads[0]), int(pads[1] * channels), int(pads[2]), int(pads[3] * channels)])
        changed = {node.output[0] for node in chain} | {transpose.output[0]}
        kept = [info for info in graph.graph.value_info if info.name not in changed]
        del graph.graph.value_info[:]
        graph.graph.value_info.extend(kept)
        remove_nodes(graph, [transpose])
        sort_topologically(graph.graph)
        graph.refresh()
        done += 1
    return done


def _nchw_channel_vector(constant: np.ndarray | None, channels: int) -> np.ndarray | None:
    """A float constant that broadcasts per channel over NCHW (a scalar, or C values on axis 1 of a
    rank-4 or rank-3 shape), as a scalar or a C vector; None for anything else."""
    if constant is None or constant.dtype != np.float32:
        return None
    if constant.size == 1:
        return constant.reshape(())
    expected = {(1, channels, 1, 1), (channels, 1, 1)}
    if tuple(constant.shape) not in expected:
        return None
    return constant.reshape(channels)


def drop_dead_nodes(graph: Graph) -> int:
    """Remove nodes (and initializers) nothing reads, as the passes above leave them behind."""
    done = 0
    while True:
        graph.refresh()
        dead = [
            node
            for node in graph.graph.node
            if all(not out or (out not in graph.consumers and out not in graph.outputs) for out in node.output)
        ]
        if not dead:
            break
        remove_nodes(graph, dead)
        done += len(dead)
    graph.refresh()
    used = set(graph.consumers) | graph.outputs
    kept = [tensor for tensor in graph.graph.initializer if tensor.name in used]
    if len(kept) != len(graph.graph.initializer):
        del graph.graph.initializer[:]
        graph.graph.initializer.extend(kept)
    return done


PASSES = {
    "fold_input_affine": fold_input_affine,
    "read_input_channels_last": read_input_channels_last,
    "drop_dead_nodes": drop_dead_nodes,
}


def _has_subgraphs(graph_proto) -> bool:
    kinds = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    return any(item.type in kinds for node in graph_proto.node for item in node.attribute)


def run_passes(model: onnx.ModelProto, names=None) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Run kbench's own passes (all, or ``names`` in PASSES' order) on a copy of ``model``; returns
    the new model and how many rewrites each pass made."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if _has_subgraphs(copy.graph):  # If/Loop bodies read outer values the indexes here don't see
        return copy, {name: 0 for name in PASSES if names is None or name in names}
    graph = Graph(copy)
    done = {}
    for name, function in PASSES.items():
        if names is not None and name not in names:
            continue
        done[name] = function(graph)
        graph.refresh()
    return copy, done


def simplify(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """onnxslim over the model (constant folding, dead-end removal, common fusions); the model as it
    was when onnxslim is missing or fails. Returns (model, what ran)."""
    try:
        import onnxslim
    except ImportError:
        return model, "onnxslim not installed"
    try:
        slimmed = onnxslim.slim(model)
    except Exception as error:  # a graph onnxslim can't handle: keep kbench's passes' result
        return model, f"onnxslim failed: {type(error).__name__}"
    if not isinstance(slimmed, onnx.ModelProto):
        return model, "onnxslim returned nothing"
    return slimmed, f"onnxslim {onnxslim.__version__}"


def clean_graph(model: onnx.ModelProto, library: bool = True) -> tuple[onnx.ModelProto, dict]:
    """All passes, then (``library``) onnxslim, then kbench's passes once more over what it wrote.
    Returns the model and a record of what ran: pass name -> rewrites, and "simplifier"."""
    cleaned, done = run_passes(model)
    record: dict = {"version": GRAPH_PASSES_VERSION, **done}
    if library:
        cleaned, record["simplifier"] = simplify(cleaned)
        cleaned, again = run_passes(cleaned)
        for name, count in again.items():
            record[name] += count
    return cleaned, record
