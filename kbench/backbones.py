"""The backbone registry (name -> BackboneSpec) and the models kbench builds from it.

Every model built here takes RGB pixels in 0..255 (float32, NHWC): each backbone's own preprocessing
is a layer inside the graph, so Keras, ONNX and ensembles all feed the same pixels.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass

from kbench.errors import KbenchError

# How pixels in 0..255 become the backbone's input.
#   "tf":   x / 127.5 - 1 (MobileNetV2, InceptionV3, Xception: keras' preprocess_input mode "tf")
#   "none": the keras.applications model rescales and normalises inside (EfficientNet)
#   "unit": x / 255 (small_cnn)
PREPROCESSING = ("tf", "none", "unit")
# The classifier's last layer. Ensembles take each member's features from this layer's input.
HEAD_LAYER = "probability"


@dataclass(frozen=True)
class BackboneSpec:
    """What differs between backbones. ``params`` counts the headless backbone with global average
    pooling, as ``keras.applications.X(include_top=False, pooling="avg").count_params()`` does at the
    native size; a test checks the figures against keras."""

    name: str
    application: str | None  # attribute of keras.applications; None for kbench's own models
    image_size: int  # native input size, pixels per side
    feature_dim: int  # width of the pooled features
    params: int
    preprocessing: str
    min_image_size: int = 32
    pretrained: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


_EFFICIENTNET = [  # (native size, feature width, params) for B0..B7
    (224, 1280, 4_049_571),
    (240, 1280, 6_575_239),
    (260, 1408, 7_768_569),
    (300, 1536, 10_783_535),
    (380, 1792, 17_673_823),
    (456, 2048, 28_513_527),
    (528, 2304, 40_960_143),
    (600, 2560, 64_097_687),
]

_SPECS = [
    BackboneSpec("mobilenet_v2", "MobileNetV2", 224, 1280, 2_257_984, "tf"),
    BackboneSpec("inception_v3", "InceptionV3", 299, 2048, 21_802_784, "tf", min_image_size=75),
    BackboneSpec("xception", "Xception", 299, 2048, 20_861_480, "tf", min_image_size=71),
    *(
        BackboneSpec(f"efficientnet_b{i}", f"EfficientNetB{i}", size, dim, params, "none")
        for i, (size, dim, params) in enumerate(_EFFICIENTNET)
    ),
    # A small plain CNN that learns from scratch in seconds: for tests and the offline demo.
    BackboneSpec("small_cnn", None, 64, 64, 60_848, "unit", min_image_size=16, pretrained=False),
]
REGISTRY: dict[str, BackboneSpec] = {spec.name: spec for spec in _SPECS}


def list_backbones() -> list[BackboneSpec]:
    return list(REGISTRY.values())


def get_backbone(name: str) -> BackboneSpec:
    """The spec registered under ``name``; an unknown name raises KbenchError listing valid ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KbenchError(f"unknown backbone {name!r}; choose one of: {', '.join(REGISTRY)}") from None


def weights_kind(weights: str) -> str:
    """Classify a ``--weights`` value: "none", "imagenet", "model" (a whole classifier's weights:
    ``.keras`` or ``.weights.h5``) or "backbone" (a headless backbone weight file such as
    keras' ``*_notop.h5``)."""
    if weights in ("none", "imagenet"):
        return weights
    if not os.path.isfile(weights):
        raise KbenchError(f"weights file not found: {weights} (use imagenet, none or a file path)")
    if weights.endswith(".keras") or weights.endswith(".weights.h5"):
        return "model"
    if weights.endswith(".h5"):
        return "backbone"
    raise KbenchError(
        f"unsupported weights file {weights}: expected a .keras model, a .weights.h5 file of a "
        "kbench model, or a keras.applications .h5 backbone file"
    )


def build_feature_extractor(spec: BackboneSpec, image_size: int | None = None, weights: str = "none"):
    """Headless backbone with global average pooling: pixels 0..255 -> ``spec.feature_dim`` features.

    >>> extractor = build_feature_extractor(get_backbone("small_cnn"), 32)
    """
    import keras
    from keras import layers

    image_size = image_size or spec.image_size
    if image_size < spec.min_image_size:
        raise KbenchError(f"{spec.name} needs images of at least {spec.min_image_size} px; got {image_size}")
    image = keras.Input((image_size, image_size, 3), name="image", dtype="float32")
    kind = weights_kind(weights)
    if kind == "model":
        kind = "none"  # the caller loads whole-model weights after building
    if spec.application is None:
        if kind != "none":
            raise KbenchError(f"{spec.name} has no pretrained weights; use --weights none or a .keras file")
        return _small_cnn(image, spec.name)
    app_weights = {"none": None, "imagenet": "imagenet", "backbone": weights}[kind]
    x = image
    if spec.preprocessing == "tf":
        x = layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess")(x)
    constructor = getattr(keras.applications, spec.application)
    try:
        # input_tensor makes the application's graph start at our input: one flat model.
        return constructor(
            include_top=False,
            weights=app_weights,
            input_tensor=x,
            input_shape=(image_size, image_size, 3),  # picks the weight file made for this size
            pooling="avg",
        )
    except Exception as error:  # keras raises bare Exception for a failed download
        if kind == "imagenet":
            raise KbenchError(_imagenet_failure(spec, error)) from None
        if kind == "backbone":
            raise KbenchError(f"could not load backbone weights from {weights}: {error}") from None
        raise


def _imagenet_failure(spec: BackboneSpec, error: Exception) -> str:
    keras_home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    folder = os.path.join(keras_home, "models")
    url = re.search(r"https?://\S+?\.h5", str(error))
    if url:
        return (
            f"ImageNet weights for {spec.name} could not be downloaded; put "
            f"{os.path.basename(url.group(0))} (from {url.group(0)}) in {folder}/ "
            "or use --weights none"
        )
    return f"ImageNet weights for {spec.name} could not be loaded ({error}); see {folder}/"


def _small_cnn(image, name: str):
    import keras
    from keras import layers

    x = layers.Rescaling(1 / 255.0, name="preprocess")(image)
    for index, width in enumerate((16, 32, 64)):
        x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{index}")(x)
        # momentum 0.9: the running statistics settle within the few steps a tiny set gives
        x = layers.BatchNormalization(momentum=0.9, name=f"bn{index}")(x)
        x = layers.ReLU(name=f"relu{index}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{index}")(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu", name="conv3")(x)
    features = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(image, features, name=name)


def build_classifier(
    spec: BackboneSpec,
    num_classes: int,
    image_size: int | None = None,
    weights: str = "none",
    freeze_backbone: bool = False,
):
    """The reference study's model: backbone, global average pooling, one dense head named
    ``probability`` (one sigmoid unit for two classes, softmax for more).

    ``weights``: "none", "imagenet", a backbone ``.h5`` file, or a ``.keras`` / ``.weights.h5`` of
    the same classifier (loaded into the whole model).
    """
    import keras
    from keras import layers

    if num_classes < 2:
        raise KbenchError("a classifier needs at least two classes")
    extractor = build_feature_extractor(spec, image_size, weights)
    extractor.trainable = not freeze_backbone
    image = extractor.inputs[0]
    units, activation = (1, "sigmoid") if num_classes == 2 else (num_classes, "softmax")
    # float32 head and loss whatever the compute dtype (mixed precision)
    probability = layers.Dense(units, activation=activation, name=HEAD_LAYER, dtype="float32")(extractor.outputs[0])
    model = keras.Model(image, probability, name=f"{spec.name}_classifier")
    if weights not in ("none", "imagenet") and weights_kind(weights) == "model":
        _load_model_weights(model, weights)
    return model


def feature_model(classifier):
    """The part of a kbench classifier (or member of an ensemble) that yields pooled features: the
    model up to its ``HEAD_LAYER``'s input."""
    import keras

    try:
        head = classifier.get_layer(HEAD_LAYER)
    except ValueError:
        raise KbenchError(f"{classifier.name} has no {HEAD_LAYER!r} layer; is it a kbench classifier?") from None
    return keras.Model(classifier.inputs, head.input, name=f"{classifier.name}_features")


def _load_model_weights(model, path: str) -> None:
    import keras

    try:
        if path.endswith(".keras"):
            source = keras.saving.load_model(path, compile=False, safe_mode=True)
            model.set_weights(source.get_weights())
        else:
            model.load_weights(path)
    except Exception as error:
        raise KbenchError(f"weights in {path} don't fit this model: {error}") from None
