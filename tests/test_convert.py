"""The conversion's hold on the private internals it patches: if keras or tf2onnx renames one, this
fails here, loudly, instead of an export quietly losing its memory fix or its convertible ops."""

import pytest

pytestmark = pytest.mark.once  # the libraries' internals, whatever the backend


def test_the_private_internals_the_conversion_patches_are_still_there():
    from keras.src.backend.tensorflow import nn
    from tf2onnx import optimizer

    # kbench.export.convert._collected_between_optimizers wraps each pass of this table
    assert isinstance(getattr(optimizer, "_optimizers", None), dict) and optimizer._optimizers
    assert all(callable(factory) for factory in optimizer._optimizers.values())
    # kbench.export.convert._convertible_ops swaps these two and calls the third
    for name in ("conv", "gelu", "_convert_data_format"):
        assert callable(getattr(nn, name, None)), f"keras.src.backend.tensorflow.nn.{name} is gone"
    assert nn._convert_data_format("channels_last", 4) == "NHWC"
