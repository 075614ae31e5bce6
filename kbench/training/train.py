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
import statistics
from dataclasses import dataclass, field

import numpy as np

from kbench.core import metrics
from kbench.core.backend import default_notice
from kbench.core.errors import KbenchError, TrainingInterrupted, first_line
from kbench.data.dataset import ImageSet, data_change, find_images, fingerprints, indices_of, split_indices
from kbench.data.loader import ImageLoader, predict
from kbench.training import distributed, recipe
from kbench.training.config import TrainConfig
from kbench.training.curves import write_curves
from kbench.training.devices import check_devices, process_local_values, training_devices
from kbench.training.epochs import AgreedStop, StopRequest, epoch_callbacks
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
            return _train_on(_Job(run, config, images, train_idx, val_idx, devices, verbose), state)
    except BaseException as error:
        interrupted = isinstance(error, (TrainingInterrupted, KeyboardInterrupt)) and run.exists(CHECKPOINT_STATE)
        if not (resume or interrupted or run.exists(HISTORY) or run.exists(METRICS)):
            run.clear()  # failed in its first epoch: nothing half-written stays
        raise


@dataclass
class _Job:
    """What one process trains: the run folder, the resolved options, the images and their split."""

    run: Run
    config: TrainConfig
    images: ImageSet
    train_idx: np.ndarray
    val_idx: np.ndarray
    devices: list  # the devices training_devices() chose
    verbose: int | str

    def loader(self, indices, **options) -> ImageLoader:
        # uint8 to the device, a quarter of float32's bytes: the model casts its input there
        config = self.config
        sizes = dict(image_size=config.image_size, batch_size=config.batch_size, workers=config.workers)
        return ImageLoader(self.images, indices, pixel_dtype="uint8", **sizes, **options)


def _train_on(job: _Job, state) -> dict:
    import keras

    run, config, processes = job.run, job.config, distributed.process_count()
    shard = dict(shard=(distributed.process_index(), processes), multiple=len(job.devices)) if processes > 1 else {}
    train_loader = job.loader(
        job.train_idx, augment=config.augment, shuffle=True, seed=config.seed, cache=config.cache, **shard
    )
    val_loader = job.loader(job.val_idx, cache=config.cache, **shard) if len(job.val_idx) else None
    feed = _Feed(train_loader, val_loader, len(job.images.classes), len(job.devices))
    model = _model(run, config, feed, state)
    progress = _Progress.resumed(config, state)
    alone = contextlib.ExitStack()
    try:
        with StopRequest() as stop:
            _fit(model, job, feed, progress, stop)
        if processes > 1:
            # From here process 0 works alone, on its replica of the weights (the same in every
            # process); the others are done. It evaluates on the whole validation split.
            alone.enter_context(process_local_values(model))
            if not run.writer:
                return {"process": distributed.process_index(), "processes": processes, "run_dir": run.path}
            if val_loader is not None:  # --val-split 0: nothing to evaluate
                val_loader.close()
            val_loader = job.loader(job.val_idx) if len(job.val_idx) else None
        model_epoch = _final_weights(model, run, config, feed, progress)
        run.save_model(model)
        result = _evaluate(model, val_loader, feed.binary)
    finally:
        alone.close()
        train_loader.close()
        if val_loader is not None:
            val_loader.close()

    unreadable = {**train_loader.bad, **(val_loader.bad if val_loader else {})}
    skipped = job.images.skipped + [job.images.keys[i] for i in sorted(unreadable)]
    # the images trained and validated on: files that could not be decoded were left out of both
    counted = (len(job.train_idx) - len(train_loader.bad), len(job.val_idx) - len(val_loader.bad if val_loader else {}))
    record = {
        **_metrics_record(job, model, progress, model_epoch, *counted),
        **result,
        "skipped_images": skipped,
        "keras_version": keras.__version__,
    }
    run.write_metrics(record)
    run.clear_checkpoint()
    if skipped:
        log.warning("%d image file(s) were skipped as unreadable", len(skipped))
    return record


def _model(run: Run, config: TrainConfig, feed: "_Feed", state: dict | None):
    """The checkpoint's model when resuming (``state``), else a new one, compiled for its first phase."""
    import keras

    if not state:
        model = recipe.build_model(config, feed.num_classes)
        recipe.compile_model(model, config, feed.num_classes, len(feed.train), 0)
        return model
    recipe.schedule_class()  # registered before the checkpoint's optimizer is deserialised
    try:
        import kbench.models.layers  # noqa: F401  (kbench's preprocessing layer, registered before loading)

        return keras.saving.load_model(run.file(CHECKPOINT), safe_mode=True)
    except Exception as error:
        raise KbenchError(
            f"the checkpoint in {run.path} can't be loaded ({first_line(error, 200, named=True)}); "
            "remove the folder and train again"
        ) from None


def _final_weights(model, run: Run, config: TrainConfig, feed: "_Feed", progress: "_Progress") -> int:
    """Puts the weights model.keras keeps into ``model`` (the best epoch's with early stopping) with a
    plain optimizer; returns their epoch."""
    history = progress.history
    model_epoch = len(history)
    if config.early_stopping and progress.best_epoch not in (None, model_epoch):
        run.load_best(model)
        model_epoch = progress.best_epoch
    if config.schedule != "constant" or config.warmup_epochs:
        # kbench's schedule class would make model.keras unreadable by keras.saving.load_model
        # elsewhere (compile=True): the finished model carries a fresh optimizer at a plain rate
        plain = dataclasses.replace(config, schedule="constant", warmup_epochs=0, lr=history[-1]["lr"] or config.lr)
        recipe.compile_model(model, plain, feed.num_classes, len(feed.train), 0)
    return model_epoch


def _metrics_record(
    job: _Job, model, progress: "_Progress", model_epoch: int, train_images: int, val_images: int
) -> dict:
    """metrics.json's settings, sizes and epoch times (the evaluation is added by the caller);
    ``train_images`` and ``val_images`` count the images decoded, not files that could not be."""
    import keras

    config, history = job.config, progress.history
    epoch_seconds = [row["epoch_seconds"] for row in history]
    compiled = sorted(set(e for e in progress.compiled if e <= len(history)))
    steady = [s for epoch, s in enumerate(epoch_seconds, 1) if epoch not in compiled] or epoch_seconds
    return {
        "kind": "backbone",
        "backbone": config.backbone,
        "backend": keras.backend.backend(),
        "devices": job.devices,
        "processes": distributed.process_count(),
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
        "classes": job.images.classes,
        "params": int(model.count_params()),
        "trainable_params": int(sum(np.prod(v.shape) for v in model.trainable_weights)),
        "train_images": int(train_images),
        "val_images": int(val_images),
        "epoch_seconds": epoch_seconds,
        "epochs_with_compilation": compiled,
        "train_images_per_second": train_images / statistics.median(steady),
    }


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


def _fit(model, job: _Job, feed: _Feed, progress: _Progress, stop) -> None:
    """One ``fit`` call per epoch, so that each epoch's data order is fixed by its number and a
    resumed run replays exactly the epochs it missed. The checkpoint (with ``progress``) is written as
    each epoch begins, never mid-epoch: a stopped epoch is redone from the state it began with."""
    run, config = job.run, job.config
    clock, callbacks = epoch_callbacks(config, progress.history, stop, job.verbose)
    val_data = feed.batches(feed.val, 0) if feed.val is not None else None
    for epoch in range(len(progress.history), config.epochs):
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
                    verbose=job.verbose,
                ).history
            except AgreedStop:
                pass
        if stop.agreed() is not None:  # the checkpoint of this epoch's start stays: --resume redoes it
            raise TrainingInterrupted(
                f"interrupted in epoch {epoch + 1}/{config.epochs}; the checkpoint of its start is in "
                f"{run.path}; continue with: kbench train --run-dir {run.path} --resume",
                stop.signal,
            )
        if _epoch_done(model, run, config, progress, clock.seconds, logs):
            break


def _epoch_done(model, run: Run, config: TrainConfig, progress: _Progress, epoch_seconds, logs: dict) -> bool:
    """Records the epoch that ended (history, curves, the best epoch and its weights); True when
    early stopping ends the run here."""
    history = progress.history
    epoch = len(history)  # 0-based, as fit counts
    row = {
        "epoch": epoch + 1,
        "phase": progress.phase,
        "lr": recipe.current_lr(model.optimizer),
        "epoch_seconds": epoch_seconds,
    }
    row.update({name: float(values[-1]) for name, values in logs.items()})
    history.append(row)
    run.write_history(history)
    title = run.name if run.name == config.backbone else f"{run.name} ({config.backbone})"
    if run.writer:  # redrawn with each checkpoint, so it is never stale
        write_curves(history, run.file(CURVES), title)
    monitor = "val_log_loss" if config.label_smoothing else "val_loss"  # the log loss, not the smoothed loss
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
        return True
    return False


def _evaluate(model, val_loader: ImageLoader | None, binary: bool) -> dict:
    if val_loader is None:
        return {"val_log_loss": None, "val_accuracy": None}
    probabilities, labels = predict(model.predict_on_batch, val_loader)
    return {
        "val_log_loss": metrics.log_loss(labels, probabilities),
        "val_accuracy": metrics.accuracy(labels, probabilities),
    }
