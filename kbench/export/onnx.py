"""Export a Keras model (run folder, ensemble folder, ``.keras`` file or in-memory model) to ONNX,
verified against Keras before the file is kept, and reused by one rule (``onnx_for``).

The conversion itself (frozen TensorFlow graph -> tf2onnx, in a TensorFlow child under JAX) is
``kbench.export.convert``; the clean-up of the converted graph is ``kbench.export.graph``. Here: the options and the
key under which a file is reused, the parity check against Keras, and the file's metadata.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import time
from dataclasses import dataclass

import numpy as np

from kbench.core import files
from kbench.core.backend import full_float32
from kbench.core.errors import KbenchError, first_line
from kbench.core.machine import onnxruntime_module
from kbench.core.metrics import relative_difference
from kbench.core.version import __version__
from kbench.data.synthetic import sample_pixels
from kbench.export.convert import convert_in_tensorflow_process, convert_keras_file, describe_inputs
from kbench.models.backbones import HEAD_LAYER, batch_norm_layers, float32_model, load_model
from kbench.training.runs import Run, file_hash

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
    graph_passes: bool = True  # False: the graph as tf2onnx wrote it (kbench.export.graph's clean-up skipped)

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
    from kbench.export.graph import GRAPH_PASSES_VERSION  # imports onnx: only when a key is needed

    batch = options.batch_size or "dynamic"
    try:  # the simplifier the clean-up runs is part of what makes the file (kbench.export.graph)
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
    pixels at batch 1 and 3 (or ``batch_size``) within 1e-4 of the output's scale (``check_parity``). Before the
    check the converted graph goes through ``kbench.export.graph.clean_graph`` (``graph_passes=False``: as
    converted, for comparisons); the metadata's ``kbench_graph_passes`` says what it did. Returns a
    record with the path, the largest relative difference and the seconds spent.

    >>> export_onnx("runs/b0", "exports/b0.onnx")["max_relative_difference"]  # doctest: +SKIP
    """
    import keras
    import onnx

    from kbench.export.graph import GRAPH_PASSES_VERSION, clean_graph

    ExportOptions(opset, batch_size).check()
    onnxruntime_module()  # the parity check needs it: refused before any conversion, with the fix
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
        if (float32 := float32_model(model)) is not model:  # a --mixed-precision run: exported in float32
            model, source = float32, os.path.join(scratch, "float32.keras")
            model.save(source)
        describe_inputs(model)
        backend = keras.backend.backend()
        if backend == "tensorflow":
            onnx_model = convert_keras_file(source, opset, batch_size)
        else:
            converted = os.path.join(scratch, "model.onnx")
            convert_in_tensorflow_process(source, converted, opset, batch_size)
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
                    "kbench.models.settle.settle_random_weights(model) on random weights, and export again"
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
    largest |Keras output|) over fresh random pixels at each batch size; where the model ends in kbench's
    head (a Dense with a sigmoid or softmax), its logits too, on image-like pixels (the head's input times
    its weights, against the graph's input to its final Sigmoid/Softmax). Random pixels drive a trained
    classifier's probabilities to exactly 0 or 1 (float32's sigmoid is 1.0 beyond a logit of about 17),
    where they compare nothing, and its logits on them to the hundreds, where float32 rounding grows
    (a trained EfficientNet-B0: logits ~1000, Keras and ONNX Runtime 5-20 % apart on noise, 5e-5 on
    generated photographs, 1e-6 on its own images). KbenchError if above ``tolerance``."""
    onnxruntime = onnxruntime_module()  # one line with the fix where it is missing or installed twice
    checked, keras_logits = _with_logits(model, onnx_bytes)
    session = onnxruntime.InferenceSession(checked, providers=["CPUExecutionProvider"])
    _, (height, width, channels) = describe_inputs(model)
    rng = np.random.default_rng(PARITY_SEED)
    worst = 0.0
    for batch in batch_sizes:
        noise = rng.uniform(0, 255, (batch, height, width, channels)).astype(np.float32)
        with full_float32():  # Keras on an Ampere or newer GPU would otherwise compute in TF32
            expected = _outputs(model, noise)
        worst = max(worst, _largest_difference(expected, session, noise))
        if keras_logits is not None:
            photographs = sample_pixels(batch, (height, width), seed=PARITY_SEED + batch)
            with full_float32():
                expected = keras_logits(photographs)
            worst = max(worst, _largest_difference(expected, session, photographs))
    if not worst <= tolerance:
        raise KbenchError(
            f"ONNX Runtime and Keras disagree: largest relative difference {worst:.2e} > {tolerance:.0e}; "
            "no file was written"
        )
    return worst


def _outputs(model, pixels: np.ndarray) -> list[np.ndarray]:
    outputs = model.predict_on_batch(pixels)
    return [np.asarray(output) for output in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]


def _largest_difference(expected: list[np.ndarray], session, pixels: np.ndarray) -> float:
    """Over ``expected`` against the session's first outputs on ``pixels``."""
    got = session.run(None, {session.get_inputs()[0].name: pixels})[: len(expected)]
    return max(relative_difference(e, g) for e, g in zip(expected, got, strict=True))


def _with_logits(model, onnx_bytes: bytes):
    """(the ONNX model with its head's logits as one more output, a function of pixels giving Keras'
    outputs and then its logits, from one forward pass); (``onnx_bytes``, None) where the model or the
    graph doesn't end in kbench's head."""
    import onnx

    outputs_and_logits = keras_logits(model)
    if outputs_and_logits is None:
        return onnx_bytes, None
    proto = onnx.load_from_string(onnx_bytes)
    producers = {name: node for node in proto.graph.node for name in node.output}
    final = producers.get(proto.graph.output[0].name)
    if final is None or final.op_type not in ("Sigmoid", "Softmax"):
        return onnx_bytes, None
    proto.graph.output.append(onnx.helper.make_tensor_value_info(final.input[0], onnx.TensorProto.FLOAT, None))
    return proto.SerializeToString(), outputs_and_logits


def keras_logits(model):
    """A function of pixels giving ``model``'s outputs and then its head's logits (one forward pass), or
    None where the model doesn't end in kbench's head (one Dense ``probability`` layer, sigmoid or
    softmax). Parity is checked on logits too: a confident model's probabilities saturate at 0 and 1,
    where a runtime's error no longer shows."""
    import keras

    try:
        head = model.get_layer(HEAD_LAYER)
    except ValueError:
        return None
    activation = getattr(getattr(head, "activation", None), "__name__", None)
    if not isinstance(head, keras.layers.Dense) or activation not in ("sigmoid", "softmax") or len(model.outputs) != 1:
        return None
    both = keras.Model(model.inputs, [*model.outputs, head.input])
    kernel, bias = (np.asarray(keras.ops.convert_to_numpy(weight), np.float32) for weight in (head.kernel, head.bias))

    def outputs_and_logits(pixels: np.ndarray) -> list[np.ndarray]:
        probabilities, features = _outputs(both, pixels)
        return [probabilities, np.asarray(features, np.float32) @ kernel + bias]

    return outputs_and_logits


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
