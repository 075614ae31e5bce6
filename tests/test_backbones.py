import json
import urllib.error

import numpy as np
import pytest

from kbench.backbones import REGISTRY, build_classifier, build_feature_extractor, get_backbone
from kbench.errors import KbenchError

from conftest import BACKEND, run_cli

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
    with pytest.raises(KbenchError, match="unknown backbone 'resnet50'.*efficientnet_b7.*small_cnn"):
        get_backbone("resnet50")


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


@pytest.mark.skipif(BACKEND != "tensorflow", reason="counts don't depend on the backend; TF builds them 16x faster")
def test_registry_parameter_counts_equal_keras_applications():
    import keras

    for spec in REGISTRY.values():
        if spec.application is None:
            continue
        model = getattr(keras.applications, spec.application)(include_top=False, weights=None, pooling="avg")
        assert (spec.name, model.count_params(), model.output_shape[-1]) == (spec.name, spec.params, spec.feature_dim)


def test_backbones_command_prints_table_and_json():
    table = run_cli("backbones")
    assert table.returncode == 0 and "efficientnet_b7" in table.stdout and "600" in table.stdout
    rows = json.loads(run_cli("backbones", "--format", "json").stdout)
    by_name = {row["name"]: row for row in rows}
    assert by_name["efficientnet_b3"]["image_size"] == 300 and by_name["xception"]["feature_dim"] == 2048
    assert by_name["mobilenet_v2"]["params"] == 2_257_984
