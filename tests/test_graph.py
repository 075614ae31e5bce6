"""kbench.export.graph's passes on small hand-built graphs: each rewrite gives what ONNX Runtime computed before
(exactly, or within float rounding where constants were folded), and a pattern that doesn't match
exactly is left alone."""

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from kbench.export import graph

pytestmark = pytest.mark.once  # backend-independent: `make test` runs it under TensorFlow only

RNG = np.random.default_rng(0)


def make_model(nodes, inputs, outputs, constants):
    initializers = [numpy_helper.from_array(np.asarray(value), name) for name, value in constants.items()]
    proto = helper.make_graph(nodes, "test", inputs, outputs, initializers)
    model = helper.make_model(proto, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def tensor(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def run(model, pixels):
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: pixels})[0]


def ops(model):
    return [node.op_type for node in model.graph.node]


def weights(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def preprocessing_model(conv_pads):
    nodes = [
        helper.make_node("Mul", ["image", "scale"], ["scaled"]),
        helper.make_node("Sub", ["scaled", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "std"], ["normal"]),
        helper.make_node("Transpose", ["normal"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "w", "b"], ["y"], pads=conv_pads, strides=[2, 2]),
    ]
    constants = {
        "scale": np.array(1 / 255, np.float32),
        "mean": np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 1, 1, 3),
        "std": np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 1, 1, 3),
        "w": weights(4, 3, 3, 3),
        "b": weights(4),
    }
    return make_model(nodes, [tensor("image", ["N", 9, 9, 3])], [tensor("y", ["N", 4, None, None])], constants)


@pytest.mark.parametrize("conv_pads, between", [([1, 1, 1, 1], ["Add"]), ([0, 0, 0, 0], [])])
def test_preprocessing_folds_into_the_first_convolution(conv_pads, between):
    model = preprocessing_model(conv_pads)
    cleaned, done = graph.run_passes(model)
    assert done["fold_input_affine"] == 3
    # with padding, the shift stays (as b / a, after the Transpose); without, it joins the bias; the
    # convolution then reads the NHWC input through a Reshape instead of the Transpose
    assert ops(cleaned) == ["Reshape", *between, "Conv"]
    pixels = RNG.uniform(0, 255, (2, 9, 9, 3)).astype(np.float32)
    expected = run(model, pixels)
    np.testing.assert_allclose(run(cleaned, pixels), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def caffe_model(indices, conv_pads=(3, 3, 3, 3)):
    """keras' caffe-style preprocessing (ResNet, VGG): RGB -> BGR by a Gather, minus the BGR means."""
    nodes = [
        helper.make_node("Gather", ["image", "order"], ["bgr"], axis=-1),
        helper.make_node("Add", ["bgr", "mean"], ["centred"]),
        helper.make_node("Transpose", ["centred"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "w", "b"], ["y"], pads=list(conv_pads), strides=[2, 2]),
    ]
    constants = {
        "order": np.array(indices, np.int64),
        "mean": np.array([-103.939, -116.779, -123.68], np.float32),
        "w": weights(4, 3, 7, 7),
        "b": weights(4),
    }
    return make_model(nodes, [tensor("image", ["N", 15, 15, 3])], [tensor("y", ["N", 4, None, None])], constants)


@pytest.mark.parametrize("indices", [[2, 1, 0], [-1, 0, 1]])
def test_a_channel_reordering_folds_into_the_first_convolution(indices):
    model = caffe_model(indices)
    cleaned, done = graph.run_passes(model, ["fold_input_affine"])
    assert done == {"fold_input_affine": 2}
    assert ops(cleaned) == ["Transpose", "Add", "Conv"]  # the shift stays: the convolution pads
    pixels = RNG.uniform(0, 255, (2, 15, 15, 3)).astype(np.float32)
    expected = run(model, pixels)
    np.testing.assert_allclose(run(cleaned, pixels), expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    cleaned, _ = graph.run_passes(model)
    assert ops(cleaned) == ["Reshape", "Add", "Conv"]
    np.testing.assert_allclose(run(cleaned, pixels), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_a_gather_that_is_not_a_channel_reordering_is_left_alone():
    model = caffe_model([0, 0, 1])
    cleaned, done = graph.run_passes(model, ["fold_input_affine"])
    assert done == {"fold_input_affine": 0} and ops(cleaned)[0] == "Gather"


def test_preprocessing_with_a_zero_scale_is_not_folded_into_weights():
    model = preprocessing_model([1, 1, 1, 1])
    for tensor_proto in model.graph.initializer:
        if tensor_proto.name == "scale":
            tensor_proto.CopyFrom(numpy_helper.from_array(np.array(0.0, np.float32), "scale"))
    cleaned, _ = graph.run_passes(model)
    assert ops(cleaned)[-1] == "Conv" and "Mul" in ops(cleaned)  # moved after the Transpose, kept
    pixels = RNG.uniform(0, 255, (2, 9, 9, 3)).astype(np.float32)
    np.testing.assert_allclose(run(cleaned, pixels), run(model, pixels), rtol=0, atol=1e-5)


def channels_last_model(kernel=(3, 3), strides=(2, 2), pads=(0, 0, 1, 1), between=True, **conv):
    nodes = [helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2])]
    if between:
        nodes.append(helper.make_node("Add", ["nchw", "shift"], ["shifted"]))
    source = "shifted" if between else "nchw"
    if pads is not None:
        conv["pads"] = list(pads)
    nodes.append(helper.make_node("Conv", [source, "w", "b"], ["y"], strides=list(strides), **conv))
    group = conv.get("group", 1)
    constants = {
        "shift": np.array([-2.1, -2.0, -1.8], np.float32).reshape(1, 3, 1, 1),
        "w": weights(6, 3 // group, *kernel),
        "b": weights(6),
    }
    return make_model(nodes, [tensor("image", ["N", 11, 10, 3])], [tensor("y", ["N", 6, None, None])], constants)


@pytest.mark.parametrize(
    "kernel, strides, pads, between",
    [((3, 3), (2, 2), (0, 0, 1, 1), True), ((7, 5), (2, 3), (3, 2, 1, 2), False), ((1, 1), (1, 1), (0, 0, 0, 0), True)],
)
def test_the_first_convolution_reads_the_nhwc_input_without_a_transpose(kernel, strides, pads, between):
    """An NHWC image is a one-channel image W*C wide: the convolution over it with a kernel and stride
    C times wider (pads too) is the same sum, so the Transpose goes and a per-channel shift between
    them repeats its C values along the row."""
    model = channels_last_model(kernel, strides, pads, between)
    cleaned, done = graph.run_passes(model, ["read_input_channels_last"])
    assert done == {"read_input_channels_last": 1}
    assert ops(cleaned) == ["Reshape", *(["Add"] if between else []), "Conv"]
    onnx.checker.check_model(cleaned)
    pixels = RNG.uniform(-3, 3, (2, 11, 10, 3)).astype(np.float32)
    expected = run(model, pixels)
    np.testing.assert_allclose(run(cleaned, pixels), expected, rtol=0, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize(
    "pads, conv",
    [((0, 0, 1, 1), {"dilations": [2, 2]}), ((0, 0, 1, 1), {"group": 3}), (None, {"auto_pad": "SAME_UPPER"})],
)
def test_a_convolution_the_channels_last_view_cannot_express_keeps_its_transpose(pads, conv):
    model = channels_last_model(pads=pads, between=False, **conv)
    cleaned, done = graph.run_passes(model, ["read_input_channels_last"])
    assert done == {"read_input_channels_last": 0} and ops(cleaned)[0] == "Transpose"


def test_the_transpose_stays_when_the_input_size_is_not_known_or_another_node_reads_it():
    model = channels_last_model()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "W"
    assert graph.run_passes(model, ["read_input_channels_last"])[1] == {"read_input_channels_last": 0}
    model = channels_last_model(between=False)
    model.graph.node.append(helper.make_node("Relu", ["nchw"], ["z"]))
    model.graph.output.append(tensor("z", ["N", 3, 11, 10]))
    assert graph.run_passes(model, ["read_input_channels_last"])[1] == {"read_input_channels_last": 0}


def test_clean_graph_records_each_pass_and_the_simplifier():
    model = preprocessing_model([1, 1, 1, 1])
    cleaned, record = graph.clean_graph(model)
    assert record["version"] == graph.GRAPH_PASSES_VERSION
    assert record["fold_input_affine"] == 3 and set(graph.PASSES) <= set(record)
    assert record["simplifier"].startswith("onnxslim")
    onnx.checker.check_model(cleaned)
    assert [value.name for value in cleaned.graph.output] == ["y"]


def test_a_graph_with_subgraphs_is_left_alone():
    branch = helper.make_graph(
        [helper.make_node("Identity", ["padded"], ["inner"])], "branch", [], [tensor("inner", ["N", 3, 11, 11])]
    )
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["padded"]),
        helper.make_node("ReduceMax", ["x"], ["peak"], keepdims=0),
        helper.make_node("Greater", ["peak", "zero"], ["positive"]),
        helper.make_node("If", ["positive"], ["y"], then_branch=branch, else_branch=branch),
    ]
    constants = {"pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "zero": np.array(0.0, np.float32)}
    model = make_model(nodes, [tensor("x", ["N", 3, 9, 9])], [tensor("y", ["N", 3, 11, 11])], constants)
    cleaned, done = graph.run_passes(model)
    assert not any(done.values()) and ops(cleaned) == ops(model)
