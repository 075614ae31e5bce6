import numpy as np

from kbench.models.backbones import (
    batch_norm_layers,
    build_classifier,
    build_feature_extractor,
    feature_model,
    get_backbone,
)
from kbench.models.settle import calibrate_batch_norm, float32_sensitivity, settle_random_weights


def test_calibrate_batch_norm_gives_random_weights_normalised_activations():
    """After calibration every batch norm's moving statistics are those of its input on the
    calibration pixels, so in inference mode its output on those pixels is normalised; the momentum
    is left as it was and frozen layers keep their statistics."""
    import keras

    model = build_feature_extractor(get_backbone("small_cnn"), 32)
    frozen = model.get_layer("bn2")
    frozen.trainable = False
    assert calibrate_batch_norm(model, batch_size=8, seed=3) == 3
    pixels = np.random.default_rng(3).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    probe = keras.Model(model.inputs, [model.get_layer(f"bn{i}").output for i in range(3)])
    for index, output in enumerate(probe.predict_on_batch(pixels)):
        layer = model.get_layer(f"bn{index}")
        assert layer.momentum == 0.9
        if layer is frozen:
            assert np.all(keras.ops.convert_to_numpy(layer.moving_variance) == 1)
            continue
        assert np.abs(output.mean(axis=(0, 1, 2))).max() < 1e-3
        variance = keras.ops.convert_to_numpy(layer.moving_variance)
        np.testing.assert_allclose(output.var(axis=(0, 1, 2)), variance / (variance + layer.epsilon), rtol=1e-2)


def test_calibrate_batch_norm_runs_without_dropout():
    """The statistics are those inference sees: with dropout (rate 0.5) active during calibration, the
    next batch norm would store a variance about twice its inference input's. The rate comes back."""
    import keras

    inputs = keras.Input((8, 8, 3))
    hidden = keras.layers.Conv2D(16, 3, name="conv0")(inputs)
    hidden = keras.layers.BatchNormalization(name="bn0")(hidden)
    hidden = keras.layers.Dropout(0.5, name="drop")(hidden)
    hidden = keras.layers.Conv2D(16, 1, name="conv1")(hidden)
    model = keras.Model(inputs, keras.layers.BatchNormalization(name="bn1")(hidden))
    assert calibrate_batch_norm(model, batch_size=16, seed=4) == 2
    assert model.get_layer("drop").rate == 0.5
    pixels = np.random.default_rng(4).uniform(0, 255, (16, 8, 8, 3)).astype("float32")
    output = np.asarray(model.predict_on_batch(pixels))
    np.testing.assert_allclose(output.var(axis=(0, 1, 2)), 1.0, rtol=5e-2)


def test_compiled_calibration_matches_the_eager_pass(monkeypatch):
    """The compiled pass (tf.function / jax.jit: it frees activations as it goes) stores the statistics
    the eager call does."""
    import keras

    from kbench.models import settle

    def statistics(model):
        numpy = keras.ops.convert_to_numpy
        return [np.concatenate([numpy(n.moving_mean), numpy(n.moving_variance)]) for n in batch_norm_layers(model)]

    model = build_feature_extractor(get_backbone("small_cnn"), 32)
    initial = model.get_weights()
    calibrate_batch_norm(model, seed=6)
    compiled = statistics(model)
    model.set_weights(initial)
    monkeypatch.setattr(settle, "_compiled_training_call", lambda model, pixels: model(pixels, training=True))
    calibrate_batch_norm(model, seed=6)
    for got, expected in zip(compiled, statistics(model), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(compiled[0], statistics(build_feature_extractor(get_backbone("small_cnn"), 32))[0])


def test_settle_random_weights_keeps_the_tamer_statistics(monkeypatch):
    """Calibration is kept only when it lowers the float32 sensitivity; otherwise keras' initial
    statistics come back exactly."""
    import keras

    from kbench.models import settle

    model = build_feature_extractor(get_backbone("small_cnn"), 32)
    sensitivities = iter([1e-6, 1e-3])  # initial, then calibrated: calibration made it worse
    monkeypatch.setattr(settle, "float32_sensitivity", lambda model, seed=0: next(sensitivities))
    assert settle.settle_random_weights(model) == {"calibrated": False, "sensitivity": 1e-6}
    for index in range(3):
        layer = model.get_layer(f"bn{index}")
        assert np.all(keras.ops.convert_to_numpy(layer.moving_variance) == 1)
        assert not np.any(keras.ops.convert_to_numpy(layer.moving_mean))
    sensitivities = iter([1e-3, 1e-6])
    assert settle.settle_random_weights(model)["calibrated"] is True
    assert not np.all(keras.ops.convert_to_numpy(model.get_layer("bn0").moving_variance) == 1)


def test_float32_sensitivity_of_a_classifier_is_measured_on_its_features():
    """A random classifier's sigmoid can saturate (sensitivity 0 whatever its features do), so a
    classifier is measured where the export's parity check looks: its pooled features."""

    classifier = build_classifier(get_backbone("small_cnn"), 2, 32, "none")
    head = classifier.get_layer("probability")
    kernel, bias = head.get_weights()
    head.set_weights([kernel * 1e6, bias])  # a saturated sigmoid: the probabilities can't move
    features = float32_sensitivity(feature_model(classifier))
    assert features > 0
    assert float32_sensitivity(classifier) == features


def test_settle_random_weights_unsaturates_a_classifiers_probabilities():
    """A random head on large features gives probabilities of exactly 0 or 1 in any runtime, so an
    export's parity check on them could not fail; after settling they sit near 0.5 and differ
    between images."""
    classifier = build_classifier(get_backbone("small_cnn"), 2, 32, "none")
    head = classifier.get_layer("probability")
    kernel, bias = head.get_weights()
    head.set_weights([kernel * 1e6, bias + 1e3])
    pixels = np.random.default_rng(9).uniform(0, 255, (6, 32, 32, 3)).astype("float32")
    saturated = np.asarray(classifier.predict_on_batch(pixels))
    assert np.all(np.minimum(saturated, 1 - saturated) < 1e-6)  # JAX's sigmoid goes below 1e-7, not to 0
    settle_random_weights(classifier)
    probabilities = np.asarray(classifier.predict_on_batch(pixels)).ravel()
    assert np.all((probabilities > 0.05) & (probabilities < 0.95))
    assert np.ptp(probabilities) > 1e-4
