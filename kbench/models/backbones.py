"""The backbone registry (name -> BackboneSpec) and the models kbench builds from it.

Every model built here takes RGB pixels in 0..255 (float32, NHWC): each backbone's own preprocessing
is a layer inside the graph, so Keras, ONNX and ensembles all feed the same pixels.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from dataclasses import asdict, dataclass

from kbench.core.errors import KbenchError, first_line

# How pixels in 0..255 become what the backbone's ImageNet weights were made on (keras.applications'
# ``preprocess_input`` of the backbone's module, done inside the graph):
#   "tf":      x / 127.5 - 1 (MobileNet, MobileNetV2, InceptionV3, InceptionResNetV2, Xception,
#              NASNet, ResNetV2)
#   "caffe":   RGB -> BGR, minus the ImageNet mean (ResNet, VGG)
#   "torch":   x / 255, minus the ImageNet mean, over its deviation (DenseNet)
#   "builtin": the keras.applications model rescales and normalises inside, and its preprocess_input
#              passes pixels through (EfficientNet, EfficientNetV2, ConvNeXt, MobileNetV3)
#   "unit":    x / 255 (small_cnn)
# The classifier's last layer. Ensembles take each member's features from this layer's input.
HEAD_LAYER = "probability"


@dataclass(frozen=True)
class BackboneSpec:
    """What differs between backbones. ``params`` counts the headless backbone with global average
    pooling at the native size, as ``keras.applications.X(include_top=False, pooling="avg",
    input_shape=(size, size, 3)).count_params()`` does; ``gflops`` is ``count_flops`` of that model
    (2 x the multiply-adds of its convolutions and dense layers at batch 1). A test recomputes both,
    and the feature width, from keras for every entry."""

    name: str
    application: str | None  # attribute of keras.applications; None for kbench's own models
    module: str | None  # the keras.applications module whose preprocess_input the weights expect
    image_size: int  # native input size, pixels per side: the size its ImageNet weights were made for
    feature_dim: int  # width of the pooled features
    params: int
    gflops: float
    preprocessing: str
    min_image_size: int = 32
    pretrained: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def _spec(name, application, module, size, features, params, gflops, preprocessing, min_size=32) -> BackboneSpec:
    return BackboneSpec(name, application, module, size, features, params, gflops, preprocessing, min_size)


# One line a model: name, keras.applications constructor and module, native size, feature width,
# headless parameters, GFLOPs at the native size, preprocessing, minimum size.
_SPECS = [
    _spec("convnext_tiny", "ConvNeXtTiny", "convnext", 224, 768, 27_820_128, 8.53, "builtin"),
    _spec("convnext_small", "ConvNeXtSmall", "convnext", 224, 768, 49_454_688, 16.99, "builtin"),
    _spec("convnext_base", "ConvNeXtBase", "convnext", 224, 1024, 87_566_464, 30.05, "builtin"),
    _spec("convnext_large", "ConvNeXtLarge", "convnext", 224, 1536, 196_230_336, 67.27, "builtin"),
    _spec("convnext_xlarge", "ConvNeXtXLarge", "convnext", 224, 2048, 348_147_968, 119.29, "builtin"),
    _spec("densenet121", "DenseNet121", "densenet", 224, 1024, 7_037_504, 5.67, "torch"),
    _spec("densenet169", "DenseNet169", "densenet", 224, 1664, 12_642_880, 6.72, "torch"),
    _spec("densenet201", "DenseNet201", "densenet", 224, 1920, 18_321_984, 8.58, "torch"),
    _spec("efficientnet_b0", "EfficientNetB0", "efficientnet", 224, 1280, 4_049_571, 0.77, "builtin"),
    _spec("efficientnet_b1", "EfficientNetB1", "efficientnet", 240, 1280, 6_575_239, 1.37, "builtin"),
    _spec("efficientnet_b2", "EfficientNetB2", "efficientnet", 260, 1408, 7_768_569, 1.98, "builtin"),
    _spec("efficientnet_b3", "EfficientNetB3", "efficientnet", 300, 1536, 10_783_535, 3.65, "builtin"),
    _spec("efficientnet_b4", "EfficientNetB4", "efficientnet", 380, 1792, 17_673_823, 8.78, "builtin"),
    _spec("efficientnet_b5", "EfficientNetB5", "efficientnet", 456, 2048, 28_513_527, 20.53, "builtin"),
    _spec("efficientnet_b6", "EfficientNetB6", "efficientnet", 528, 2304, 40_960_143, 38.13, "builtin"),
    _spec("efficientnet_b7", "EfficientNetB7", "efficientnet", 600, 2560, 64_097_687, 75.49, "builtin"),
    _spec("efficientnet_v2_b0", "EfficientNetV2B0", "efficientnet_v2", 224, 1280, 5_919_312, 1.43, "builtin"),
    _spec("efficientnet_v2_b1", "EfficientNetV2B1", "efficientnet_v2", 240, 1280, 6_931_124, 2.39, "builtin"),
    _spec("efficientnet_v2_b2", "EfficientNetV2B2", "efficientnet_v2", 260, 1408, 8_769_374, 3.39, "builtin"),
    _spec("efficientnet_v2_b3", "EfficientNetV2B3", "efficientnet_v2", 300, 1536, 12_930_622, 6.02, "builtin"),
    _spec("efficientnet_v2_s", "EfficientNetV2S", "efficientnet_v2", 384, 1280, 20_331_360, 16.73, "builtin"),
    _spec("efficientnet_v2_m", "EfficientNetV2M", "efficientnet_v2", 480, 1280, 53_150_388, 49.16, "builtin"),
    _spec("efficientnet_v2_l", "EfficientNetV2L", "efficientnet_v2", 480, 1280, 117_746_848, 112.16, "builtin"),
    _spec("inception_resnet_v2", "InceptionResNetV2", "inception_resnet_v2", 299, 1536, 54_336_736, 26.31, "tf", 75),
    _spec("inception_v3", "InceptionV3", "inception_v3", 299, 2048, 21_802_784, 11.42, "tf", 75),
    _spec("mobilenet", "MobileNet", "mobilenet", 224, 1024, 3_228_864, 1.14, "tf"),
    _spec("mobilenet_v2", "MobileNetV2", "mobilenet_v2", 224, 1280, 2_257_984, 0.6, "tf"),
    _spec("mobilenet_v3_small", "MobileNetV3Small", "mobilenet_v3", 224, 576, 939_120, 0.11, "builtin"),
    _spec("mobilenet_v3_large", "MobileNetV3Large", "mobilenet_v3", 224, 960, 2_996_352, 0.43, "builtin"),
    _spec("nasnet_mobile", "NASNetMobile", "nasnet", 224, 1056, 4_269_716, 1.13, "tf"),
    _spec("nasnet_large", "NASNetLarge", "nasnet", 331, 4032, 84_916_818, 47.56, "tf"),
    _spec("resnet50", "ResNet50", "resnet", 224, 2048, 23_587_712, 7.71, "caffe"),
    _spec("resnet101", "ResNet101", "resnet", 224, 2048, 42_658_176, 15.14, "caffe"),
    _spec("resnet152", "ResNet152", "resnet", 224, 2048, 58_370_944, 22.56, "caffe"),
    _spec("resnet50_v2", "ResNet50V2", "resnet_v2", 224, 2048, 23_564_800, 6.96, "tf"),
    _spec("resnet101_v2", "ResNet101V2", "resnet_v2", 224, 2048, 42_626_560, 14.38, "tf"),
    _spec("resnet152_v2", "ResNet152V2", "resnet_v2", 224, 2048, 58_331_648, 21.81, "tf"),
    _spec("vgg16", "VGG16", "vgg16", 224, 512, 14_714_688, 30.69, "caffe"),
    _spec("vgg19", "VGG19", "vgg19", 224, 512, 20_024_384, 39.02, "caffe"),
    _spec("xception", "Xception", "xception", 299, 2048, 20_861_480, 16.71, "tf", 71),
    # A small plain CNN that learns from scratch in seconds: for tests and the offline demo.
    BackboneSpec("small_cnn", None, None, 64, 64, 60_848, 0.03, "unit", min_image_size=16, pretrained=False),
]
REGISTRY: dict[str, BackboneSpec] = {spec.name: spec for spec in _SPECS}


def list_backbones(pattern: str | None = None) -> list[BackboneSpec]:
    """The registered backbones whose names match the shell ``pattern`` (all without one), like
    timm's ``list_models``.

    >>> [spec.name for spec in list_backbones("efficientnet_v2_b*")]
    ['efficientnet_v2_b0', 'efficientnet_v2_b1', 'efficientnet_v2_b2', 'efficientnet_v2_b3']
    """
    return [spec for spec in REGISTRY.values() if pattern is None or fnmatch.fnmatchcase(spec.name, pattern)]


def count_flops(model) -> int:
    """Floating-point operations of one image through ``model``: 2 x the multiply-adds of its
    convolutions (plain, grouped, depthwise, separable) and dense layers, the convention of the
    papers and of timm's tables; normalisation, activations and pooling are not counted.

    >>> count_flops(build_feature_extractor(get_backbone("small_cnn"), 32))
    6782976
    """
    from keras import layers

    multiply_adds = 0
    for layer in model.layers:
        if not isinstance(layer, layers.Conv2D | layers.DepthwiseConv2D | layers.SeparableConv2D | layers.Dense):
            continue
        output = layer.output.shape
        positions = math.prod(output[1:-1])  # spatial positions (1 for a dense layer on vectors)
        inputs = layer.input.shape[-1]
        if isinstance(layer, layers.SeparableConv2D):
            depthwise = inputs * layer.depth_multiplier
            multiply_adds += positions * depthwise * (math.prod(layer.kernel_size) + output[-1])
        elif isinstance(layer, layers.DepthwiseConv2D):
            multiply_adds += positions * output[-1] * math.prod(layer.kernel_size)
        elif isinstance(layer, layers.Conv2D):
            multiply_adds += positions * output[-1] * math.prod(layer.kernel_size) * inputs // layer.groups
        else:
            multiply_adds += positions * output[-1] * inputs
    return 2 * multiply_adds


def get_backbone(name: str) -> BackboneSpec:
    """The spec registered under ``name``; an unknown name raises KbenchError listing valid ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        pass
    import difflib

    # keras' own spelling (ResNet50V2, EfficientNetV2S) and near misses point at the registered name
    by_constructor = {spec.application.lower(): spec.name for spec in REGISTRY.values() if spec.application}
    guess = by_constructor.get(name.replace("_", "").lower()) or next(
        iter(difflib.get_close_matches(name.lower(), list(REGISTRY), n=1, cutoff=0.8)), None
    )
    hint = f"did you mean {guess}? " if guess else ""
    raise KbenchError(f"unknown backbone {name!r}; {hint}kbench backbones lists all: {', '.join(REGISTRY)}")


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
    elif spec.preprocessing in ("caffe", "torch"):
        from kbench.models.layers import ImageNetPreprocessing

        x = ImageNetPreprocessing(spec.preprocessing, name="preprocess")(x)
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


def batch_norm_layers(model) -> list:
    """Every BatchNormalization layer of ``model``, nested models' included."""
    import keras

    return [layer for layer in all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]


def all_layers(model):
    """Every layer of ``model``, nested models' layers included."""
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from all_layers(layer)


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


def check_model_file(path: str) -> None:
    """KbenchError in one line for a file that can't be a ``.keras`` model (not a zip archive), before
    anything is loaded."""
    import zipfile

    if os.path.isfile(path) and not zipfile.is_zipfile(path):
        raise KbenchError(f"{path} could not be loaded as a Keras model: not a zip archive, as .keras files are")


def load_model(path: str, compile: bool = False):
    """A ``.keras`` file kbench wrote (or any Keras model file), loaded with ``safe_mode=True`` and
    kbench's own layers registered; a file that isn't one raises KbenchError in one line."""
    import keras

    import kbench.models.layers  # noqa: F401  (registers ImageNetPreprocessing for deserialisation)

    check_model_file(path)
    try:
        return keras.saving.load_model(path, compile=compile, safe_mode=True)
    except Exception as error:
        raise KbenchError(f"{path} could not be loaded as a Keras model: {first_line(error)}") from None


LOW_PRECISIONS = ("mixed_bfloat16", "mixed_float16", "bfloat16", "float16")


def float32_model(model):
    """``model`` itself when every layer computes in float32; else the same model, same weights, rebuilt
    with float32 layers. A run trained with --mixed-precision keeps its layers' dtype policies in its
    ``.keras`` file (its weights are float32): exported as it is, its graph would mix bfloat16 and float16
    casts that ONNX Runtime refuses, and its parity would measure bfloat16's rounding."""
    import keras

    if all(layer.dtype_policy.name not in LOW_PRECISIONS for layer in all_layers(model)):
        return model
    config = _float32_config(keras.saving.serialize_keras_object(model))
    import kbench.models.layers  # noqa: F401  (kbench's layers, for deserialisation)

    copy = keras.saving.deserialize_keras_object(config, safe_mode=True)
    copy.set_weights(model.get_weights())
    return copy


def _float32_config(config):
    """A serialised model's config with every low-precision dtype (policy or tensor) made float32."""
    if isinstance(config, dict):
        if config.get("class_name") == "DTypePolicy" and config.get("config", {}).get("name") in LOW_PRECISIONS:
            return {**config, "config": {**config["config"], "name": "float32"}}
        return {key: _float32_config(value) for key, value in config.items()}
    if isinstance(config, list):
        return [_float32_config(value) for value in config]
    return "float32" if config in LOW_PRECISIONS else config


def _load_model_weights(model, path: str) -> None:
    try:
        if path.endswith(".keras"):
            source = load_model(path)
            model.set_weights(source.get_weights())
        else:
            model.load_weights(path)
    except Exception as error:
        raise KbenchError(f"weights in {path} don't fit this model: {error}") from None
