"""Predict a test set into a Kaggle submission (``id,label``), and score a submission as a grader does.

Prediction runs on Keras or, for an ``.onnx`` model, on ONNX Runtime alone (keras isn't imported).
"""

from __future__ import annotations

import codecs
import csv
import io
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kbench.core import files, metrics
from kbench.core.config import option, positive
from kbench.core.errors import KbenchError
from kbench.data.dataset import KAGGLE_NAME, ImageSet, find_images
from kbench.data.loader import ImageLoader

TTA_MODES = ("none", "flip")
# ``kbench predict --runtime``: Keras, or kbench's checked ONNX export on ONNX Runtime or OpenVINO.
PREDICT_RUNTIMES = {
    "keras": None,
    "onnxruntime": None,
    "openvino": "openvino-cpu",
    "openvino-bf16": "openvino-cpu-bf16",
}


@dataclass
class SubmissionConfig:
    """How a study predicts its test set (the ``[submission]`` table; ``kbench predict``'s options)."""

    tta: str = option("none", "flip: average with the horizontally flipped image.", choices=TTA_MODES)
    clip: float | None = option(None, "Clip probabilities to [EPS, 1 - EPS].")
    batch_size: int = option(32, "Images per batch.")

    def check(self) -> "SubmissionConfig":
        if self.tta not in TTA_MODES:
            raise KbenchError(f"unknown --tta {self.tta!r}; choose {' or '.join(TTA_MODES)}")
        if self.clip is not None and not 0 <= self.clip < 0.5:
            raise KbenchError(f"--clip must be in [0, 0.5); got {self.clip}")
        positive(self.batch_size, "--batch-size", whole=True)
        return self


def image_id(key: str) -> str:
    """``test/123.jpg`` -> ``123``."""
    return os.path.basename(key).rsplit(".", 1)[0]


_NUMBER = re.compile(r"([0-9]+)(?:\.0*)?")  # 7, 007 and 7.0 (pandas' float id column) are id 7


def _id_key(identifier: str):
    """What makes two ids the same, as a grader reads a numeric id column: ``007`` and ``7.0`` are ``7``."""
    identifier = identifier.strip()
    number = _NUMBER.fullmatch(identifier)
    return int(number.group(1)) if number else identifier


def _id_order(identifier: str):
    key = _id_key(identifier)
    return (0, key, "") if isinstance(key, int) else (1, 0, key)


def find_test_images(data: str) -> ImageSet:
    """The images of a test set (folder or ``test.zip``), each with its own id; a clash of ids
    (``1.jpg`` and ``1.png``, ``007`` and ``7``) or images in several folders (class folders are for
    training) is a KbenchError naming it. Cheap: nothing is decoded, so it runs before any model."""
    images = find_images(data, labelled=False)
    first: dict = {}
    for key in images.keys:
        other = first.setdefault(_id_key(image_id(key)), key)
        if other != key:
            raise KbenchError(
                f"{data}: {other} and {key} have the same id {image_id(key)!r}; a submission needs one row per id"
            )
    folders = sorted({os.path.dirname(key) for key in images.keys})
    if len(folders) > 1:
        shown = ", ".join(f"{folder or '.'}/" for folder in folders[:3])
        raise KbenchError(
            f"{data}: test images in {len(folders)} folders ({shown}); a test set is one folder "
            "of <id>.jpg files (class folders are for training)"
        )
    ids = [image_id(key) for key in images.keys]
    numeric = [i for i in ids if i.isdigit()]
    if numeric and len(numeric) < len(ids):  # Kaggle's ids are numbers: a named file is a stray
        stray = next(key for key, i in zip(images.keys, ids) if not i.isdigit())
        raise KbenchError(f"{data}: {stray} has no numeric id, unlike the other test images (1.jpg, 2.jpg, ...)")
    if not numeric and all(KAGGLE_NAME.fullmatch(os.path.basename(key)) for key in images.keys):
        raise KbenchError(f"{data} holds labelled training images ({images.keys[0]}); give the test set")
    return images


class _Predictor:
    """probabilities = predictor(pixels); ``image_size`` and ``classes`` describe the model."""

    def __init__(self, model: str, runtime: str):
        if runtime not in PREDICT_RUNTIMES:
            raise KbenchError(f"unknown --runtime {runtime!r}; choose from {', '.join(PREDICT_RUNTIMES)}")
        if model.endswith(".onnx") or runtime != "keras":
            self._load_onnx(model, PREDICT_RUNTIMES[runtime])
        else:
            from kbench.export.convert import describe_inputs
            from kbench.export.onnx import load_model, model_file, run_metadata

            self.keras_model = load_model(model_file(model))
            self.image_size = int(describe_inputs(self.keras_model)[1][0])  # a model of any size: refused
            self.classes = run_metadata(model).get("classes")
            self._run = lambda pixels: np.asarray(self.keras_model.predict_on_batch(pixels))

    def _load_onnx(self, model: str, openvino: str | None = None) -> None:
        import json

        from kbench.serving.onnx_runtime import onnx_session

        path = model
        if not model.endswith(".onnx"):  # a Keras model asked to run on ONNX Runtime: its checked export
            from kbench.export.onnx import onnx_for

            path = onnx_for(model)["path"]
        session = onnx_session(path, ["CPUExecutionProvider"])
        name, shape = session.get_inputs()[0].name, session.get_inputs()[0].shape
        if len(shape) != 4 or not isinstance(shape[1], int):
            raise KbenchError(f"{path} takes images of shape {shape}; kbench predicts with a fixed NHWC size")
        self.image_size = int(shape[1])
        properties = session.get_modelmeta().custom_metadata_map
        self.classes = json.loads(properties["classes"]) if "classes" in properties else None
        self._run = lambda pixels: session.run(None, {name: pixels})[0]
        if openvino:
            self._run = openvino_predictor(openvino, path, session, self.image_size)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self._run(pixels)


def openvino_predictor(name: str, path: str, session, image_size: int):
    """probabilities = f(pixels) on OpenVINO (``kbench.serving.openvino``), after the check the latency rows
    make: its outputs on random pixels within the runtime's tolerance of ONNX Runtime's on the same file
    (itself checked against Keras when it was exported), else a KbenchError saying by how much."""
    from kbench.core.errors import Unavailable
    from kbench.core.metrics import relative_difference
    from kbench.serving.runtimes import make_runtime

    runtime = make_runtime(name)
    try:
        runtime.prepare(path, (image_size, image_size))
    except Unavailable as why:
        raise KbenchError(f"--runtime {name}: {why}") from None
    pixels = np.random.default_rng(0).uniform(0, 255, (2, image_size, image_size, 3)).astype(np.float32)
    expected = session.run(None, {session.get_inputs()[0].name: pixels})
    difference = max(relative_difference(e, got) for e, got in zip(expected, runtime.run(pixels)))
    if not difference <= runtime.tolerance:
        raise KbenchError(
            f"{name} differs from ONNX Runtime on {path} by {difference:.1e} > {runtime.tolerance:.0e}; "
            "predict with --runtime onnxruntime"
        )
    return lambda pixels: np.array(runtime.run(pixels)[0])


def _as_matrix(probabilities: np.ndarray) -> np.ndarray:
    p = np.asarray(probabilities, dtype=np.float64)
    return p.reshape(len(p), -1)


def predict_test_set(
    model: str,
    data: str,
    output: str,
    tta: str = "none",
    clip: float | None = None,
    batch_size: int = 32,
    runtime: str = "keras",
    temperature: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Write the submission for the images in ``data`` (folder or ``test.zip``) to ``output``.

    Binary models: ``id,label`` with label = P(second class), e.g. P(dog). More classes: ``id`` and
    one column per class. Rows sorted by numeric id; an unreadable image gets the uniform
    probability (so every id is present) and is counted as skipped. ``progress(done, total)``, when
    given, is called once the model is loaded and after each batch (images predicted so far).
    """
    if tta not in ("none", "flip"):
        raise KbenchError(f"unknown --tta {tta!r}; choose none or flip")
    if clip is not None and not 0 <= clip < 0.5:
        raise KbenchError(f"--clip must be in [0, 0.5); got {clip}")
    images = find_test_images(data)  # before the model: a bad test set is refused at once
    predictor = _Predictor(model, runtime)  # before the progress bar: a refused model is one line
    done = 0
    if progress:
        progress(done, len(images))
    order = sorted(range(len(images)), key=lambda i: _id_order(image_id(images.keys[i])))
    loader = ImageLoader(images, np.array(order), predictor.image_size, batch_size)
    found: dict[int, np.ndarray] = {}
    try:
        for batch in range(len(loader)):
            pixels, _, kept = loader.batch_items(0, batch)
            p = _as_matrix(predictor(pixels))
            if tta == "flip":
                p = (p + _as_matrix(predictor(np.ascontiguousarray(pixels[:, :, ::-1])))) / 2
            found.update(zip(kept.tolist(), p))
            done += len(pixels)
            if progress:
                progress(done, len(images))
    finally:
        loader.close()
    width = next(iter(found.values())).shape[0] if found else 1
    uniform = np.full(width, 0.5 if width == 1 else 1 / width)
    rows = np.stack([found.get(i, uniform) for i in order])
    if temperature:
        rows = apply_temperature(rows, temperature)
    if clip:
        rows = np.clip(rows, clip, 1 - clip)
    classes = predictor.classes or ([f"class_{i}" for i in range(width)] if width > 1 else None)
    header = ["id", "label"] if width == 1 else ["id", *classes]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for index, row in zip(order, rows):
        writer.writerow([image_id(images.keys[index]), *(f"{v:.6f}" for v in row)])
    files.write_text(output, buffer.getvalue())
    skipped = len(images.skipped) + len(loader.bad)
    return {"path": output, "images": len(images), "predicted": len(found), "skipped": skipped}


def _logits(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p)) if p.shape[1] == 1 else np.log(p)


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Rescale probabilities as if their logits were divided by ``temperature``."""
    z = _logits(_as_matrix(probabilities)) / temperature
    if z.shape[1] == 1:
        return 1 / (1 + np.exp(-z))
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising log loss on held-out predictions (golden-section search on log T)."""

    def loss(log_t):
        return metrics.log_loss(labels, apply_temperature(probabilities, math.exp(log_t)))

    low, high = math.log(0.05), math.log(20.0)
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        low, high = (low, b) if loss(a) < loss(b) else (a, high)
    return math.exp((low + high) / 2)


def validation_predictions(model: str, runtime: str, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, labels) of a run folder's validation split."""
    from kbench.data.loader import predict
    from kbench.training.runs import Run

    if not os.path.isdir(model):
        raise KbenchError("--calibrate needs MODEL to be a run or ensemble folder (its validation split)")
    images, indices = Run(model).images("val")
    if len(indices) == 0:
        raise KbenchError(f"--calibrate needs validation images; {model} was trained with --val-split 0")
    predictor = _Predictor(model, runtime)
    probabilities, labels = predict(predictor, ImageLoader(images, indices, predictor.image_size, batch_size))
    return _as_matrix(probabilities), labels


def calibrate_temperature(model: str, runtime: str = "keras", batch_size: int = 32) -> tuple[float, float, float]:
    """(temperature, validation log loss before, after) fitted on a run folder's validation split."""
    probabilities, labels = validation_predictions(model, runtime, batch_size)
    temperature = fit_temperature(probabilities, labels)
    return (
        temperature,
        metrics.log_loss(labels, probabilities),
        metrics.log_loss(labels, apply_temperature(probabilities, temperature)),
    )


def _read_csv(path: str, what: str) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of a CSV file as a grader reads it: UTF-8 with or without a BOM, names and
    values stripped of surrounding whitespace, missing cells empty."""
    if not os.path.isfile(path):
        raise KbenchError(f"{what} not found: {path}")
    with open(path, "rb") as handle:
        data = handle.read()
    data = data[3:] if data.startswith(codecs.BOM_UTF8) else data
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise KbenchError(f"{what} {path} is not UTF-8 text (line {line})") from None
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = [name.strip() for name in next(reader, [])]
        rows = [
            dict(zip(header, [value.strip() for value in row] + [""] * (len(header) - len(row))))
            for row in reader
            if any(value.strip() for value in row)
        ]
    except csv.Error as error:
        raise KbenchError(f"{what} {path} is not a readable CSV file ({error})") from None
    return header, rows


def _read_answers(path: str) -> dict:
    """{id key: 0 or 1} from an ``id,label`` answers file; anything else is a one-line KbenchError."""
    columns, rows = _read_csv(path, "answers")
    for column in ("id", "label"):
        if column not in columns:
            raise KbenchError(f"answers {path} has no '{column}' column (columns: {', '.join(columns) or 'none'})")
    if not rows:
        raise KbenchError(f"answers {path} has no rows")
    truth = {}
    for row in rows:
        if not row["id"]:
            raise KbenchError(f"answers {path}: a row has an empty id")
        key = _id_key(row["id"])
        if key in truth:
            raise KbenchError(f"answers {path} repeats id {row['id']}")
        try:
            value = float(row["label"])
        except ValueError:
            value = None
        if value not in (0.0, 1.0):
            raise KbenchError(f"answers {path}: id {row['id']}: label {row['label']!r} is not 0 or 1")
        truth[key] = int(value)
    return truth


def score_submission(submission: str, answers: str) -> dict:
    """Log loss and accuracy of a binary ``id,label`` submission against ``id,label`` answers, after
    the checks a grader makes; each failed check is a one-line KbenchError.

    As Kaggle's grader, it reads UTF-8 with or without a BOM, ignores whitespace around values and
    reads integer ids as numbers (``01`` and ``1.0`` are ``1``, as pandas reads them). Answers' labels
    must be exactly 0 or 1.
    """
    columns, rows = _read_csv(submission, "submission")
    for column in ("id", "label"):
        if column not in columns:
            raise KbenchError(f"submission has no '{column}' column (columns: {', '.join(columns) or 'none'})")
    expected = _read_answers(answers)
    if len(rows) != len(expected):
        raise KbenchError(f"submission has {len(rows)} rows; the answers have {len(expected)}")
    keys = [_id_key(row["id"]) for row in rows]
    if len(set(keys)) < len(keys):
        counts: dict = {}
        for row, key in zip(rows, keys):
            counts.setdefault(key, []).append(row["id"])
        repeated = sorted((ids for ids in counts.values() if len(ids) > 1), key=lambda ids: _id_order(ids[0]))
        raise KbenchError(
            f"submission repeats ids: {', '.join(' = '.join(dict.fromkeys(ids)) for ids in repeated[:5])}"
        )
    missing = sorted((str(key) for key in set(expected) - set(keys)), key=_id_order)
    if missing:
        raise KbenchError(f"submission lacks ids present in the answers: {', '.join(missing[:5])}")
    labels = []
    for row in rows:
        try:
            value = float(row["label"])
        except ValueError:
            raise KbenchError(f"id {row['id']}: label {row['label']!r} is not a number") from None
        if math.isnan(value):
            raise KbenchError(f"id {row['id']}: label is NaN")
        if not 0 <= value <= 1:
            raise KbenchError(f"id {row['id']}: label {value} is outside [0, 1]")
        labels.append(value)
    truth_labels = np.array([expected[key] for key in keys])
    predictions = np.array(labels)
    return {
        "rows": len(rows),
        "log_loss": metrics.log_loss(truth_labels, predictions),
        "accuracy": metrics.accuracy(truth_labels, predictions),
    }


def predict_command(
    model: str,
    data: str,
    output: str,
    settings: SubmissionConfig,
    runtime: str = "keras",
    calibrate: bool = False,
    echo=print,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """``kbench predict``: optional temperature calibration, then the submission (``progress`` as
    for predict_test_set)."""
    settings.check()
    if os.path.isdir(output):
        raise KbenchError(f"-o {output} is a folder; give the CSV file's name")
    find_test_images(data)  # ids checked before any model (or the calibration) is loaded
    temperature = None
    if calibrate:
        temperature, before, after = calibrate_temperature(model, runtime, settings.batch_size)
        echo(f"calibration: temperature {temperature:.3f}; validation log loss {before:.4f} -> {after:.4f}")
    return predict_test_set(
        model,
        data,
        output,
        settings.tta,
        settings.clip,
        settings.batch_size,
        runtime,
        temperature,
        progress=progress,
    )
