"""Export a Keras model (run folder, ensemble folder, ``.keras`` file or in-memory model) to ONNX,
verified against Keras before the file is kept.

The route, on both backends: freeze the variables into constants over ``model(x, training=False)``
in a TensorFlow graph and convert that graph with tf2onnx. Under the JAX backend the conversion runs
in a TensorFlow-backend subprocess over the same ``.keras`` file, and the parity check compares ONNX
Runtime with the model as the JAX backend computes it. Why not keras 3.15's ``model.export("onnx")``
(measured here):
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
``keras.applications`` exports with parity (tests/test_export.py, heavy suite).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

from kbench import __version__, files
from kbench.backbones import batch_norm_layers, load_model
from kbench.distributed import die_with_parent
from kbench.errors import KbenchError, first_line
from kbench.metrics import relative_difference
from kbench.runs import Run, file_hash

OPSETS = range(13, 19)  # what tf2onnx 1.17 converts to
DEFAULT_OPSET = 17
PARITY_TOLERANCE = 1e-4
PARITY_BATCHES = (1, 3)
PARITY_SEED = 0  # the same random pixels every time, so that recorded parity figures repeat
DEFAULT_EXPORT_DIR = "exports"
ROUTE_VERSION = 1  # bump when the exported graph changes for the same model: old files are then re-made


def model_file(model: str) -> str:
    """The ``.keras`` file behind MODEL: a run or ensemble folder's model, or the file itself."""
    if os.path.isdir(model):
        path = Run(model).model_path
        if not os.path.isfile(path):
            raise KbenchError(f"{model} holds no {os.path.basename(path)} (is it a finished kbench run?)")
        return path
    if not os.path.isfile(model):
        raise KbenchError(f"model not found: {model}")
    if not model.endswith(".keras"):
        raise KbenchError(f"{model} is not a Keras model (expected a run folder or a .keras file)")
    return model


def run_metadata(model: str) -> dict:
    """What a run or ensemble folder says about its model (classes, backbones); {} for a file."""
    return Run(model).labels() if os.path.isdir(model) else {}


def default_output(model: str, export_dir: str = DEFAULT_EXPORT_DIR) -> str:
    """``exports/NAME.onnx`` for a run folder NAME or a file NAME.keras."""
    folder = model.rstrip("/")
    name = os.path.basename(folder) if os.path.isdir(folder) else os.path.splitext(os.path.basename(folder))[0]
    return os.path.join(export_dir, f"{name}.onnx")


@dataclass(frozen=True)
class ExportOptions:
    """How a model is exported; with the model's bytes, the key under which its ONNX file is reused."""

    opset: int = DEFAULT_OPSET
    batch_size: int | None = None  # None: a dynamic batch dimension
    graph_passes: bool = True  # False: the graph as tf2onnx wrote it (kbench.graph's clean-up skipped)

    @classmethod
    def parse(cls, opset: int, batch_size: str, graph_passes: bool = True) -> "ExportOptions":
        """From the command line: ``batch_size`` is 'dynamic' or a whole number."""
        if batch_size != "dynamic" and not (batch_size.isdigit() and int(batch_size) > 0):
            raise KbenchError(f"--batch-size must be 'dynamic' or a positive whole number; got {batch_size!r}")
        return cls(opset, None if batch_size == "dynamic" else int(batch_size), graph_passes).check()

    def check(self) -> "ExportOptions":
        if self.opset not in OPSETS:
            raise KbenchError(f"opset {self.opset} is not supported; choose {OPSETS.start}..{OPSETS.stop - 1}")
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or self.batch_size < 1):
            raise KbenchError(f"--batch-size must be 'dynamic' or a positive number; got {self.batch_size}")
        return self


def export_key(source: str, options: ExportOptions) -> str:
    """The identity of an export: the model file's content, the options and the exporter's version."""
    from kbench.graph import GRAPH_PASSES_VERSION  # imports onnx: only when a key is needed

    batch = options.batch_size or "dynamic"
    try:  # the simplifier the clean-up runs is part of what makes the file (kbench.graph)
        slim = importlib.metadata.version("onnxslim")
    except importlib.metadata.PackageNotFoundError:
        slim = "none"
    graph = f"-graph{GRAPH_PASSES_VERSION}-onnxslim{slim}" if options.graph_passes else "-graph-skipped"
    return f"{file_hash(source)[:20]}-opset{options.opset}-batch{batch}-route{ROUTE_VERSION}{graph}-kbench{__version__}"


def onnx_for(
    model: str, output: str | None = None, options: ExportOptions | None = None, export_dir: str = DEFAULT_EXPORT_DIR
) -> dict:
    """The checked ONNX file of MODEL (run or ensemble folder, ``.keras`` file): the one rule every
    caller uses. A file already at ``output`` is reused only when its metadata says it was made from
    the same model bytes with the same options; otherwise MODEL is exported (and checked) again.
    Returns the export record, with ``reused`` true when nothing was exported.

    >>> onnx_for("runs/b0")["path"]  # doctest: +SKIP
    'exports/b0.onnx'
    """
    options = (options or ExportOptions()).check()
    source = model_file(model)
    output = output or default_output(model, export_dir)
    if os.path.isdir(output):
        raise KbenchError(f"{output} is a folder; give the ONNX file's name (-o exports/model.onnx)")
    key = export_key(source, options)
    if os.path.isfile(output) and read_metadata(output).get("kbench_export_key") == key:
        return {
            "path": output,
            "reused": True,
            "opset": options.opset,
            "batch_size": options.batch_size or "dynamic",
            "megabytes": os.path.getsize(output) / 2**20,
        }
    metadata = {**run_metadata(model), "kbench_export_key": key}
    record = export_onnx(
        source,
        output,
        opset=options.opset,
        batch_size=options.batch_size,
        metadata=metadata,
        graph_passes=options.graph_passes,
    )
    return {**record, "reused": False}


def describe_inputs(model) -> tuple[str, tuple[int, int, int]]:
    """(input name, (H, W, C)) of a single-image-input model; KbenchError otherwise."""
    if len(model.inputs) != 1:
        raise KbenchError(f"the model has {len(model.inputs)} inputs; kbench exports models with one image input")
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or any(d is None for d in shape[1:]):
        raise KbenchError(f"the model's input shape {shape} is not (batch, height, width, channels)")
    return model.inputs[0].name, shape[1:]


def export_onnx(
    model,
    output: str,
    opset: int = DEFAULT_OPSET,
    batch_size: int | None = None,
    metadata: dict | None = None,
    graph_passes: bool = True,
) -> dict:
    """Export ``model`` (a path: run folder, ensemble folder, ``.keras``; or a keras.Model) to ``output``.

    The file is written only after ``onnx.checker`` passes and ONNX Runtime matches Keras on the same
    random pixels at batch 1 and 3 (or ``batch_size``) within 1e-4 of the output's scale. Before the
    check the converted graph goes through ``kbench.graph.clean_graph`` (``graph_passes=False``: as
    converted, for comparisons); the metadata's ``kbench_graph_passes`` says what it did. Returns a
    record with the path, the largest relative difference and the seconds spent.

    >>> export_onnx("runs/b0", "exports/b0.onnx")["max_relative_difference"]  # doctest: +SKIP
    """
    import keras
    import onnx

    from kbench.graph import GRAPH_PASSES_VERSION, clean_graph

    ExportOptions(opset, batch_size).check()
    if os.path.isdir(output):
        raise KbenchError(f"{output} is a folder; give the ONNX file's name (-o exports/model.onnx)")
    start = time.perf_counter()
    with files.scratch_folder("export") as scratch:
        if isinstance(model, str):
            source = model_file(model)
            model = load_model(source)
        else:
            source = os.path.join(scratch, "in-memory.keras")
            model.save(source)
        describe_inputs(model)
        backend = keras.backend.backend()
        if backend == "tensorflow":
            onnx_model = convert_keras_file(source, opset, batch_size)
        else:
            converted = os.path.join(scratch, "model.onnx")
            _convert_in_tensorflow_process(source, converted, opset, batch_size)
            onnx_model = onnx.load(converted)
        passes = {"version": GRAPH_PASSES_VERSION, "skipped": True}
        if graph_passes:
            onnx_model, passes = clean_graph(onnx_model)
        _set_metadata(onnx_model, model, backend, {**(metadata or {}), "kbench_graph_passes": passes})
        try:
            onnx.checker.check_model(onnx_model)
        except onnx.checker.ValidationError as error:
            raise KbenchError(f"the exported graph is invalid: {first_line(error)}") from None
        data = onnx_model.SerializeToString()
        try:
            difference = check_parity(model, data, [batch_size] if batch_size else PARITY_BATCHES)
        except KbenchError as error:
            if untrained_batch_norm(model):
                raise KbenchError(
                    f"{error}. Its batch-norm statistics are keras' initial ones (an untrained model?): "
                    "float32 rounding can then grow layer by layer; train it, or run "
                    "kbench.settle.settle_random_weights(model) on random weights, and export again"
                ) from None
            raise
        files.write_bytes(output, data)
    return {
        "path": output,
        "backend": backend,
        "opset": opset,
        "batch_size": batch_size or "dynamic",
        "max_relative_difference": difference,
        "export_seconds": time.perf_counter() - start,
        "megabytes": len(data) / 2**20,
        "graph_passes": passes,
    }


def untrained_batch_norm(model) -> bool:
    """True when the model has BatchNormalization layers and every one still has keras' initial moving
    statistics (mean 0, variance 1): a randomly initialised, untrained model."""
    import keras

    norms = batch_norm_layers(model)
    return bool(norms) and all(
        not np.any(keras.ops.convert_to_numpy(layer.moving_mean))
        and np.all(keras.ops.convert_to_numpy(layer.moving_variance) == 1)
        for layer in norms
    )


def check_parity(model, onnx_bytes: bytes, batch_sizes, tolerance: float = PARITY_TOLERANCE) -> float:
    """Largest |ONNX Runtime - Keras| relative to the output's scale (1 for probabilities, else the
    largest |Keras output|) over fresh random pixels at each batch size; KbenchError if above
    ``tolerance``."""
    import onnxruntime

    session = onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    _, (height, width, channels) = describe_inputs(model)
    rng = np.random.default_rng(PARITY_SEED)
    worst = 0.0
    for batch in batch_sizes:
        pixels = rng.uniform(0, 255, (batch, height, width, channels)).astype(np.float32)
        expected = model.predict_on_batch(pixels)
        expected = [np.asarray(e) for e in (expected if isinstance(expected, (list, tuple)) else [expected])]
        got = session.run(None, {session.get_inputs()[0].name: pixels})
        for keras_output, onnx_output in zip(expected, got):
            worst = max(worst, relative_difference(keras_output, onnx_output))
    if not worst <= tolerance:
        raise KbenchError(
            f"ONNX Runtime and Keras disagree: largest relative difference {worst:.2e} > {tolerance:.0e}; "
            "no file was written"
        )
    return worst


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
    (the rest is TensorFlow's grappler) and 12.5 GB for V2-L; B7 converted in 78-82 s instead of 72.
    ``_optimizers`` is tf2onnx's (1.17) own table of passes; where it is gone, conversion runs as
    tf2onnx has it."""
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
    try:
        yield
    finally:
        table.update(saved)
        gc.collect()


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


def _convert_in_tensorflow_process(source: str, output: str, opset: int, batch_size: int | None) -> None:
    from kbench.quiet import verbose

    command = [sys.executable, "-m", "kbench.export", source, output, str(opset), str(batch_size or 0)]
    # KBENCH_VERBOSE and TF_CPP_MIN_LOG_LEVEL pass on: the child is as quiet as this process.
    environment = {**os.environ, "KERAS_BACKEND": "tensorflow", PARENT_PID_ENV: str(os.getpid())}
    done = subprocess.run(command, capture_output=True, text=True, env=environment)
    if verbose() and done.stderr:
        sys.stderr.write(done.stderr)
    if done.returncode < 0:  # its last stderr line would be whatever it printed before the kill
        raise KbenchError(f"ONNX conversion failed: its process was {killed_by(-done.returncode)}")
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise KbenchError(f"ONNX conversion failed: {lines[-1] if lines else 'no message'}")


def killed_by(number: int) -> str:
    """``killed by SIGKILL (signal 9) (out of memory?)``: the kernel's OOM killer sends SIGKILL."""
    hint = " (out of memory?)" if number == signal.SIGKILL else ""
    return f"killed by {signal_name(number)}{hint}"


def signal_name(number: int) -> str:
    """``SIGKILL (signal 9)`` for 9; ``signal 99`` for a number Python doesn't name."""
    try:
        return f"{signal.Signals(number).name} (signal {number})"
    except ValueError:
        return f"signal {number}"


def _set_metadata(onnx_model, model, backend: str, extra: dict) -> None:
    import keras
    import onnx
    import tf2onnx

    _, (height, width, _) = describe_inputs(model)
    values = {
        "kbench_version": __version__,
        "keras_version": keras.__version__,
        "tf2onnx_version": tf2onnx.__version__,
        "onnx_version": onnx.__version__,
        "backend": backend,
        "image_size": json.dumps([height, width]),
        "input_pixels": "RGB 0..255 float32 NHWC",
        **{key: value if isinstance(value, str) else json.dumps(value) for key, value in extra.items()},
    }
    del onnx_model.metadata_props[:]
    for key, value in values.items():
        onnx_model.metadata_props.add(key=key, value=value)
    onnx_model.producer_name = "kbench"


def read_metadata(path: str) -> dict:
    """An ONNX file's metadata; {} for a file that isn't a readable ONNX model."""
    import onnx

    try:
        return {prop.key: prop.value for prop in onnx.load(path, load_external_data=False).metadata_props}
    except Exception:  # truncated, empty or not ONNX: nothing to reuse
        return {}


def _main(argv: list[str]) -> None:
    """Subprocess entry: ``python -m kbench.export SOURCE.keras OUTPUT.onnx OPSET BATCH`` (TF backend)."""
    from kbench.quiet import set_up

    parent = os.environ.get(PARENT_PID_ENV, "")
    # First thing, not in a preexec_fn: that would fork this multithreaded (JAX) process.
    die_with_parent(int(parent) if parent.isdigit() else None)
    set_up()  # before TensorFlow loads: as quiet as the kbench process that started this one
    import onnx

    source, output, opset, batch = argv
    onnx.save(convert_keras_file(source, int(opset), int(batch) or None), output)


if __name__ == "__main__":
    _main(sys.argv[1:])
