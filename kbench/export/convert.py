"""Convert a Keras model file to ONNX: freeze its variables into constants over ``model(x, training=False)``
in a TensorFlow graph and convert that graph with tf2onnx. Under the JAX backend the conversion runs in
a TensorFlow-backend child process over the same ``.keras`` file (``python -m kbench.export.convert``).

Why this route and not keras 3.15's ``model.export("onnx")`` (measured here):
- TensorFlow backend: EfficientNet's normalization constants become extra graph inputs (ONNX Runtime:
  "Required inputs ['…/normalization_1/Sub/y:0', '…/Sqrt/x:0'] are missing"), and tf2onnx's own
  ``from_function`` does the same; freezing with ``convert_variables_to_constants_v2`` first doesn't.
  An ensemble kept dropout's ``StatelessRandomUniformV2``: calling with ``training=False`` drops it.
- JAX backend (jax2onnx 0.17.1): a nested ensemble fails with "The model provided has never called",
  and even a plain ``stateless_call`` converts MaxPooling2D into an ONNX MaxPool that ONNX Runtime
  rejects ("Unsupported pooling size"), which rules out InceptionV3 and Xception.
Two of keras' TensorFlow ops are traced in another form for conversion (``_convertible_ops``): ConvNeXt's
grouped (depthwise) convolutions, which keras runs through XLA on CPU and tf2onnx then sees as an
unconvertible ``StatefulPartitionedCall``, and exact GELU, whose ``Erfc`` tf2onnx lacks. Every family of
``keras.applications`` exports with parity (tests/test_export.py, heavy suite). ``kbench.export.onnx`` checks
and keeps the result.
"""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys

import numpy as np

from kbench.core.errors import KbenchError
from kbench.core.process import child_death, die_with_parent, killed_by, signal_name  # noqa: F401
from kbench.models.backbones import load_model


def describe_inputs(model) -> tuple[str, tuple[int, int, int]]:
    """(input name, (H, W, C)) of a single-image-input model; KbenchError otherwise."""
    if len(model.inputs) != 1:
        raise KbenchError(f"the model has {len(model.inputs)} inputs; kbench exports models with one image input")
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4:
        raise KbenchError(f"the model's input shape {shape} is not (batch, height, width, channels)")
    if any(d is None for d in shape[1:]):
        raise KbenchError(fixed_size_needed(model.name, shape))
    return model.inputs[0].name, shape[1:]


def fixed_size_needed(name: str, shape: tuple) -> str:
    """The refusal of an input of any height or width: what to do instead."""
    return (
        f"model {name!r} takes images of any size {shape}; kbench exports and times a fixed size: "
        f"build it with a sized input, e.g. keras.Input(shape=(224, 224, {shape[-1]}))"
    )


def convert_keras_file(path: str, opset: int, batch_size: int | None):
    """TensorFlow backend only: ``.keras`` -> frozen TF graph -> ONNX ModelProto."""
    import tensorflow as tf
    import tf2onnx

    model = load_model(path)
    input_name, (height, width, channels) = describe_inputs(model)
    spec = tf.TensorSpec((batch_size, height, width, channels), tf.float32, name="image")
    frozen = _frozen_function(model, spec)
    input_tensors, output_tensors = [t.name for t in frozen.inputs], [t.name for t in frozen.outputs]
    names = {input_tensors[0]: _clean(input_name)}
    names.update({tensor: _clean(name) for tensor, name in zip(output_tensors, _output_names(model))})
    graph_def = frozen.graph.as_graph_def()
    # Only the GraphDef goes on: the loaded model, its traced function and the frozen graph are freed
    # before tf2onnx, whose copies make the peak (exporting ConvNeXt-Large: 16.6 GiB with them alive, 13.6 without).
    del model, frozen
    gc.collect()
    with _collected_between_optimizers():
        onnx_model, _ = tf2onnx.convert.from_graph_def(
            graph_def, input_names=input_tensors, output_names=output_tensors, opset=opset
        )
    _rename(onnx_model.graph, names)
    return onnx_model


def _frozen_function(model, spec):
    """``model`` traced at ``spec`` with its variables made constants (a ConcreteFunction)."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    # training=False drops dropout's random op and runs batch norm on its moving statistics.
    with _convertible_ops():
        concrete = tf.function(lambda image: model(image, training=False)).get_concrete_function(spec)
    return convert_variables_to_constants_v2(concrete)


@contextlib.contextmanager
def _collected_between_optimizers():
    """tf2onnx's optimiser deep-copies the whole graph, weights included, before each of its ~20 passes
    (to restore it if one fails), and the copies it drops are reference cycles that wait for Python's
    cyclic collector. Converting EfficientNet-B7 (64 px) reached 13.8 GB resident here that way, and
    EfficientNetV2-L was killed for memory on 24 GB. With a collection before each pass: 6.3 GB for B7
    (the rest is TensorFlow's grappler) and 12.5 GB for V2-L. What existed before the conversion is
    frozen (``gc.freeze``) meanwhile, so that each collection scans only the objects tf2onnx made: a
    full one cost 0.26 s in a process holding keras and TensorFlow, 26 of them 6.8 s of a tiny CNN's
    7.3 s export. Frozen, the same peaks (B7 at 64 px 4.98 GB) in less time (B0 conversion 16.6 -> 7.4 s,
    B7 64 -> 57 s, AMD EPYC). ``_optimizers`` is tf2onnx's (1.17) own table of passes; where it is gone,
    conversion runs as tf2onnx has it."""
    from tf2onnx import optimizer

    def collected(factory):
        def make():
            gc.collect()
            return factory()

        return make

    table = getattr(optimizer, "_optimizers", None)
    if not isinstance(table, dict):
        yield
        return
    saved = dict(table)
    for name, factory in saved.items():
        table[name] = collected(factory)
    freezing = gc.get_freeze_count() == 0  # (a process that froze its own objects keeps them so)
    if freezing:
        gc.freeze()
    try:
        yield
    finally:
        table.update(saved)
        gc.collect()  # the last pass's copies, while only the conversion's objects are scanned
        if freezing:
            gc.unfreeze()


@contextlib.contextmanager
def _convertible_ops():
    """While the graph is traced for conversion, two of keras' TensorFlow ops take a form tf2onnx
    converts (the graph is only converted, never run by TensorFlow; parity then checks the result):
    - grouped convolutions (ConvNeXt's depthwise 7x7 is ``Conv2D(groups=C)``): keras wraps them in
      ``tf.function(jit_compile=True)`` because TensorFlow's CPU kernel lacks them, and the frozen graph
      keeps that as a ``StatefulPartitionedCall`` tf2onnx can't convert ("No Op registered for
      StatefulPartitionedCall"); traced plainly, it is one Conv2D that tf2onnx turns into a grouped Conv.
    - exact GELU: ``tf.nn.gelu`` computes ``0.5 x erfc(-x / sqrt 2)`` and tf2onnx has no Erfc;
      ``0.5 x (1 + erf(x / sqrt 2))`` is the same function and converts to ONNX Erf.
    """
    import tensorflow as tf
    from keras.src.backend.tensorflow import nn

    def conv(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1):
        layout = nn._convert_data_format(data_format, len(inputs.shape))
        return tf.nn.convolution(inputs, kernel, strides, padding.upper(), data_format=layout, dilations=dilation_rate)

    def gelu(x, approximate=True):
        x = tf.convert_to_tensor(x)
        if approximate:
            return tf.nn.gelu(x, approximate=True)
        return 0.5 * x * (1.0 + tf.math.erf(x * np.float32(1 / np.sqrt(2))))

    saved = nn.conv, nn.gelu
    nn.conv, nn.gelu = conv, gelu
    try:
        yield
    finally:
        nn.conv, nn.gelu = saved


def _output_names(model) -> list[str]:
    names = list(getattr(model, "output_names", None) or [])
    return names if len(names) == len(model.outputs) else [f"output_{i}" for i in range(len(model.outputs))]


def _clean(name: str) -> str:
    return name.split(":")[0]


def _rename(graph, names: dict[str, str]) -> None:
    for value in list(graph.input) + list(graph.output):
        value.name = names.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]


PARENT_PID_ENV = "KBENCH_PARENT_PID"


def conversion_environment() -> dict:
    """The conversion child's environment: this one's (KBENCH_VERBOSE and TF_CPP_MIN_LOG_LEVEL pass on,
    so the child is as quiet as this process), TensorFlow's backend, and no GPU: the conversion never
    runs the graph, so its TensorFlow takes no GPU memory beside the JAX process waiting for it."""
    return {**os.environ, "KERAS_BACKEND": "tensorflow", PARENT_PID_ENV: str(os.getpid()), "CUDA_VISIBLE_DEVICES": ""}


def convert_in_tensorflow_process(source: str, output: str, opset: int, batch_size: int | None) -> None:
    from kbench.core.quiet import verbose

    command = [sys.executable, "-m", "kbench.export.convert", source, output, str(opset), str(batch_size or 0)]
    done = subprocess.run(command, capture_output=True, text=True, env=conversion_environment())
    if verbose() and done.stderr:
        sys.stderr.write(done.stderr)
    failure = child_death(done.returncode, done.stderr, silent="no message")
    if failure:
        raise KbenchError(f"ONNX conversion failed: {failure}")


def _main(argv: list[str]) -> None:
    """Subprocess entry: ``python -m kbench.export.convert SOURCE.keras OUTPUT.onnx OPSET BATCH`` (TF backend)."""
    from kbench.core.quiet import set_up

    parent = os.environ.get(PARENT_PID_ENV, "")
    # First thing, not in a preexec_fn: that would fork this multithreaded (JAX) process.
    die_with_parent(int(parent) if parent.isdigit() else None)
    set_up()  # before TensorFlow loads: as quiet as the kbench process that started this one
    import onnx

    source, output, opset, batch = argv
    onnx.save(convert_keras_file(source, int(opset), int(batch) or None), output)


if __name__ == "__main__":
    _main(sys.argv[1:])
