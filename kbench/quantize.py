"""Static int8 quantization of an exported ONNX model, and what it costs in accuracy and gains in speed.

Calibrated by ONNX Runtime on real images; the float model is never replaced: the int8 file is
written beside it and both are scored on the same validation images and timed the same way.
"""

from __future__ import annotations

import os

import numpy as np

from kbench import files, metrics, timing
from kbench.data import find_images
from kbench.errors import KbenchError
from kbench.loader import ImageLoader, predict
from kbench.runs import SPLIT, Run
from kbench.runtimes import onnx_session


def int8_path(float_path: str) -> str:
    """Where the int8 copy of ``model.onnx`` goes: ``model.int8.onnx`` beside it."""
    return os.path.splitext(float_path)[0] + ".int8.onnx"


def _calibration_images(calibration_data: str | None, run_dir: str | None, count: int, seed: int):
    """(ImageSet, indices) to calibrate on: ``calibration_data`` or the run's own training split."""
    if calibration_data:
        images = find_images(calibration_data, labelled=False)
        indices = np.arange(len(images))
    elif run_dir and Run(run_dir).exists(SPLIT):
        images, indices = Run(run_dir).images("train")
    else:
        raise KbenchError("--quantize int8 needs --calibration-data PATH (or MODEL as a run folder)")
    rng = np.random.default_rng(seed)
    return images, np.sort(rng.permutation(indices)[:count])


def median_latency_ms(session, image_size: tuple[int, int], runs: int = 30) -> float:
    name = session.get_inputs()[0].name
    pixels = np.random.default_rng(0).uniform(0, 255, (1, *image_size, 3)).astype(np.float32)
    return timing.stats(timing.time_calls(lambda: session.run(None, {name: pixels}), runs, warmup=3))["p50_ms"]


def quantize_int8(
    float_path: str,
    output: str,
    calibration_data: str | None = None,
    run_dir: str | None = None,
    calibration_images: int = 128,
    seed: int = 0,
) -> dict:
    """Write a statically quantized (QDQ, int8) copy of ``float_path`` to ``output``; return the float
    and int8 validation log loss / accuracy (when ``run_dir`` has a split) and batch-1 latencies."""
    import onnxruntime
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    session = onnx_session(float_path, ["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    height, width = int(spec.shape[1]), int(spec.shape[2])
    if height != width:
        raise KbenchError("int8 calibration needs a square image input")
    images, indices = _calibration_images(calibration_data, run_dir, calibration_images, seed)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.loader = ImageLoader(images, indices, height, batch_size=1)
            self.batches = iter(self.loader)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {spec.name: batch[0]}

    reader = Reader()
    with files.scratch_folder("int8") as scratch:
        quantized = os.path.join(scratch, "model.int8.onnx")
        prepared = os.path.join(scratch, "model.prepared.onnx")
        quant_pre_process(float_path, prepared)  # shape inference and graph clean-up, as ORT advises
        quantize_static(
            prepared,
            quantized,
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
        )
        reader.loader.close()
        with open(quantized, "rb") as handle:
            data = handle.read()
    files.write_bytes(output, data)

    int8_session = onnxruntime.InferenceSession(output, providers=["CPUExecutionProvider"])
    record = {
        "float_path": float_path,
        "int8_path": output,
        "calibration_images": int(len(indices)),
        "float_ms": median_latency_ms(session, (height, width)),
        "int8_ms": median_latency_ms(int8_session, (height, width)),
    }
    record["speedup"] = record["float_ms"] / record["int8_ms"]
    val_images, val_indices = Run(run_dir).images("val") if run_dir and Run(run_dir).exists(SPLIT) else (None, [])
    if len(val_indices):  # a run trained with --val-split 0 has nothing to score on
        for name, current in (("float", session), ("int8", int8_session)):
            loader = ImageLoader(val_images, val_indices, height, batch_size=32)
            probabilities, labels = predict(lambda x, s=current: s.run(None, {spec.name: x})[0], loader)
            record[f"{name}_val_log_loss"] = metrics.log_loss(labels, probabilities)
            record[f"{name}_val_accuracy"] = metrics.accuracy(labels, probabilities)
    return record


def quantize_export(float_path: str, model: str, calibration_data: str | None = None) -> dict:
    """``export onnx --quantize int8``: the int8 copy beside ``float_path``, calibrated on
    ``calibration_data`` or, when MODEL is a run folder, on its training split."""
    return quantize_int8(float_path, int8_path(float_path), calibration_data, model if os.path.isdir(model) else None)
