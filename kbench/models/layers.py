"""Keras layers that kbench puts into its models. Importing this module registers them, so that
``.keras`` files holding them load with ``safe_mode=True``; ``backbones.load_model`` does that."""

from __future__ import annotations

import keras
from keras import ops

# keras.applications.imagenet_utils' constants, in the order its preprocess_input applies them
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable(package="kbench")
class ImageNetPreprocessing(keras.layers.Layer):
    """``keras.applications.imagenet_utils.preprocess_input`` as a layer without weights, so that it
    stays fixed when the model around it is fine-tuned and travels into ONNX with the graph.

    ``caffe``: RGB -> BGR, then the ImageNet mean subtracted (ResNet, VGG).
    ``torch``: pixels / 255, then the ImageNet mean subtracted and divided by its deviation (DenseNet).
    The arithmetic is keras' own, step for step, so the weights see exactly what they were made on.
    """

    MODES = ("caffe", "torch")

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, not {mode!r}")
        self.mode = mode

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.mode == "caffe":
            x = ops.take(x, [2, 1, 0], axis=-1)  # a Gather in ONNX
            return x + ops.convert_to_tensor([-m for m in CAFFE_MEAN_BGR], dtype=x.dtype)
        x = x / 255.0
        x = x + ops.convert_to_tensor([-m for m in TORCH_MEAN], dtype=x.dtype)
        return x / ops.convert_to_tensor(TORCH_STD, dtype=x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode}
