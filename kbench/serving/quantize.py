"""Static int8 quantization of an exported ONNX model that pays, or says it doesn't.

A few configurations of ONNX Runtime's static quantization (CANDIDATES: QDQ and QOperator, S8S8 and
U8S8, per-channel weights, and one that leaves depthwise convolutions, squeeze-excite blocks and
activations in float) are calibrated on real images once, timed against the float file interleaved
(``kbench.core.timing``, onnxruntime-cpu with fixed settings), and scored on the run's validation split.
The fastest one that is faster than the float file and whose validation log loss stays within
LOG_LOSS_BOUND of the float model's is written beside it; when none is, no int8 file is written. The
float model is never replaced.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import replace

import numpy as np

from kbench.core import files, metrics, timing
from kbench.core.errors import KbenchError
from kbench.data.dataset import find_images
from kbench.data.loader import ImageLoader, predict
from kbench.serving.onnx_runtime import FIXED_CPU_SETTINGS, OnnxRuntimeCPU, onnx_session
from kbench.training.runs import SPLIT, Run

# Configurations tried, in this order (the first calibrates; the others reuse its ranges where ONNX
# Runtime can cache them). "float parts" quantizes only convolutions and matrix products, and of the
# convolutions neither the depthwise ones nor those of squeeze-excite blocks: what gains little from
# int8 and pays the most for its quantize/dequantize pairs (EfficientNet, MobileNet).
CANDIDATES = {
    "QDQ S8S8 per-channel": {"format": "QDQ", "activations": "QInt8", "weights": "QInt8"},
    "QDQ U8S8 per-channel": {"format": "QDQ", "activations": "QUInt8", "weights": "QInt8"},
    "QOperator U8S8 per-channel": {"format": "QOperator", "activations": "QUInt8", "weights": "QInt8"},
    "QDQ S8S8 per-channel, float parts": {
        "format": "QDQ",
        "activations": "QInt8",
        "weights": "QInt8",
        "float_parts": True,
    },
}
# An int8 file is kept only if its validation log loss is at most the float model's plus the larger of
# these (a model at log loss 0.05 may lose 0.01; one at 1.0, 0.02).
LOG_LOSS_BOUND = {"absolute": 0.01, "relative": 0.02}
# How candidates are timed against the float file: at batch TIMING_BATCH, interleaved by TIMING
# (kbench.core.timing.time_plan), ONNX Runtime with one thread per physical core and spinning off
# (fixed: no per-file probe). A candidate must be SPEEDUP_MARGIN times faster than the float file to
# count as faster (a tie is no reason to serve int8).
TIMING = timing.Plan(block=5, min_rounds=2, max_rounds=8, budget_s=3.0)
TIMING_BATCH = 1
SPEEDUP_MARGIN = 1.03
SETTINGS = replace(FIXED_CPU_SETTINGS, spinning=False)
SQUEEZE_OPS = ("GlobalAveragePool", "ReduceMean")
# Images the activation ranges are calibrated on, and the fewest a calibration may have: ranges taken
# from a handful of images clip what the model is later served (a folder holding one stray picture is
# the wrong folder, not a calibration set).
CALIBRATION_IMAGES, FEWEST_CALIBRATION_IMAGES = 64, 16


def int8_path(float_path: str) -> str:
    """Where the int8 copy of ``model.onnx`` goes: ``model.int8.onnx`` beside it."""
    return os.path.splitext(float_path)[0] + ".int8.onnx"


def log_loss_bound(float_log_loss: float) -> float:
    """The largest validation log loss an int8 file may have next to ``float_log_loss``."""
    return float_log_loss + max(LOG_LOSS_BOUND["absolute"], LOG_LOSS_BOUND["relative"] * float_log_loss)


def _calibration_images(calibration_data: str | None, run_dir: str | None, count: int, seed: int):
    """(ImageSet, indices) to calibrate on: ``calibration_data`` or the run's own training split."""
    if calibration_data:
        images = find_images(calibration_data, labelled=False)
        indices = np.arange(len(images))
    elif run_dir and Run(run_dir).exists(SPLIT):
        images, indices = Run(run_dir).images("train")
    else:
        raise KbenchError("--quantize int8 needs --calibration-data PATH (or MODEL as a run folder)")
    needed = min(count, FEWEST_CALIBRATION_IMAGES)
    if len(indices) < needed:
        where = calibration_data or f"{run_dir}'s training split"
        raise KbenchError(
            f"{where} holds {len(indices)} image{'s' * (len(indices) != 1)}; int8 calibration needs at least "
            f"{needed} (it uses up to {count}) of the kind the model will serve"
        )
    rng = np.random.default_rng(seed)
    return images, np.sort(rng.permutation(indices)[:count])


def float_nodes(model) -> list[str]:
    """Names of the convolutions the "float parts" candidate leaves in float: depthwise (grouped)
    convolutions and the convolutions of squeeze-excite blocks (fed, through anything but another
    convolution, by a global average pool, or by such a convolution)."""
    producer = {output: node for node in model.graph.node for output in node.output}
    squeeze_excite: dict[str, bool] = {}

    def squeezed(node, depth: int = 0) -> bool:
        for name in node.input[:1]:
            source = producer.get(name)
            if source is None or depth > 6:
                continue
            if source.op_type in SQUEEZE_OPS:
                return True
            if source.op_type == "Conv":
                return squeeze_excite.get(source.name, False)
            if squeezed(source, depth + 1):
                return True
        return False

    kept = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        squeeze_excite[node.name] = squeezed(node)
        if squeeze_excite[node.name] or next((a.i for a in node.attribute if a.name == "group"), 1) > 1:
            kept.append(node.name)
    return kept


def _quantize(prepared: str, output: str, reader, candidate: dict, cache: str) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    options = {
        "quant_format": getattr(QuantFormat, candidate["format"]),
        "per_channel": True,
        "activation_type": getattr(QuantType, candidate["activations"]),
        "weight_type": getattr(QuantType, candidate["weights"]),
    }
    if candidate.get("float_parts"):
        import onnx

        options["op_types_to_quantize"] = ["Conv", "MatMul", "Gemm"]
        options["nodes_to_exclude"] = float_nodes(onnx.load(prepared))
    if "calibration_cache_path" in inspect.signature(quantize_static).parameters:  # ONNX Runtime >= 1.32
        options["calibration_cache_path"] = cache
    quantize_static(prepared, output, reader, **options)


def time_against_float(paths: dict[str, str], image_size: tuple[int, int]) -> dict[str, float]:
    """Median batch-TIMING_BATCH milliseconds of each file (``label -> path``), interleaved."""
    pixels = np.random.default_rng(0).uniform(0, 255, (TIMING_BATCH, *image_size, 3)).astype(np.float32)
    runtimes = {}
    for label, path in paths.items():
        runtimes[label] = OnnxRuntimeCPU(settings=SETTINGS)
        runtimes[label].prepare(path, image_size)
    return timing.time_plan({label: (lambda r=runtime: r.run(pixels)) for label, runtime in runtimes.items()}, TIMING)


def validation_scores(path: str, run_dir: str | None, image_size: int) -> dict | None:
    """Validation log loss and accuracy of an ONNX file on ``run_dir``'s split; None without one."""
    if not (run_dir and Run(run_dir).exists(SPLIT)):
        return None
    images, indices = Run(run_dir).images("val")
    if not len(indices):  # a run trained with --val-split 0 has nothing to score on
        return None
    session = onnx_session(path, ["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    loader = ImageLoader(images, indices, image_size, batch_size=32)
    probabilities, labels = predict(lambda x: session.run(None, {name: x})[0], loader)
    return {
        "val_log_loss": metrics.log_loss(labels, probabilities),
        "val_accuracy": metrics.accuracy(labels, probabilities),
    }


def quantize_int8(
    float_path: str,
    output: str,
    calibration_data: str | None = None,
    run_dir: str | None = None,
    calibration_images: int = CALIBRATION_IMAGES,
    seed: int = 0,
    candidates: dict | None = None,
) -> dict:
    """Try ``candidates`` (default CANDIDATES) and write the fastest that pays to ``output`` (see the
    module's docstring). Returns the float file's batch-1 time and validation scores, each candidate's
    time (and scores where it was faster), the one kept (``int8_path`` None when none was) and why."""
    from onnxruntime.quantization import CalibrationDataReader, quant_pre_process

    session = onnx_session(float_path, ["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    height, width = int(spec.shape[1]), int(spec.shape[2])
    if height != width:
        raise KbenchError("int8 calibration needs a square image input")
    images, indices = _calibration_images(calibration_data, run_dir, calibration_images, seed)

    class Reader(CalibrationDataReader):
        batches = None

        def get_next(self):
            if self.batches is None:  # opened on first use: a cached calibration never asks
                self.loader = ImageLoader(images, indices, height, batch_size=1)
                self.batches = iter(self.loader)
            batch = next(self.batches, None)
            if batch is None:
                self.loader.close()
                return None
            return {spec.name: batch[0]}

    record = {"float_path": float_path, "int8_path": None, "calibration_images": int(len(indices)), "candidates": []}
    with files.scratch_folder("int8") as scratch:
        prepared = os.path.join(scratch, "model.prepared.onnx")
        source, here = os.path.abspath(float_path), os.getcwd()
        os.chdir(scratch)  # where its shape inference leaves files (sym_shape_infer_temp.onnx, *.data)
        try:
            try:
                quant_pre_process(source, prepared)  # shape inference and graph clean-up, as ORT advises
            except Exception as error:  # an ensemble resizing members of other sizes: ONNX's own inference does
                if "symbolic shape inference" not in str(error):
                    raise
                quant_pre_process(source, prepared, skip_symbolic_shape=True)
        finally:
            os.chdir(here)
        paths = {}
        for number, (label, candidate) in enumerate((candidates or CANDIDATES).items()):
            paths[label] = os.path.join(scratch, f"candidate{number}.onnx")
            _quantize(prepared, paths[label], Reader(), candidate, os.path.join(scratch, "ranges.json"))
        medians = time_against_float({"float": float_path, **paths}, (height, width))
        record["float_ms"] = medians.pop("float")
        float_scores = validation_scores(float_path, run_dir, height)
        if float_scores:
            record.update({f"float_{key}": value for key, value in float_scores.items()})
            record["log_loss_bound"] = log_loss_bound(float_scores["val_log_loss"])
        for label in sorted(medians, key=medians.get):
            row = {"config": label, "ms": medians[label], "speedup": record["float_ms"] / medians[label]}
            record["candidates"].append(row)
            if row["speedup"] < SPEEDUP_MARGIN or record["int8_path"]:
                continue
            scores = validation_scores(paths[label], run_dir, height) if float_scores else None
            if scores:
                row.update(scores)
                if scores["val_log_loss"] > record["log_loss_bound"]:
                    continue
            with open(paths[label], "rb") as handle:
                files.write_bytes(output, handle.read())
            record.update({"int8_path": output, "config": label, "int8_ms": row["ms"], "speedup": row["speedup"]})
            record.update({f"int8_{key}": value for key, value in (scores or {}).items()})
    if record["int8_path"] is None and os.path.isfile(output):  # an earlier run's file would speak for this one
        os.remove(output)
        record["removed"] = output
    return record


def check_calibration(model: str, calibration_data: str | None = None) -> None:
    """KbenchError in one line unless there are images to calibrate ``model`` (a path) on: run before
    the float file is exported, so that a refusal leaves nothing written."""
    _calibration_images(calibration_data, model if os.path.isdir(model) else None, CALIBRATION_IMAGES, 0)


def quantize_export(float_path: str, model: str, calibration_data: str | None = None) -> dict:
    """``export onnx --quantize int8``: the int8 copy beside ``float_path`` when one pays, calibrated on
    ``calibration_data`` or, when MODEL is a run folder, on its training split."""
    return quantize_int8(float_path, int8_path(float_path), calibration_data, model if os.path.isdir(model) else None)
