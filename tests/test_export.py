import json
import os

import numpy as np
import onnx
import onnxruntime
import pytest

from kbench.core.errors import KbenchError
from kbench.export import graph as graph_module
from kbench.export import onnx as export_module
from kbench.export.onnx import export_onnx, read_metadata
from kbench.models.backbones import build_classifier, build_feature_extractor, get_backbone
from kbench.models.settle import calibrate_batch_norm, settle_random_weights

from conftest import BACKEND, FAMILIES, run_cli


def two_member_ensemble():
    """Two tiny members of different input sizes behind one 48 px image input, with dropout: the
    shape of a kbench ensemble (nested models, in-graph resizing, the study's stacked head)."""
    import keras
    from keras import layers

    image = keras.Input((48, 48, 3), name="image")
    features = []
    for size in (32, 24):
        member = build_feature_extractor(get_backbone("small_cnn"), size)
        member.name = f"member_{size}"
        features.append(member(layers.Resizing(size, size, name=f"resize_{size}")(image)))
    x = layers.Concatenate()(features)
    x = layers.Dropout(0.3)(layers.Dense(32, activation="relu")(x))
    x = layers.Dense(8, activation="relu")(x)
    return keras.Model(image, layers.Dense(1, activation="sigmoid", name="probability")(x))


def session(path):
    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])


def test_small_cnn_exports_with_one_image_input_and_probability_output(tmp_path):
    model = build_classifier(get_backbone("small_cnn"), 2, 32)
    result = export_onnx(model, str(tmp_path / "m.onnx"), metadata={"classes": ["cat", "dog"]})
    assert result["max_relative_difference"] <= 1e-4 and result["backend"] == BACKEND
    onnx.checker.check_model(onnx.load(str(tmp_path / "m.onnx")))
    graph = session(str(tmp_path / "m.onnx"))
    assert [i.name for i in graph.get_inputs()] == ["image"]
    assert [o.name for o in graph.get_outputs()] == ["probability"]
    pixels = np.random.default_rng(1).uniform(0, 255, (5, 32, 32, 3)).astype("float32")
    assert np.allclose(graph.run(None, {"image": pixels})[0], np.asarray(model.predict_on_batch(pixels)), atol=1e-5)
    metadata = read_metadata(str(tmp_path / "m.onnx"))
    assert json.loads(metadata["classes"]) == ["cat", "dog"] and metadata["backend"] == BACKEND
    assert json.loads(metadata["image_size"]) == [32, 32] and "keras_version" in metadata
    passes = json.loads(metadata["kbench_graph_passes"])  # the clean-up ran, and says what it did
    assert passes == result["graph_passes"] and passes["version"] == graph_module.GRAPH_PASSES_VERSION
    assert set(graph_module.PASSES) <= set(passes) and passes["simplifier"].startswith("onnxslim")


def test_parity_compares_logits_where_the_probabilities_are_stuck_at_0_or_1(tmp_path):
    """A trained classifier's probabilities on random pixels are often exactly 0 or 1, where a wrong graph
    and the right one agree; the check compares the head's logits too. Here every probability is 1.0 and
    the graph adds 1 to the logit before its Sigmoid: refused."""
    import keras

    from kbench.models.backbones import HEAD_LAYER

    keras.utils.set_random_seed(0)
    model = build_classifier(get_backbone("small_cnn"), 2, 32, "none")
    model.get_layer(HEAD_LAYER).bias.assign(np.array([60.0], np.float32))
    path = str(tmp_path / "m.onnx")
    assert export_onnx(model, path)["max_relative_difference"] <= 1e-4
    proto = onnx.load(path)
    (index,) = [i for i, node in enumerate(proto.graph.node) if node.op_type == "Sigmoid"]
    sigmoid = proto.graph.node[index]
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1.0], np.float32), "one"))
    proto.graph.node.insert(index, onnx.helper.make_node("Add", [sigmoid.input[0], "one"], ["shifted"]))
    sigmoid = proto.graph.node[index + 1]
    sigmoid.input[0] = "shifted"
    onnx.checker.check_model(proto)
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    assert np.all(session.run(None, {session.get_inputs()[0].name: pixels})[0] == 1.0)  # nothing to see there
    with pytest.raises(KbenchError, match="ONNX Runtime and Keras disagree"):
        export_module.check_parity(model, proto.SerializeToString(), [1, 3])


def test_export_key_changes_with_the_graph_passes_version(tmp_path, monkeypatch):
    source = tmp_path / "m.keras"
    source.write_bytes(b"model bytes")
    options = export_module.ExportOptions()
    before = export_module.export_key(str(source), options)
    monkeypatch.setattr(graph_module, "GRAPH_PASSES_VERSION", graph_module.GRAPH_PASSES_VERSION + 1)
    assert export_module.export_key(str(source), options) != before


def test_ensemble_of_members_with_different_sizes_exports(tmp_path):
    model = two_member_ensemble()
    result = export_onnx(model, str(tmp_path / "ensemble.onnx"))
    assert result["max_relative_difference"] <= 1e-4
    graph = onnx.load(str(tmp_path / "ensemble.onnx")).graph
    assert len(graph.input) == 1  # no constants leaked out as inputs
    assert not any("Random" in node.op_type for node in graph.node)  # dropout is gone


def test_fixed_batch_size_and_feature_extractor(tmp_path):
    extractor = build_feature_extractor(get_backbone("small_cnn"), 32)
    export_onnx(extractor, str(tmp_path / "features.onnx"), batch_size=4)
    graph = session(str(tmp_path / "features.onnx"))
    assert graph.get_inputs()[0].shape == [4, 32, 32, 3]
    assert graph.get_outputs()[0].shape[-1] == 64


@pytest.mark.parametrize("calibrated", [False, True])
@pytest.mark.once  # what it checks is the ONNX side; the JAX export route is test_export.py's
def test_failed_parity_check_leaves_no_file(tmp_path, monkeypatch, calibrated):
    """The refusal names the likely cause only when it is there: an untrained model's batch norms."""
    original = export_module._set_metadata

    def tampered(onnx_model, *args):
        original(onnx_model, *args)
        for tensor in onnx_model.graph.initializer:  # double every float weight: the graph now lies
            if tensor.data_type == onnx.TensorProto.FLOAT and tensor.raw_data:
                values = onnx.numpy_helper.to_array(tensor) * 2 + 1
                tensor.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), tensor.name))

    monkeypatch.setattr(export_module, "_set_metadata", tampered)
    output = tmp_path / "bad.onnx"
    model = build_classifier(get_backbone("small_cnn"), 2, 32)
    if calibrated:
        calibrate_batch_norm(model)
    assert export_module.untrained_batch_norm(model) is not calibrated
    with pytest.raises(KbenchError, match="disagree.*no file was written") as refused:
        export_onnx(model, str(output))
    assert ("initial ones" in str(refused.value)) is not calibrated
    assert list(tmp_path.iterdir()) == []


def test_bad_models_and_opsets_are_refused(tmp_path):
    import keras

    not_a_model = tmp_path / "notes.keras"
    not_a_model.write_text("hello")
    with pytest.raises(KbenchError, match="could not be loaded as a Keras model"):
        export_onnx(str(not_a_model), str(tmp_path / "x.onnx"))
    a, b = keras.Input((8, 8, 3)), keras.Input((8, 8, 3))
    two_inputs = keras.Model([a, b], keras.layers.Add()([a, b]))
    with pytest.raises(KbenchError, match="2 inputs"):
        export_onnx(two_inputs, str(tmp_path / "x.onnx"))
    with pytest.raises(KbenchError, match="opset 99"):
        export_onnx(build_classifier(get_backbone("small_cnn"), 2, 32), str(tmp_path / "x.onnx"), opset=99)
    assert not (tmp_path / "x.onnx").exists()


def test_user_model_keeps_its_own_names(tmp_path):
    import keras

    pixels = keras.Input((16, 16, 3), name="photo")
    logits = keras.layers.Dense(3, name="logits")(keras.layers.GlobalAveragePooling2D()(pixels))
    path = str(tmp_path / "user.keras")
    keras.Model(pixels, logits).save(path)
    export_onnx(path, str(tmp_path / "user.onnx"))
    graph = session(str(tmp_path / "user.onnx"))
    assert [i.name for i in graph.get_inputs()] == ["photo"] and [o.name for o in graph.get_outputs()] == ["logits"]


def test_cli_exports_a_run_and_quantizes_it(small_cnn_run, tmp_path):
    run_dir = small_cnn_run()
    output = str(tmp_path / "out" / "run.onnx")
    done = run_cli("export", "onnx", run_dir, "-o", output, "--quantize", "int8", "--backend", BACKEND)
    assert done.returncode == 0, done.stderr
    assert "largest relative difference" in done.stdout and os.path.exists(output)
    assert json.loads(read_metadata(output)["backbones"]) == ["small_cnn"]
    if os.path.exists(str(tmp_path / "out" / "run.int8.onnx")):  # only where int8 measured faster
        assert "validation log loss" in done.stdout
        int8 = onnx.load(str(tmp_path / "out" / "run.int8.onnx"))
        assert any(node.op_type in ("QuantizeLinear", "QLinearConv") for node in int8.graph.node)
    else:
        assert "no int8 file written: " in done.stdout

    missing = run_cli("export", "onnx", str(tmp_path / "nothing"), "--backend", BACKEND)
    assert missing.returncode == 2 and "model not found" in missing.stderr and "Traceback" not in missing.stderr


# The conversion reads the same saved model under either backend (under JAX in a TensorFlow child), so
# a family's layers are converted alike: JAX runs three families whose layers differ most (squeeze-excite
# and swish, LayerNorm and GELU, hard-swish), TensorFlow all of them.
UNDER_BOTH_BACKENDS = {"efficientnet_b0", "convnext_tiny", "mobilenet_v3_small"}


@pytest.mark.heavy
@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=() if n in UNDER_BOTH_BACKENDS else pytest.mark.once) for n in sorted(FAMILIES.values())],
)
def test_every_family_exports_with_parity(name, tmp_path):
    """One model of each keras.applications family, random weights made as tame as they can be
    (settle_random_weights), at a reduced size: the pooled features (not probabilities, whose scale
    hides differences) match within 1e-4 of their scale at batch 1 and 3, under the backend the suite
    runs on."""
    spec = get_backbone(name)
    model = build_feature_extractor(spec, max(spec.min_image_size, 48))
    settle_random_weights(model)
    record = export_onnx(model, str(tmp_path / f"{name}.onnx"))
    assert record["max_relative_difference"] <= 1e-4


@pytest.mark.heavy
def test_a_real_classifier_exports_at_reduced_size(tmp_path):
    model = build_classifier(get_backbone("efficientnet_b0"), 2, 96)
    assert export_onnx(model, str(tmp_path / "b0.onnx"))["max_relative_difference"] <= 1e-4


@pytest.mark.heavy
def test_efficientnet_b0_export_reads_its_input_channels_last_with_no_pad_and_no_transpose(tmp_path):
    model = build_classifier(get_backbone("efficientnet_b0"), 2, 64)
    export_onnx(model, str(tmp_path / "b0.onnx"))
    graph = onnx.load(str(tmp_path / "b0.onnx")).graph
    kinds = [node.op_type for node in graph.node]
    assert kinds.count("GlobalAveragePool") == 17 and "Pad" not in kinds and "Transpose" not in kinds
    # the pixels are read as they are, through one Reshape (a free view): no Transpose copies them
    (reader,) = [node for node in graph.node if graph.input[0].name in node.input]
    assert reader.op_type == "Reshape"


def test_a_mixed_precision_model_exports_in_float32_and_quantizes_and_runs_in_openvino(tmp_path, class_folders):
    """A --mixed-precision run's .keras file keeps its layers' bfloat16 policies; its ONNX file is float32
    throughout (ONNX Runtime refused the mixed casts), passes parity, and int8 and OpenVINO work on it."""
    import keras

    from kbench.export.onnx import onnx_for
    from kbench.serving import quantize
    from kbench.serving.latency import LatencyConfig, iter_latency

    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = build_classifier(get_backbone("small_cnn"), 2, 32)
    finally:
        keras.config.set_dtype_policy("float32")
    settle_random_weights(model)
    path, float_path = str(tmp_path / "bf16.keras"), str(tmp_path / "bf16.onnx")
    model.save(path)
    assert model.get_layer("preprocess").dtype_policy.name == "mixed_bfloat16"
    assert onnx_for(path, float_path)["max_relative_difference"] <= 1e-4
    graph = onnx.load(float_path).graph
    assert {value.type.tensor_type.elem_type for value in [*graph.input, *graph.output]} == {onnx.TensorProto.FLOAT}
    casts = {attribute.i for node in graph.node if node.op_type == "Cast" for attribute in node.attribute}
    assert not casts & {onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT16}

    one = {"QDQ S8S8 per-channel": quantize.CANDIDATES["QDQ S8S8 per-channel"]}
    int8 = str(tmp_path / "bf16.int8.onnx")
    with pytest.MonkeyPatch.context() as patch:  # the int8 file kept whatever this machine's timings
        patch.setattr(quantize, "time_against_float", lambda paths, size: {**dict.fromkeys(paths, 1.0), "float": 2.0})
        assert quantize.quantize_int8(float_path, int8, class_folders, candidates=one)["int8_path"] == int8
    config = LatencyConfig([path, int8], ["openvino-cpu"], [1], runs=2, warmup=1, export_dir=str(tmp_path))
    rows = list(iter_latency(config))
    assert [row["status"] for row in rows] == ["ok", "ok"], rows
    assert rows[0]["parity"] <= 1e-4  # against the float32 model the file was made from
