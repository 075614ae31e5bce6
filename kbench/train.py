"""Fit one backbone on image files; time its epochs; evaluate it; write the run folder.

A run folder holds ``config.json`` (every resolved option: the run can be repeated from it),
``split.json`` (the train / validation files, reused by ensembles and reports), ``history.csv``,
``metrics.json`` and ``model.keras``. While training it also holds ``checkpoint.keras`` and
``checkpoint.json``, written after every epoch and on Ctrl-C / SIGTERM, which ``resume=True`` continues.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import statistics
import threading
import time
from dataclasses import dataclass

import numpy as np

from kbench import doctor, files, metrics
from kbench.backbones import get_backbone, weights_kind
from kbench.backend import use_backend
from kbench.data import ImageLoader, ImageSet, find_images, indices_of, split_indices
from kbench.devices import training_devices
from kbench.errors import KbenchError, TrainingInterrupted

log = logging.getLogger("kbench")

CONFIG, SPLIT, HISTORY, METRICS, MODEL = "config.json", "split.json", "history.csv", "metrics.json", "model.keras"
CHECKPOINT, CHECKPOINT_STATE = "checkpoint.keras", "checkpoint.json"


@dataclass
class TrainConfig:
    """Everything that defines a training run. ``None`` fields are resolved by ``resolved()``."""

    backbone: str
    data: str
    run_dir: str
    backend: str | None = None  # KERAS_BACKEND, else jax
    epochs: int = 10
    batch_size: int = 32
    image_size: int | None = None  # the backbone's native size
    lr: float = 1e-4  # Adam, as in the reference study
    weights: str | None = None  # imagenet for pretrained backbones, none for small_cnn
    augment: bool = True
    val_split: float = 0.1
    seed: int = 0
    freeze_backbone: bool = False
    cache: bool = False
    workers: int | None = None  # decoding threads; default: the CPU count (at most 8)
    devices: str | None = None  # "all" or a number: data parallel over local devices; default one
    mixed_precision: str | None = None  # "bfloat16" or "float16" compute on accelerators

    def resolved(self) -> "TrainConfig":
        spec = get_backbone(self.backbone)
        config = dataclasses.replace(
            self,
            image_size=self.image_size or spec.image_size,
            weights=self.weights or ("imagenet" if spec.pretrained else "none"),
            data=os.path.abspath(self.data),
            backend=self.backend or os.environ.get("KERAS_BACKEND") or "jax",
        )
        if config.epochs < 1:
            raise KbenchError(f"--epochs must be at least 1; got {config.epochs}")
        if config.lr <= 0:
            raise KbenchError(f"--lr must be positive; got {config.lr}")
        if config.image_size < spec.min_image_size:
            raise KbenchError(f"{spec.name} needs --image-size of at least {spec.min_image_size}")
        weights_kind(config.weights)  # a missing weights file fails before any data is read
        return config

    @classmethod
    def load(cls, run_dir: str) -> "TrainConfig":
        path = os.path.join(run_dir, CONFIG)
        if not os.path.isfile(path):
            raise KbenchError(f"{run_dir} is not a kbench run folder (no {CONFIG})")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in files.read_json(path).items() if k in known})


def resume_config(run_dir: str, epochs: int | None = None) -> TrainConfig:
    """The config of an interrupted run, optionally with a new total number of epochs."""
    config = TrainConfig.load(run_dir)
    config.run_dir = run_dir
    return dataclasses.replace(config, epochs=epochs) if epochs else config


def train(config: TrainConfig, resume: bool = False, verbose: int | str = "auto") -> dict:
    """Train ``config.backbone`` on ``config.data``; returns the metrics written to metrics.json.

    Raises KbenchError for bad input (before any model is built) and TrainingInterrupted after
    saving a checkpoint when SIGINT/SIGTERM arrives.
    """
    config = config.resolved()
    run_dir = config.run_dir
    state = _check_run_folder(run_dir, resume)
    images = find_images(config.data)
    train_idx, val_idx = _split(images, config, run_dir if resume else None)
    os.makedirs(run_dir, exist_ok=True)
    files.write_json(os.path.join(run_dir, CONFIG), dataclasses.asdict(config))
    files.write_json(os.path.join(run_dir, SPLIT), _split_record(images, config, train_idx, val_idx))

    use_backend(config.backend)  # before keras is imported
    doctor.warn_if_gpu_unseen(config.backend)
    import keras

    keras.utils.set_random_seed(config.seed)
    binary = len(images.classes) == 2
    with training_devices(config.devices, config.batch_size, config.mixed_precision) as devices:
        return _train_on(devices, config, images, train_idx, val_idx, state, binary, verbose)


def _train_on(devices, config, images, train_idx, val_idx, state, binary, verbose) -> dict:
    import keras

    run_dir = config.run_dir
    if state:
        model = keras.saving.load_model(os.path.join(run_dir, CHECKPOINT), safe_mode=True)
    else:
        model = _build_and_compile(config, len(images.classes))

    loader_options = dict(image_size=config.image_size, batch_size=config.batch_size, workers=config.workers)
    train_loader = ImageLoader(
        images, train_idx, augment=config.augment, shuffle=True, seed=config.seed, cache=config.cache, **loader_options
    )
    val_loader = ImageLoader(images, val_idx, cache=config.cache, **loader_options) if len(val_idx) else None
    history = state["history"] if state else []
    try:
        with _StopRequest() as stop:
            _fit(model, config, train_loader, val_loader, binary, history, stop, verbose, len(devices))
        files.save_model(model, os.path.join(run_dir, MODEL))
        result = _evaluate(model, val_loader, binary)
    finally:
        train_loader.close()
        if val_loader is not None:
            val_loader.close()

    skipped = images.skipped + [images.keys[i] for i in sorted({**train_loader.bad, **(val_loader.bad if val_loader else {})})]
    epoch_seconds = [row["epoch_seconds"] for row in history]
    steady = epoch_seconds[1:] or epoch_seconds  # the first epoch includes compilation
    record = {
        "backbone": config.backbone,
        "backend": keras.backend.backend(),
        "devices": devices,
        "image_size": config.image_size,
        "batch_size": config.batch_size,
        "global_batch_size": config.batch_size,
        "mixed_precision": config.mixed_precision,
        "epochs": config.epochs,
        "weights": config.weights,
        "classes": images.classes,
        "params": int(model.count_params()),
        "trainable_params": int(sum(np.prod(v.shape) for v in model.trainable_weights)),
        "train_images": int(len(train_idx)),
        "val_images": int(len(val_idx)),
        "epoch_seconds": epoch_seconds,
        "train_images_per_second": len(train_idx) / statistics.median(steady),
        **result,
        "skipped_images": skipped,
        "keras_version": keras.__version__,
    }
    files.write_json(os.path.join(run_dir, METRICS), record)
    for name in (CHECKPOINT, CHECKPOINT_STATE):
        if os.path.exists(os.path.join(run_dir, name)):
            os.remove(os.path.join(run_dir, name))
    if skipped:
        log.warning("%d image file(s) were skipped as unreadable", len(skipped))
    return record


def _check_run_folder(run_dir: str, resume: bool) -> dict | None:
    """The checkpoint state to resume from, or None for a fresh run; refuses to overwrite."""
    finished = os.path.exists(os.path.join(run_dir, METRICS))
    checkpoint = os.path.exists(os.path.join(run_dir, CHECKPOINT_STATE))
    if resume:
        if checkpoint:
            return files.read_json(os.path.join(run_dir, CHECKPOINT_STATE))
        if finished:
            raise KbenchError(f"{run_dir} has already finished training; nothing to resume")
        raise KbenchError(f"{run_dir} holds no checkpoint to resume from")
    if finished or checkpoint:
        what = "a finished run" if finished else "an interrupted run (continue it with --resume)"
        raise KbenchError(f"{run_dir} already holds {what}; choose another --run-dir or remove it")
    return None


def _split(images: ImageSet, config: TrainConfig, resume_from: str | None) -> tuple[np.ndarray, np.ndarray]:
    if resume_from:
        saved = files.read_json(os.path.join(resume_from, SPLIT))
        return indices_of(images, saved["train"]), indices_of(images, saved["val"])
    train_idx, val_idx = split_indices(images.labels, config.val_split, config.seed)
    if len(train_idx) == 0:
        raise KbenchError("no training images left after the validation split")
    return train_idx, val_idx


def _split_record(images: ImageSet, config: TrainConfig, train_idx, val_idx) -> dict:
    return {
        "data": config.data,
        "layout": images.layout,
        "classes": images.classes,
        "val_split": config.val_split,
        "seed": config.seed,
        "train": [images.keys[i] for i in train_idx],
        "val": [images.keys[i] for i in val_idx],
    }


def _build_and_compile(config: TrainConfig, num_classes: int):
    import keras

    from kbench.backbones import build_classifier

    model = build_classifier(
        get_backbone(config.backbone), num_classes, config.image_size, config.weights, config.freeze_backbone
    )
    loss = "binary_crossentropy" if num_classes == 2 else "sparse_categorical_crossentropy"
    model.compile(optimizer=keras.optimizers.Adam(config.lr), loss=loss, metrics=["accuracy"])
    return model


def epoch_batches(loader: ImageLoader, epoch: int, binary: bool, multiple: int = 1):
    """A keras PyDataset serving ``loader``'s batches of one epoch (labels shaped for the head).
    With ``multiple`` devices each batch is cut to a multiple of them, as data parallelism needs."""
    import keras

    class EpochBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False)  # the loader has its own threads

        def __len__(self):
            return len(loader)

        def __getitem__(self, index):
            pixels, labels = loader.batch(epoch, index)
            if multiple > 1:
                keep = len(labels) - len(labels) % multiple or len(labels)
                if len(labels) < multiple:  # a short last batch: repeat images to fill one row
                    repeat = np.resize(np.arange(len(labels)), multiple)
                    pixels, labels = pixels[repeat], labels[repeat]
                else:
                    pixels, labels = pixels[:keep], labels[:keep]
            return pixels, (labels.astype("float32")[:, None] if binary else labels)

    return EpochBatches()


def _fit(model, config, train_loader, val_loader, binary, history, stop, verbose, devices: int) -> None:
    """One ``fit`` call per epoch, so that each epoch's data order is fixed by its number and a
    resumed run replays exactly the epochs it missed."""
    import keras

    class EpochClock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start, self.seconds = time.perf_counter(), None

        def on_test_begin(self, logs=None):  # validation inside fit: not part of the epoch time
            if self.seconds is None:
                self.seconds = time.perf_counter() - self.start

        def on_epoch_end(self, epoch, logs=None):
            if self.seconds is None:
                self.seconds = time.perf_counter() - self.start

        def on_train_batch_end(self, batch, logs=None):
            if stop.signal is not None:
                self.model.stop_training = True

    class Progress(keras.callbacks.ProgbarLogger):
        def set_params(self, params):
            super().set_params(params)
            self.epochs = config.epochs  # one fit per epoch: show the run's total, not 1

    clock = EpochClock()
    callbacks = [clock] + ([Progress()] if verbose else [])
    val_data = epoch_batches(val_loader, 0, binary, devices) if val_loader is not None else None
    for epoch in range(len(history), config.epochs):
        if stop.signal is None:
            logs = model.fit(
                epoch_batches(train_loader, epoch, binary, devices),
                validation_data=val_data,
                initial_epoch=epoch,
                epochs=epoch + 1,
                callbacks=callbacks,
                verbose=verbose,
            ).history
        if stop.signal is not None:  # the interrupted epoch is redone on resume
            _save_checkpoint(model, config.run_dir, history)
            raise TrainingInterrupted(
                f"interrupted in epoch {epoch + 1}/{config.epochs}; checkpoint saved in {config.run_dir}; "
                f"continue with: kbench train --run-dir {config.run_dir} --resume",
                stop.signal,
            )
        row = {"epoch": epoch + 1, "epoch_seconds": clock.seconds}
        row.update({name: float(values[-1]) for name, values in logs.items()})
        history.append(row)
        files.write_csv(os.path.join(config.run_dir, HISTORY), history)
        if epoch + 1 < config.epochs:
            _save_checkpoint(model, config.run_dir, history)


def _save_checkpoint(model, run_dir: str, history: list[dict]) -> None:
    files.save_model(model, os.path.join(run_dir, CHECKPOINT))
    files.write_json(os.path.join(run_dir, CHECKPOINT_STATE), {"epochs_done": len(history), "history": history})


def predict(predict_batch, loader: ImageLoader) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, labels) of ``predict_batch(pixels)`` over ``loader`` in order (e.g.
    ``model.predict_on_batch`` or an ONNX Runtime session); unreadable images are left out of both."""
    probabilities, labels = [], []
    try:
        for pixels, batch_labels in loader:
            probabilities.append(np.asarray(predict_batch(pixels)))
            labels.append(batch_labels)
    finally:
        loader.close()
    return np.concatenate(probabilities), np.concatenate(labels)


def load_split(run_dir: str, part: str) -> tuple[ImageSet, np.ndarray]:
    """The images and indices of a run folder's ``train`` or ``val`` part (split.json)."""
    path = os.path.join(run_dir, SPLIT)
    if not os.path.isfile(path):
        raise KbenchError(f"{run_dir} has no {SPLIT} (is it a kbench run or ensemble folder?)")
    split = files.read_json(path)
    images = find_images(split["data"])
    return images, indices_of(images, split[part])


def _evaluate(model, val_loader: ImageLoader | None, binary: bool) -> dict:
    if val_loader is None:
        return {"val_log_loss": None, "val_accuracy": None}
    probabilities, labels = predict(model.predict_on_batch, val_loader)
    return {
        "val_log_loss": metrics.log_loss(labels, probabilities),
        "val_accuracy": metrics.accuracy(labels, probabilities),
    }


class _StopRequest:
    """Turns the first SIGINT/SIGTERM into a request to stop after the current batch; a second
    SIGINT aborts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict = {}

    def _handle(self, signal_number, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal_number
        log.warning("stopping after this batch to save a checkpoint (Ctrl-C again aborts without one)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        return False
