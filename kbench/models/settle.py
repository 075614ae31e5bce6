"""Random weights made numerically tame, for the models that stand in for trained ones (latency of a
backbone name, the benchmarks, export tests): batch-norm statistics calibrated on random pixels where
that helps (``calibrate_batch_norm``, judged by ``float32_sensitivity``) and a classifier head scaled off
saturation (``centre_head``); ``settle_random_weights`` does both. Trained and ImageNet weights need none
of this.
"""

from __future__ import annotations

from kbench.core.backend import full_float32
from kbench.models.backbones import HEAD_LAYER, all_layers, batch_norm_layers, feature_model


def calibrate_batch_norm(model, batch_size: int = 4, seed: int = 0) -> int:
    """Give a randomly initialised model the batch-norm statistics a trained one has: each
    BatchNormalization's moving mean and variance become those of its input on seeded random pixels,
    so every layer sees normalised activations. Returns how many layers were set.

    Why: with keras' initial statistics (mean 0, variance 1) nothing is normalised, activations grow
    layer after layer and float32 rounding grows with them. EfficientNetV2-M at 480 px reaches
    5.6e5, and Keras' own float32 result is then 0.92 of that scale away from its float64 result:
    no comparison of two float32 runtimes (the export's parity check) can pass or mean anything.
    Trained (and ImageNet) weights don't have this. Calibration is not always the tamer choice:
    ``settle_random_weights`` decides, for the random models that stand in for trained ones.

    One forward pass in training mode with momentum 0 does it: in training mode each layer
    normalises with the batch's statistics, which momentum 0 then stores as the moving ones. Frozen
    layers (``trainable=False``) run in inference mode and keep theirs. Dropout is off meanwhile (the
    statistics are those inference sees), and the pass is compiled (``_compiled_training_call``).

    >>> from kbench.models.backbones import build_feature_extractor, get_backbone
    >>> model = build_feature_extractor(get_backbone("small_cnn"), 32)
    >>> calibrate_batch_norm(model)
    3
    """
    import keras
    import numpy as np

    norms = batch_norm_layers(model)
    if not norms:
        return 0
    shape = tuple(model.inputs[0].shape[1:])
    pixels = np.random.default_rng(seed).uniform(0, 255, (batch_size, *shape)).astype("float32")
    momenta = [layer.momentum for layer in norms]
    dropouts = [layer for layer in all_layers(model) if isinstance(layer, keras.layers.Dropout)]
    rates = [layer.rate for layer in dropouts]
    try:
        for layer in norms:
            layer.momentum = 0.0
        for layer in dropouts:  # statistics of what inference will see, not of dropped-out activations
            layer.rate = 0.0
        _compiled_training_call(model, pixels)
    finally:
        for layer, momentum in zip(norms, momenta):
            layer.momentum = momentum
        for layer, rate in zip(dropouts, rates):
            layer.rate = rate
    return len(norms)


def _compiled_training_call(model, pixels) -> None:
    """``model(pixels, training=True)`` for its state updates, compiled (tf.function / jax.jit) so that
    each activation is freed after its last use: called eagerly, a keras functional model holds every
    layer's output until the call returns (EfficientNet-B7 at 600 px, 4 images: 17.6 GB resident here;
    compiled, 2.1 GB; the statistics agree with the eager pass within 1e-6)."""
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.function(lambda batch: model(batch, training=True), autograph=False)(pixels)
    elif keras.backend.backend() == "jax":
        import jax

        trainable = [variable.value for variable in model.trainable_variables]
        states = [variable.value for variable in model.non_trainable_variables]

        def forward(trainable, states, batch):
            return model.stateless_call(trainable, states, batch, training=True)[1]

        for variable, value in zip(model.non_trainable_variables, jax.jit(forward)(trainable, states, pixels)):
            variable.assign(value)
    else:
        model(pixels, training=True)


def float32_sensitivity(model, seed: int = 0) -> float:
    """How far the model's output moves, relative to its scale, when its input moves by one part in a
    million: float32 rounding inside the model moves the output by about this much times 1e-1
    (rounding is ~6e-8 a step). A trained model gives ~1e-6 or less; a chaotic random one, far more.
    A kbench classifier is measured on its pooled features (``feature_model``), as the export's
    parity check is: a random model's sigmoid saturates at exactly 0 or 1, where every model would
    look perfectly tame."""
    import numpy as np

    if any(layer.name == HEAD_LAYER for layer in model.layers):
        model = feature_model(model)
    shape = tuple(model.inputs[0].shape[1:])
    pixels = np.random.default_rng(seed + 1).uniform(1, 255, (2, *shape)).astype("float32")
    with full_float32():  # TF32's rounding (1e-3 on Ampere and newer GPUs) would swamp a 1e-6 move
        first = np.asarray(model.predict_on_batch(pixels), dtype="float64")
        moved = np.asarray(model.predict_on_batch(pixels * np.float32(1 + 1e-6)), dtype="float64")
    scale = max(float(np.max(np.abs(first))), 1e-30)
    if not (np.all(np.isfinite(first)) and np.all(np.isfinite(moved))):
        return float("inf")
    return float(np.max(np.abs(moved - first))) / scale


def settle_random_weights(model, seed: int = 0) -> dict:
    """Make a model with random weights (a stand-in for trained ones: latency, benchmarks, export
    tests) as numerically tame as it can be, since an export's parity check can't pass on a model
    whose own float32 result is noise. Of keras' initial batch-norm statistics and
    ``calibrate_batch_norm``'s, keeps the one with the lower ``float32_sensitivity``: neither is good
    everywhere (measured against float64 Keras: EfficientNetV2-M at 480 px is 0.92 of its scale off
    with the initial statistics and 1.4e-6 calibrated; ResNet-101 at 224 px is fine with the initial
    ones and 2.7e-4 off calibrated, deep random BN-ReLU stacks amplifying perturbations).
    A kbench classifier's head is then scaled (``centre_head``) so that its probabilities on random
    pixels are not saturated at exactly 0 or 1, where a parity check compares nothing.
    Returns {"calibrated": bool, "sensitivity": float}.

    >>> from kbench.models.backbones import build_feature_extractor, get_backbone
    >>> settle_random_weights(build_feature_extractor(get_backbone("small_cnn"), 32))["sensitivity"] < 1e-4
    True
    """
    import keras

    norms = batch_norm_layers(model)
    initial = float32_sensitivity(model, seed)
    settled = {"calibrated": False, "sensitivity": initial}
    if norms:
        numpy = keras.ops.convert_to_numpy
        saved = [(numpy(n.moving_mean), numpy(n.moving_variance)) for n in norms]
        calibrate_batch_norm(model, seed=seed)
        calibrated = float32_sensitivity(model, seed)
        if calibrated <= initial:
            settled = {"calibrated": True, "sensitivity": calibrated}
        else:
            for layer, (mean, variance) in zip(norms, saved):
                layer.moving_mean.assign(mean)
                layer.moving_variance.assign(variance)
    if any(layer.name == HEAD_LAYER for layer in model.layers):
        centre_head(model, seed)
    return settled


def centre_head(classifier, seed: int = 0) -> None:
    """Scale a random classifier's head so that its logits on seeded random pixels have mean 0 and
    root mean square 1 (before centring): its probabilities then sit near 0.5 and move with the
    features. A random head on large pooled features puts them at exactly 0 or 1, the same in any
    runtime, however wrong the graph that computed the features."""
    import numpy as np

    head = classifier.get_layer(HEAD_LAYER)
    shape = tuple(classifier.inputs[0].shape[1:])
    pixels = np.random.default_rng(seed + 2).uniform(0, 255, (4, *shape)).astype("float32")
    features = np.asarray(feature_model(classifier).predict_on_batch(pixels), dtype="float64")
    kernel, bias = (np.asarray(w, dtype="float64") for w in head.get_weights())
    logits = features @ kernel
    scale = np.sqrt(np.mean(logits**2, axis=0))
    scale[~(np.isfinite(scale) & (scale > 0))] = 1.0
    kernel = kernel / scale
    bias = -np.mean(features @ kernel, axis=0)
    head.set_weights([kernel.astype("float32"), bias.astype("float32")])
