import json
import re
import urllib.error

import numpy as np
import pytest

from kbench.core.errors import KbenchError
from kbench.models.backbones import (
    REGISTRY,
    build_classifier,
    build_feature_extractor,
    count_flops,
    get_backbone,
    list_backbones,
    load_model,
)

from conftest import BACKEND, FAMILIES, run_cli

NATIVE = {
    "mobilenet_v2": 224,
    "inception_v3": 299,
    "xception": 299,
    "efficientnet_b0": 224,
    "efficientnet_b1": 240,
    "efficientnet_b2": 260,
    "efficientnet_b3": 300,
    "efficientnet_b4": 380,
    "efficientnet_b5": 456,
    "efficientnet_b6": 528,
    "efficientnet_b7": 600,
}


def test_registry_has_the_study_backbones_at_native_sizes():
    assert {name: REGISTRY[name].image_size for name in NATIVE} == NATIVE
    assert "small_cnn" in REGISTRY


def test_unknown_backbone_lists_the_valid_names():
    with pytest.raises(KbenchError, match="unknown backbone 'resnet51'.*efficientnet_b7.*small_cnn"):
        get_backbone("resnet51")
    for typed, meant in (
        ("ResNet50V2", "resnet50_v2"),
        ("efficientnetv2_s", "efficientnet_v2_s"),
        ("convnext-tiny", "convnext_tiny"),
    ):
        with pytest.raises(KbenchError, match=f"did you mean {meant}\\?"):
            get_backbone(typed)
    with pytest.raises(KbenchError) as error:
        get_backbone("foo")
    assert "did you mean" not in str(error.value)


def test_small_cnn_registry_figures_match_the_model():
    spec = get_backbone("small_cnn")
    extractor = build_feature_extractor(spec, 32)
    assert extractor.count_params() == spec.params
    assert extractor.output_shape == (None, spec.feature_dim)


def test_classifier_heads_and_in_graph_preprocessing():
    spec = get_backbone("small_cnn")
    binary = build_classifier(spec, 2, 32)
    assert binary.output_shape == (None, 1) and binary.input_shape == (None, 32, 32, 3)
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    probability = np.asarray(binary.predict_on_batch(pixels))
    assert np.all((probability > 0) & (probability < 1))
    softmax = build_classifier(spec, 5, 32)
    assert np.allclose(np.asarray(softmax.predict_on_batch(pixels)).sum(axis=1), 1, atol=1e-5)
    frozen = build_classifier(spec, 2, 32, freeze_backbone=True)
    assert [w.path for w in frozen.trainable_weights] == ["probability/kernel", "probability/bias"]


def test_imagenet_download_failure_names_the_file_and_folder(monkeypatch, tmp_path):
    import keras.src.utils.file_utils as file_utils

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(file_utils, "urlretrieve", offline)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(KbenchError) as error:
        build_feature_extractor(get_backbone("mobilenet_v2"), 96, weights="imagenet")
    message = str(error.value)
    assert "\n" not in message
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5" in message
    assert f"{tmp_path}/models/" in message


def test_mobilenet_v2_builds_small():
    model = build_classifier(get_backbone("mobilenet_v2"), 2, 32)
    assert model.output_shape == (None, 1)


KERAS_APPLICATIONS = [spec for spec in REGISTRY.values() if spec.application]
TF_ONLY = pytest.mark.skipif(BACKEND != "tensorflow", reason="backend-independent figures; TF builds models 16x faster")


def test_registry_covers_every_keras_application_with_todays_names():
    import keras

    constructors = {name for name in dir(keras.applications) if name[0].isupper()}
    assert {spec.application for spec in KERAS_APPLICATIONS} == constructors and len(constructors) == 40
    assert len(REGISTRY) == 41
    for spec in KERAS_APPLICATIONS:  # snake case, "_" before a version or size word: EfficientNetV2B0
        words = re.findall(r"V\d+|[A-Z][a-z]+|[A-Z]+(?![a-z])|\d+|[a-z]+", spec.application)
        assert spec.name.replace("_", "") == "".join(words).lower(), spec.name


@TF_ONLY
def test_registry_sizes_match_what_each_constructor_declares(monkeypatch):
    """Native and minimum sizes as each constructor declares them (caught where it asks
    imagenet_utils for its input shape, before it builds anything)."""
    import keras
    from keras.src.applications import imagenet_utils

    class Declared(Exception):
        pass

    def declared(input_shape, default_size, min_size, *args, **kwargs):
        raise Declared(default_size, min_size)

    monkeypatch.setattr(imagenet_utils, "obtain_input_shape", declared)
    for spec in KERAS_APPLICATIONS:
        if spec.module == "mobilenet_v3":  # sizes its input itself; its weights are the 224 px ones
            assert (spec.image_size, spec.min_image_size) == (224, 32)
            continue
        with pytest.raises(Declared) as sizes:
            getattr(keras.applications, spec.application)(include_top=False, weights=None)
        assert (spec.name, *sizes.value.args) == (spec.name, spec.image_size, spec.min_image_size)


@TF_ONLY
@pytest.mark.heavy
def test_registry_params_flops_match_keras_applications_at_full_size():
    """Parameters, feature width and GFLOPs of all 40 models built at their native size (a minute and
    a half: the heavy tier; the papers' figures for two of them are checked in the gate)."""
    import keras

    for spec in KERAS_APPLICATIONS:
        size = (spec.image_size, spec.image_size, 3)
        model = getattr(keras.applications, spec.application)(
            include_top=False, weights=None, pooling="avg", input_shape=size
        )
        figures = (model.count_params(), model.output_shape[-1], round(count_flops(model) / 1e9, 2))
        assert (spec.name, *figures) == (spec.name, spec.params, spec.feature_dim, spec.gflops)
        keras.backend.clear_session()


@TF_ONLY
@pytest.mark.parametrize("name, paper_gmacs", [("resnet50", 4.1), ("efficientnet_b0", 0.39)])
def test_flops_agree_with_the_papers(name, paper_gmacs):
    """count_flops against figures it did not make: He et al. 2016 (ResNet-50, 4.1 GMACs with its
    1000-class layer, 2 MMACs) and Tan & Le 2019 (EfficientNet-B0, 0.39 GMACs), at 224 px."""
    import keras

    spec = get_backbone(name)
    model = getattr(keras.applications, spec.application)(
        include_top=False, weights=None, pooling="avg", input_shape=(224, 224, 3)
    )
    gmacs = count_flops(model) / 2e9
    assert gmacs == pytest.approx(paper_gmacs, rel=0.07) and spec.gflops == round(2 * gmacs, 2)
    keras.backend.clear_session()


@TF_ONLY
@pytest.mark.parametrize(
    "name",
    [pytest.param(s.name, marks=() if s.name in FAMILIES.values() else pytest.mark.heavy) for s in KERAS_APPLICATIONS],
)
def test_in_graph_preprocessing_equals_keras_preprocess_input(name):
    """kbench's model on pixels == the keras.applications model, with the same weights, on
    keras.applications.<module>.preprocess_input(pixels): ImageNet weights see what they were made on."""
    import importlib

    import keras

    spec = get_backbone(name)
    size = max(spec.min_image_size, 32)
    ours = build_feature_extractor(spec, size)
    theirs = getattr(keras.applications, spec.application)(
        include_top=False, weights=None, pooling="avg", input_shape=(size, size, 3)
    )
    theirs.set_weights(ours.get_weights())
    pixels = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype("float32")
    module = importlib.import_module(f"keras.applications.{spec.module}")
    # eager calls: tracing a predict function for each of 80 models would triple the test's time
    expected = keras.ops.convert_to_numpy(theirs(module.preprocess_input(pixels.copy()), training=False))
    got = keras.ops.convert_to_numpy(ours(pixels, training=False))
    scale = max(float(np.max(np.abs(expected))), 1e-6)
    assert float(np.max(np.abs(got - expected))) / scale <= 1e-5
    keras.backend.clear_session()


@pytest.mark.parametrize("mode", ["caffe", "torch"])
def test_preprocessing_layer_is_keras_arithmetic_and_has_no_weights(mode, tmp_path):
    import keras
    from keras.applications import imagenet_utils

    from kbench.models.layers import ImageNetPreprocessing

    pixels = np.random.default_rng(1).uniform(0, 255, (3, 5, 7, 3)).astype("float32")
    layer = ImageNetPreprocessing(mode)
    got = np.asarray(layer(pixels))
    expected = imagenet_utils.preprocess_input(pixels.copy(), mode=mode)
    assert np.allclose(got, expected, rtol=0, atol=1e-5) and layer.weights == []
    model = keras.Sequential([keras.Input((5, 7, 3)), ImageNetPreprocessing(mode)])
    model.save(tmp_path / "m.keras")
    loaded = load_model(str(tmp_path / "m.keras"))  # registered: loads with safe_mode
    assert np.allclose(np.asarray(loaded.predict_on_batch(pixels)), got, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="mode must be one of"):
        ImageNetPreprocessing("tf")


def test_list_backbones_filters_with_shell_patterns():
    assert [s.name for s in list_backbones("convnext_*")] == [
        "convnext_tiny",
        "convnext_small",
        "convnext_base",
        "convnext_large",
        "convnext_xlarge",
    ]
    assert [s.name for s in list_backbones("resnet*_v2")] == ["resnet50_v2", "resnet101_v2", "resnet152_v2"]
    assert list_backbones("nope*") == [] and len(list_backbones()) == 41


def test_backbones_command_prints_table_and_json():
    table = run_cli("backbones")
    assert table.returncode == 0 and "efficientnet_b7" in table.stdout and "600" in table.stdout
    rows = json.loads(run_cli("backbones", "--format", "json").stdout)
    by_name = {row["name"]: row for row in rows}
    assert by_name["efficientnet_b3"]["image_size"] == 300 and by_name["xception"]["feature_dim"] == 2048
    assert by_name["mobilenet_v2"]["params"] == 2_257_984 and len(rows) == 41
    assert by_name["resnet50"]["preprocessing"] == "caffe" and by_name["convnext_tiny"]["gflops"] == 8.53
    some = run_cli("backbones", "efficientnet_v2_[sml]")
    names = [line.split("|")[1].strip() for line in some.stdout.splitlines() if line.startswith("| eff")]
    assert names == ["efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l"]
    none = run_cli("backbones", "efficientnet_v3*")
    assert none.returncode == 2 and none.stderr.strip() == (
        "kbench: error: no backbone matches 'efficientnet_v3*'; kbench backbones lists them all"
    )
