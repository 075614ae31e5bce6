"""Fit one backbone on image files; time its epochs; evaluate it; write the run folder.

What a run is (its options) is ``kbench.training.config``; how its model is set up and optimised (the
phases, the optimizer, the learning-rate schedule) is ``kbench.training.recipe``. This module runs it: the
folder (whose files and lock belong to ``kbench.training.runs``), the one-``fit``-per-epoch loop, the
checkpoints, and the stop requests. ``config.json`` holds every resolved option (the run can be
repeated from it, and ``--resume`` compares new options with it); a checkpoint is written at every
epoch's start, and never mid-epoch: after Ctrl-C / SIGTERM (or kill -9) ``resume=True`` redoes the
interrupted epoch from it, as the uninterrupted run trained it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from kbench.core import metrics
from kbench.core.backend import default_notice
from kbench.core.errors import STOP_REQUESTS, KbenchError, TrainingInterrupted, first_line
from kbench.data.dataset import ImageSet, data_change, find_images, fingerprints, indices_of, split_indices
from kbench.data.loader import ImageLoader, predict
from kbench.training import distributed, recipe
from kbench.training.config import TrainConfig
from kbench.training.curves import write_curves
from kbench.training.devices import check_devices, process_local_values, training_devices
from kbench.training.runs import CHECKPOINT, CHECKPOINT_STATE, CURVES, HISTORY, METRICS, Run, file_hash

log = logging.getLogger("kbench")


def train(config: TrainConfig, resume: bool = False, verbose: int | str = "auto", overwrite: bool = False) -> dict:
    """Train ``config.backbone`` on ``config.data``; returns the metrics written to metrics.json.

    Raises KbenchError for bad input (before any model is built) and TrainingInterrupted when
    SIGINT/SIGTERM arrives, leaving the checkpoint of the interrupted epoch's start to resume from.
    """
    if notice := default_notice(config.backend):  # once, when the machine picked the backend
        log.info(notice)
    given_data = config.data  # as the user wrote it: what refusals name (config.json records it absolute)
    config = config.resolved()
    images = find_images(given_data, layout=config.layout)
    binary = len(images.classes) == 2
    if notice := check_devices(config.devices, config.batch_size, config.mixed_precision, config.backbone):
        log.info(notice)  # bfloat16 on a CPU: what to expect; checked before anything is written
    if config.label_smoothing and not binary:
        raise KbenchError(f"--label-smoothing works with two classes; {given_data} has {len(images.classes)}")
    # several processes training together (kbench.training.distributed): process 0 alone writes the folder
    run = Run(config.run_dir, writer=distributed.process_index() == 0)
    agreed = False
    try:
        with run.lock():
            state = run.prepare("backbone", overwrite=overwrite, resume=resume)
            if state and config.epochs < len(state["history"]):
                raise KbenchError(
                    f"--epochs {config.epochs} is fewer than the {len(state['history'])} epochs {run.path} has trained"
                )
            agreed = True  # before: a process told here that process 0 refused must not ask again
            distributed.agree(True, f"--run-dir {run.path}")
            # every process resumes from the same checkpoint (process 0 alone wrote it), or none does
            resumed = [len(state["history"]), int(file_hash(run.file(CHECKPOINT))[:7], 16)] if state else [0, 0]
            distributed.same_everywhere(resumed, "the checkpoint to resume from (epochs, content)")
            return _train_prepared(run, config, images, state, resume, verbose)
    except Exception:
        if not agreed:  # every process meets process 0's decision once, refused or not
            distributed.agree(False, f"--run-dir {run.path}")
        raise


def _train_prepared(run: Run, config: TrainConfig, images, state, resume, verbose) -> dict:
    try:
        train_idx, val_idx = _split(images, config, run if resume else None)
        run.write_config(config.record())
        run.write_split(_split_record(images, config, train_idx, val_idx))
        import keras

        keras.utils.set_random_seed(config.seed)  # the same initial weights in every process
        with training_devices(config.devices, config.batch_size, config.mixed_precision) as devices:
            return _train_on(run, devices, config, images, train_idx, val_idx, state, verbose)
    except BaseException as error:
        interrupted = isinstance(error, (TrainingInterrupted, KeyboardInterrupt)) and run.exists(CHECKPOINT_STATE)
        if not (resume or interrupted or run.exists(HISTORY) or run.exists(METRICS)):
            run.clear()  # failed in its first epoch: nothing half-written stays
        raise


def _train_on(run: Run, devices, config, images, train_idx, val_idx, state, verbose) -> dict:
    import keras

    processes = distributed.process_count()
    # uint8 to the device, a quarter of float32's bytes: the model casts its input there
    loader_options = dict(
        image_size=config.image_size, batch_size=config.batch_size, workers=config.workers, pixel_dtype="uint8"
    )
    shard = dict(shard=(distributed.process_index(), processes), multiple=len(devices)) if processes > 1 else {}
    train_loader = ImageLoader(
        images,
        train_idx,
        augment=config.augment,
        shuffle=True,
        seed=config.seed,
        cache=config.cache,
        **loader_options,
        **shard,
    )
    val_loader = ImageLoader(images, val_idx, cache=config.cache, **loader_options, **shard) if len(val_idx) else None
    feed = _Feed(train_loader, val_loader, len(images.classes), len(devices))
    if state:
        recipe.schedule_class()  # registered before the checkpoint's optimizer is deserialised
        try:
            import kbench.models.layers  # noqa: F401  (kbench's preprocessing layer, registered before loading)

            model = keras.saving.load_model(run.file(CHECKPOINT), safe_mode=True)
        except Exception as error:
            raise KbenchError(
                f"the checkpoint in {run.path} can't be loaded ({first_line(error, 200, named=True)}); "
                "remove the folder and train again"
            ) from None
    else:
        model = recipe.build_model(config, feed.num_classes)
        recipe.compile_model(model, config, feed.num_classes, len(feed.train), 0)

    progress = _Progress.resumed(config, state)
    history = progress.history
    alone = contextlib.ExitStack()
    try:
        with _StopRequest() as stop:
            _fit(model, run, config, feed, progress, stop, verbose)
        model_epoch = len(history)
        if processes > 1:
            # From here process 0 works alone, on its replica of the weights (the same in every
            # process); the others are done. It evaluates on the whole validation split.
            alone.enter_context(process_local_values(model))
            if not run.writer:
                return {"process": distributed.process_index(), "processes": processes, "run_dir": run.path}
            if val_loader is not None:  # --val-split 0: nothing to evaluate
                val_loader.close()
            val_loader = ImageLoader(images, val_idx, **loader_options) if len(val_idx) else None
        if config.early_stopping and progress.best_epoch not in (None, model_epoch):
            run.load_best(model)
            model_epoch = progress.best_epoch
        if config.schedule != "constant" or config.warmup_epochs:
            # kbench's schedule class would make model.keras unreadable by keras.saving.load_model
            # elsewhere (compile=True): the finished model carries a fresh optimizer at a plain rate
            plain = dataclasses.replace(config, schedule="constant", warmup_epochs=0, lr=history[-1]["lr"] or config.lr)
            recipe.compile_model(model, plain, feed.num_classes, len(feed.train), 0)
        run.save_model(model)
        result = _evaluate(model, val_loader, feed.binary)
    finally:
        alone.close()
        train_loader.close()
        if val_loader is not None:
            val_loader.close()

    unreadable = {**train_loader.bad, **(val_loader.bad if val_loader else {})}
    skipped = images.skipped + [images.keys[i] for i in sorted(unreadable)]
    # the images trained and validated on: files that could not be decoded were left out of both
    train_images = len(train_idx) - len(train_loader.bad)
    val_images = len(val_idx) - len(val_loader.bad if val_loader else {})
    epoch_seconds = [row["epoch_seconds"] for row in history]
    compiled = sorted(set(e for e in progress.compiled if e <= len(history)))
    steady = [s for epoch, s in enumerate(epoch_seconds, 1) if epoch not in compiled] or epoch_seconds
    record = {
        "kind": "backbone",
        "backbone": config.backbone,
        "backend": keras.backend.backend(),
        "devices": devices,
        "processes": processes,
        "image_size": config.image_size,
        "batch_size": config.batch_size,
        "global_batch_size": config.batch_size,
        "mixed_precision": config.mixed_precision,
        "epochs": config.epochs,
        "epochs_trained": len(history),
        "best_epoch": progress.best_epoch,  # lowest validation log loss
        "model_epoch": model_epoch,  # whose weights model.keras holds: the best one with early stopping
        "weights": config.weights,
        "recipe": recipe.settings(config),
        "classes": images.classes,
        "params": int(model.count_params()),
        "trainable_params": int(sum(np.prod(v.shape) for v in model.trainable_weights)),
        "train_images": int(train_images),
        "val_images": int(val_images),
        "epoch_seconds": epoch_seconds,
        "epochs_with_compilation": compiled,
        "train_images_per_second": train_images / statistics.median(steady),
        **result,
        "skipped_images": skipped,
        "keras_version": keras.__version__,
    }
    run.write_metrics(record)
    run.clear_checkpoint()
    if skipped:
        log.warning("%d image file(s) were skipped as unreadable", len(skipped))
    return record


def _split(images: ImageSet, config: TrainConfig, resume_from: Run | None) -> tuple[np.ndarray, np.ndarray]:
    if resume_from:
        saved = resume_from.split
        change = data_change(saved, images)
        if change == "changed":
            raise KbenchError(
                f"{images.root} no longer holds the images {resume_from.path} was trained on (other files, "
                "labels or pixels); resume needs the same data"
            )
        if change == "unverified":
            log.warning(
                "%s was started by an earlier kbench that didn't record the images' content: resuming on the "
                "same file names, unchecked",
                resume_from.path,
            )
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
        **fingerprints(images),
        "val_split": config.val_split,
        "seed": config.seed,
        "train": [images.keys[i] for i in train_idx],
        "val": [images.keys[i] for i in val_idx],
    }


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
            if loader.shard[1] > 1:  # one of several processes: the loader cut the batch already
                wanted = len(loader.members(epoch, index))
                if len(labels) < wanted:  # unreadable images: every process must feed as many
                    repeat = np.resize(np.arange(len(labels)), wanted)
                    pixels, labels = pixels[repeat], labels[repeat]
            elif multiple > 1:
                keep = len(labels) - len(labels) % multiple or len(labels)
                if len(labels) < multiple:  # a short last batch: repeat images to fill one row
                    repeat = np.resize(np.arange(len(labels)), multiple)
                    pixels, labels = pixels[repeat], labels[repeat]
                else:
                    pixels, labels = pixels[:keep], labels[:keep]
            return pixels, (labels.astype("float32")[:, None] if binary else labels)

    return EpochBatches()


@dataclass
class _Feed:
    """What ``fit`` reads: the loaders, and how their batches are shaped for the head and the devices."""

    train: ImageLoader
    val: ImageLoader | None
    num_classes: int
    devices: int

    @property
    def binary(self) -> bool:
        return self.num_classes == 2

    def batches(self, loader: ImageLoader, epoch: int):
        return epoch_batches(loader, epoch, self.binary, self.devices)


@dataclass
class _Progress:
    """How far a run has come: what a checkpoint holds beside the model, so that a resumed run
    switches phase, keeps its best epoch and stops where a whole one does."""

    phase: str
    history: list[dict] = field(default_factory=list)
    compiled: list[int] = field(default_factory=list)  # epochs (1-based) in which a process compiled
    best_epoch: int | None = None
    best_val_loss: float | None = None
    saved: int | None = None  # the epochs done of the checkpoint in the run folder

    @classmethod
    def resumed(cls, config: TrainConfig, state: dict | None) -> "_Progress":
        """From a checkpoint's state (None: a new run); this process compiles in its first epoch."""
        if not state:
            return cls(recipe.phase(config, 0), [], [1])
        history = state["history"]
        return cls(
            state.get("phase", recipe.phase(config, len(history))),
            history,
            [*state.get("epochs_with_compilation", [1]), len(history) + 1],
            state.get("best_epoch"),
            state.get("best_val_loss"),
            state.get("epochs_done", len(history)),
        )

    def state(self) -> dict:
        """What checkpoint.json holds."""
        return {
            "epochs_done": len(self.history),
            "history": self.history,
            "epochs_with_compilation": self.compiled,
            "phase": self.phase,
            "best_epoch": self.best_epoch,
            "best_val_loss": self.best_val_loss,
        }


def _fit(model, run: Run, config: TrainConfig, feed: _Feed, progress: _Progress, stop, verbose) -> None:
    """One ``fit`` call per epoch, so that each epoch's data order is fixed by its number and a
    resumed run replays exactly the epochs it missed. The checkpoint (with ``progress``) is written as
    each epoch begins, never mid-epoch: a stopped epoch is redone from the state it began with."""
    import keras

    history = progress.history

    class EpochClock(keras.callbacks.Callback):
        # Reads no value of a step on the training thread: under JAX, Keras then dispatches the batch
        # callbacks to its own threads (which wait for each step's logs) and the steps run back to
        # back. The epoch's time ends when the last step's logs were ready (validation not counted).
        async_safe = True

        def __init__(self):
            super().__init__()
            # several processes agree on a stop after every batch (a collective): in order, on the
            # training thread, never on Keras' callback threads
            self.async_safe = distributed.process_count() == 1

        def on_epoch_begin(self, epoch, logs=None):
            self.start, self.finished, self.seconds = time.perf_counter(), None, None
            self.lock = threading.Lock()

        def on_train_batch_end(self, batch, logs=None):
            with self.lock:
                self.finished = max(self.finished or 0.0, time.perf_counter())
            if stop.agreed() is not None:
                if distributed.process_count() > 1:
                    raise _AgreedStop  # every process after this same batch, none validating alone
                self.model.stop_training = True

        def on_epoch_end(self, epoch, logs=None):
            self.seconds = (self.finished or time.perf_counter()) - self.start
            loss = (logs or {}).get("loss")
            if loss is not None and not np.isfinite(float(loss)):
                raise KbenchError(
                    f"training diverged: the loss is {float(loss)} in epoch {len(history) + 1}; "
                    f"lower --lr (now {config.lr})"
                )

    class Progress(keras.callbacks.ProgbarLogger):
        # Its updates come from Keras' callback threads under JAX: one at a time, never backwards.
        async_safe = True

        def set_params(self, params):
            super().set_params(params)
            self.epochs = config.epochs  # one fit per epoch: show the run's total, not 1
            self.lock, self.shown = threading.Lock(), -1

        def on_train_batch_end(self, batch, logs=None):
            with self.lock:
                if batch > self.shown:
                    self.shown = batch
                    super().on_train_batch_end(batch, logs)

        def on_epoch_begin(self, epoch, logs=None):
            self.shown = -1
            super().on_epoch_begin(epoch, logs)

    clock = EpochClock()
    callbacks = [clock] + ([Progress()] if verbose else [])
    val_data = feed.batches(feed.val, 0) if feed.val is not None else None
    monitor = "val_log_loss" if config.label_smoothing else "val_loss"  # the log loss, not the smoothed loss
    for epoch in range(len(history), config.epochs):
        if progress.saved != epoch:  # before a phase switch: a resumed run recompiles as this one does
            if not model.optimizer.built:  # a new run's: saved with its (zero) state, which loads as is
                model.optimizer.build(model.trainable_variables)
            with process_local_values(model):
                run.save_checkpoint(model, progress.state())
            progress.saved = epoch
        stopping = stop.agreed()
        if stopping is None and recipe.phase(config, epoch) != progress.phase:  # head -> full
            progress.phase = recipe.phase(config, epoch)
            recipe.set_phase(model, progress.phase, config.frozen_bn)
            # a fresh optimizer whenever the phase starts
            recipe.compile_model(model, config, feed.num_classes, len(feed.train), epoch)
            progress.compiled.append(epoch + 1)
        if stopping is None:
            try:
                logs = model.fit(
                    feed.batches(feed.train, epoch),
                    validation_data=val_data,
                    initial_epoch=epoch,
                    epochs=epoch + 1,
                    shuffle=False,  # the loader orders each epoch by (seed, epoch); keras' own shuffle uses
                    # Python's global random state, which a resumed process has consumed differently
                    callbacks=callbacks,
                    verbose=verbose,
                ).history
            except _AgreedStop:
                pass
        if stop.agreed() is not None:  # the checkpoint of this epoch's start stays: --resume redoes it
            raise TrainingInterrupted(
                f"interrupted in epoch {epoch + 1}/{config.epochs}; the checkpoint of its start is in "
                f"{run.path}; continue with: kbench train --run-dir {run.path} --resume",
                stop.signal,
            )
        row = {
            "epoch": epoch + 1,
            "phase": progress.phase,
            "lr": recipe.current_lr(model.optimizer),
            "epoch_seconds": clock.seconds,
        }
        row.update({name: float(values[-1]) for name, values in logs.items()})
        history.append(row)
        run.write_history(history)
        title = run.name if run.name == config.backbone else f"{run.name} ({config.backbone})"
        if run.writer:  # redrawn with each checkpoint, so it is never stale
            write_curves(history, run.file(CURVES), title)
        if monitor in row and (progress.best_val_loss is None or row[monitor] < progress.best_val_loss):
            progress.best_epoch, progress.best_val_loss = epoch + 1, row[monitor]
            if config.early_stopping:
                with process_local_values(model):
                    run.save_best(model)
        waited = epoch + 1 - (progress.best_epoch or epoch + 1)
        if config.early_stopping and waited >= config.early_stopping:
            log.info(
                "early stopping after epoch %d: no better validation log loss since epoch %d",
                epoch + 1,
                progress.best_epoch,
            )
            break


def _evaluate(model, val_loader: ImageLoader | None, binary: bool) -> dict:
    if val_loader is None:
        return {"val_log_loss": None, "val_accuracy": None}
    probabilities, labels = predict(model.predict_on_batch, val_loader)
    return {
        "val_log_loss": metrics.log_loss(labels, probabilities),
        "val_accuracy": metrics.accuracy(labels, probabilities),
    }


class _AgreedStop(Exception):
    """Every process training together stops after the same batch (``_StopRequest.agreed``)."""


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
        log.warning("stopping after this batch; --resume redoes this epoch from its start (Ctrl-C again: at once)")

    def agreed(self) -> int | None:
        """The stop request: this process's, or where several train as one, any process's, so that
        all stop after the same batch (one that stopped alone would leave the others waiting in a
        collective). An all-gather there: call it on every process at the same points."""
        requested = distributed.largest_everywhere(self.signal or 0)
        if requested and self.signal is None:
            self.signal = requested
        return self.signal

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        if STOP_REQUESTS:  # asked before training began (its KeyboardInterrupt may have been swallowed)
            self.signal = STOP_REQUESTS[0]
        return self

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        return False
