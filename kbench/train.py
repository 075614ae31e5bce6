"""Fit one backbone on image files; time its epochs; evaluate it; write the run folder.

The folder's files and lock belong to ``kbench.runs``. ``config.json`` holds every resolved option
(the run can be repeated from it, and ``--resume`` compares new options with it); a checkpoint is
written after every epoch and on Ctrl-C / SIGTERM, which ``resume=True`` continues.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import signal
import statistics
import threading
import time
from dataclasses import dataclass

import numpy as np

from kbench import distributed, doctor, metrics
from kbench.backbones import get_backbone, weights_kind
from kbench.backend import default_notice, use_backend
from kbench.config import from_dict, option, positive
from kbench.data import LAYOUTS, ImageLoader, ImageSet, find_images, indices_of, predict, split_indices
from kbench.devices import check_devices, count_devices, process_local_values, training_devices
from kbench.errors import STOP_REQUESTS, KbenchError, TrainingInterrupted
from kbench.plots import write_curves
from kbench.runs import CHECKPOINT, CHECKPOINT_STATE, CURVES, METRICS, Run, data_fingerprint, file_hash

log = logging.getLogger("kbench")

MAX_IMAGE_SIZE = 1024  # pixels per side; the largest native size is 600 (EfficientNet-B7)
# What may differ between a run's config and a resumed run's: the length of the run.
RESUMABLE_CHANGES = ("epochs",)
SCHEDULES = ("constant", "cosine")
PHASES = ("head", "full")


@dataclass
class TrainConfig:
    """Everything that defines a training run. ``None`` fields are resolved by ``resolved()``."""

    backbone: str = option(help="Registered backbone name (see `kbench backbones`).")
    data: str = option(help="Kaggle train folder or train.zip, or one folder per class.", path=True)
    run_dir: str = option(help="Folder for the model, metrics and history.", path=True)
    backend: str | None = None  # --backend, else KERAS_BACKEND, else kbench.backend's default
    epochs: int = option(10, "Training epochs.")
    batch_size: int = option(32, "Images per step.")
    image_size: int | None = option(None, "Pixels per side.", shown_default="the backbone's native size")
    lr: float = option(1e-4, "Adam learning rate; the peak with a warm-up or schedule (1e-4: the reference study's).")
    weights: str | None = option(
        None,
        "imagenet, none, or a weights file (.keras, .weights.h5, backbone .h5).",
        shown_default="imagenet; none for small_cnn",
    )
    augment: bool = option(True, "The reference study's flips and crops.")
    val_split: float = option(0.1, "Stratified hold-out fraction.")
    seed: int = option(0, "Seed for the split, shuffling, augmentation and weights.")
    freeze_backbone: bool = option(False, "Train only the head.")
    cache: bool = option(False, "Keep decoded images in memory after the first epoch.")
    workers: int | None = option(None, "Image decoding threads.", shown_default="CPU count, at most 8")
    devices: str | None = option(None, "Data parallel over 'all' local devices or N of them.", shown_default="one")
    mixed_precision: str | None = option(
        None,
        "Mixed-precision compute on GPUs (float32 head and loss).",
        choices=("bfloat16", "float16"),
        flag_value="bfloat16",
    )
    layout: str = option(
        "auto", "How labels are read from the data (see README).", choices=("auto", "kaggle", "folders")
    )
    # The fine-tuning recipe. The defaults are the reference study's: every layer trains from the first
    # step at a constant Adam rate for a fixed number of epochs (seed.toml adds train_bn = true).
    head_epochs: int = option(0, "Epochs with the backbone frozen (only the head trains) before it is unfrozen.")
    train_bn: bool = option(
        False,
        "Let BatchNormalization layers of a pretrained backbone train (update their "
        "statistics); by default they run in inference mode when fine-tuning from imagenet or "
        "a weights file. From random weights they always train.",
    )
    bn_momentum: float | None = option(
        None,
        "Momentum of the backbone's BatchNormalization statistics; 0.9 lets "
        "them settle within the few hundred steps of a small run from random weights.",
        shown_default="the backbone's own (0.99 or 0.999)",
    )
    schedule: str = option("constant", "Learning-rate schedule after the warm-up.", choices=SCHEDULES)
    warmup_epochs: int = option(0, "Epochs of linear learning-rate warm-up from 0 to --lr.")
    weight_decay: float = option(0.0, "Decoupled weight decay (AdamW) when > 0, on every trainable weight.")
    label_smoothing: float = option(
        0.0,
        "Label smoothing (two classes only). It raises the log loss unless the "
        "probabilities are calibrated afterwards.",
    )
    early_stopping: int = option(
        0,
        "Stop when the validation log loss hasn't improved for this many epochs and "
        "keep the best epoch's weights; 0: off.",
    )

    def check(self) -> "TrainConfig":
        """KbenchError in one line for any value that can't work, before anything is read or built."""
        for name in ("epochs", "batch_size"):
            positive(getattr(self, name), f"--{name.replace('_', '-')}", whole=True)
        positive(self.lr, "--lr")
        if self.image_size is not None:
            positive(self.image_size, "--image-size", whole=True)
            if self.image_size > MAX_IMAGE_SIZE:
                raise KbenchError(
                    f"--image-size {self.image_size} is more than {MAX_IMAGE_SIZE} pixels per side, "
                    "larger than any backbone is trained at"
                )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise KbenchError(f"--seed must be a whole number >= 0 and < 2**32; got {self.seed}")
        if self.workers is not None:
            positive(self.workers, "--workers", whole=True)
        if not (isinstance(self.val_split, (int, float)) and 0 <= self.val_split < 1):
            raise KbenchError(f"--val-split must be in [0, 1); got {self.val_split}")
        if self.layout not in LAYOUTS:
            raise KbenchError(f"--layout must be one of {', '.join(LAYOUTS)}; got {self.layout!r}")
        if self.devices is not None:
            count_devices(self.devices, available=10**6)  # its form; the count is checked on the devices
        for name in ("head_epochs", "warmup_epochs", "early_stopping"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise KbenchError(f"--{name.replace('_', '-')} must be a whole number >= 0; got {value}")
        if self.head_epochs and self.head_epochs >= self.epochs and not self.freeze_backbone:
            raise KbenchError(
                f"--head-epochs {self.head_epochs} leaves none of the {self.epochs} epochs to fine-tune "
                "the backbone; use --freeze-backbone to train only the head"
            )
        if self.warmup_epochs >= self.epochs and self.warmup_epochs:
            raise KbenchError(f"--warmup-epochs {self.warmup_epochs} must be fewer than --epochs {self.epochs}")
        if self.schedule not in SCHEDULES:
            raise KbenchError(f"--schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        if not (isinstance(self.weight_decay, (int, float)) and 0 <= self.weight_decay < 1):
            raise KbenchError(f"--weight-decay must be in [0, 1); got {self.weight_decay}")
        if not (isinstance(self.label_smoothing, (int, float)) and 0 <= self.label_smoothing < 0.5):
            raise KbenchError(f"--label-smoothing must be in [0, 0.5); got {self.label_smoothing}")
        if self.early_stopping and not self.val_split:
            raise KbenchError("--early-stopping needs a validation split (--val-split > 0)")
        if self.bn_momentum is not None and not (
            isinstance(self.bn_momentum, (int, float)) and 0 <= self.bn_momentum < 1
        ):
            raise KbenchError(f"--bn-momentum must be in [0, 1); got {self.bn_momentum}")
        return self

    def resolved(self) -> "TrainConfig":
        self.check()
        spec = get_backbone(self.backbone)
        config = dataclasses.replace(
            self,
            image_size=self.image_size or spec.image_size,
            weights=self.weights or ("imagenet" if spec.pretrained else "none"),
            data=os.path.abspath(self.data),
            backend=use_backend(self.backend),
        )
        if config.image_size < spec.min_image_size:
            raise KbenchError(f"{spec.name} needs --image-size of at least {spec.min_image_size}")
        weights_kind(config.weights)  # a missing weights file fails before any data is read
        return config

    def record(self) -> dict:
        """What config.json holds: the options, and the content of a weights file (a study retrains
        a member whose initial weights changed under the same name)."""
        record = {"kind": "backbone", **dataclasses.asdict(self)}
        if self.weights not in (None, "none", "imagenet") and os.path.isfile(self.weights):
            record["weights_sha256"] = file_hash(self.weights)
        return record

    @property
    def frozen_bn(self) -> bool:
        """Whether the backbone's BatchNormalization layers run in inference mode (a resolved config)."""
        return self.weights != "none" and not self.train_bn

    def phase(self, epoch: int) -> str:
        """``head`` (backbone frozen) or ``full`` for the 0-based ``epoch``."""
        return "head" if self.freeze_backbone or epoch < self.head_epochs else "full"

    def recipe(self) -> dict:
        """The fine-tuning recipe's settings (metrics.json repeats them beside the results)."""
        return {
            "lr": self.lr,
            "optimizer": "adamw" if self.weight_decay else "adam",
            "schedule": self.schedule,
            "warmup_epochs": self.warmup_epochs,
            "head_epochs": self.head_epochs,
            "freeze_backbone": self.freeze_backbone,
            "bn_frozen": self.frozen_bn,
            "bn_momentum": self.bn_momentum,
            "weight_decay": self.weight_decay,
            "label_smoothing": self.label_smoothing,
            "early_stopping": self.early_stopping,
        }

    @classmethod
    def load(cls, run_dir: str) -> "TrainConfig":
        run = Run(run_dir)
        record = dict(run.config)
        record.pop("weights_sha256", None)
        if record.pop("kind", "backbone") != "backbone":
            raise KbenchError(f"{run_dir} is an ensemble, not a training run")
        return from_dict(cls, record, f"{run.path} (its recorded config)")


def resume_config(run_dir: str, given: dict | None = None) -> TrainConfig:
    """The config of an interrupted run. ``given`` options must agree with it (a run can't resume
    with a different learning rate or data); only its length (``epochs``) may change."""
    config = TrainConfig.load(run_dir)
    config.run_dir = run_dir
    changes = {}
    for key, value in (given or {}).items():
        if key == "data":
            value = os.path.abspath(value)
        recorded = getattr(config, key)
        if key in RESUMABLE_CHANGES:
            if value != recorded and (config.schedule != "constant" or config.warmup_epochs):
                raise KbenchError(
                    f"--resume can't change --epochs of {run_dir}: its learning-rate schedule is "
                    f"laid out over its {recorded} epochs"
                )
            changes[key] = value
        elif value != recorded and not (key == "backend" and value == use_backend(recorded)):
            option = "--" + key.replace("_", "-")
            raise KbenchError(
                f"--resume continues {run_dir} with its own settings; {option} {value} differs from "
                f"the recorded {recorded} and would be ignored: drop it, or train a new --run-dir"
            )
    return dataclasses.replace(config, **changes) if changes else config


def train(config: TrainConfig, resume: bool = False, verbose: int | str = "auto", overwrite: bool = False) -> dict:
    """Train ``config.backbone`` on ``config.data``; returns the metrics written to metrics.json.

    Raises KbenchError for bad input (before any model is built) and TrainingInterrupted after
    saving a checkpoint when SIGINT/SIGTERM arrives.
    """
    if notice := default_notice(config.backend):  # once, when the machine picked the backend
        log.info(notice)
    config = config.resolved()
    doctor.warn_if_gpu_unseen(config.backend)
    images = find_images(config.data, layout=config.layout)
    binary = len(images.classes) == 2
    check_devices(config.devices, config.batch_size, config.mixed_precision)  # before anything is written
    if config.label_smoothing and not binary:
        raise KbenchError(f"--label-smoothing works with two classes; {config.data} has {len(images.classes)}")
    # several processes training together (kbench.distributed): process 0 alone writes the folder
    run = Run(config.run_dir, writer=distributed.process_index() == 0)
    agreed = False
    try:
        with run.lock():
            state = run.prepare("backbone", overwrite=overwrite, resume=resume)
            if state and config.epochs < len(state["history"]):
                raise KbenchError(
                    f"--epochs {config.epochs} is fewer than the {len(state['history'])} epochs {run.path} has trained"
                )
            distributed.agree(True, f"--run-dir {run.path}")
            agreed = True
            # every process resumes from the same checkpoint (process 0 alone wrote it), or none does
            resumed = [len(state["history"]), int(file_hash(run.file(CHECKPOINT))[:7], 16)] if state else [0, 0]
            distributed.same_everywhere(resumed, "the checkpoint to resume from (epochs, content)")
            return _train_prepared(run, config, images, state, binary, resume, verbose)
    except Exception:
        if not agreed:  # every process meets process 0's decision once, refused or not
            distributed.agree(False, f"--run-dir {run.path}")
        raise


def _train_prepared(run: Run, config: TrainConfig, images, state, binary, resume, verbose) -> dict:
    try:
        train_idx, val_idx = _split(images, config, run if resume else None)
        run.write_config(config.record())
        run.write_split(_split_record(images, config, train_idx, val_idx))
        import keras

        keras.utils.set_random_seed(config.seed)  # the same initial weights in every process
        with training_devices(config.devices, config.batch_size, config.mixed_precision) as devices:
            return _train_on(run, devices, config, images, train_idx, val_idx, state, binary, verbose)
    except BaseException:
        if not resume and not run.exists(CHECKPOINT_STATE) and not run.exists(METRICS):
            run.clear()  # failed before its first checkpoint: nothing half-written stays
        raise


def _train_on(run: Run, devices, config, images, train_idx, val_idx, state, binary, verbose) -> dict:
    import keras

    processes = distributed.process_count()
    loader_options = dict(image_size=config.image_size, batch_size=config.batch_size, workers=config.workers)
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
    steps_per_epoch = len(train_loader)

    def compile_for(model, epoch: int) -> None:  # a fresh optimizer whenever the phase starts
        _compile(model, config, len(images.classes), steps_per_epoch, epoch)

    if state:
        _schedule_class()  # registered before the checkpoint's optimizer is deserialised
        try:
            import kbench.layers  # noqa: F401  (kbench's preprocessing layer, registered before loading)

            model = keras.saving.load_model(run.file(CHECKPOINT), safe_mode=True)
        except Exception as error:
            raise KbenchError(
                f"the checkpoint in {run.path} can't be loaded ({_first_line(error)}); "
                "remove the folder and train again"
            ) from None
    else:
        model = _build(config, len(images.classes))
        compile_for(model, 0)

    history = state["history"] if state else []
    compiled = list(state.get("epochs_with_compilation", [1])) if state else []
    compiled.append(len(history) + 1)  # this process compiles in its first epoch
    progress = {
        "phase": state.get("phase", config.phase(len(history))) if state else config.phase(0),
        "best_epoch": state.get("best_epoch") if state else None,
        "best_val_loss": state.get("best_val_loss") if state else None,
    }
    alone = contextlib.ExitStack()
    try:
        with _StopRequest() as stop:
            _fit(
                model,
                run,
                config,
                train_loader,
                val_loader,
                binary,
                history,
                stop,
                verbose,
                len(devices),
                compiled,
                progress,
                compile_for,
            )
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
        if config.early_stopping and progress["best_epoch"] not in (None, model_epoch):
            run.load_best(model)
            model_epoch = progress["best_epoch"]
        if config.schedule != "constant" or config.warmup_epochs:
            # kbench's schedule class would make model.keras unreadable by keras.saving.load_model
            # elsewhere (compile=True): the finished model carries a fresh optimizer at a plain rate
            plain = dataclasses.replace(config, schedule="constant", warmup_epochs=0, lr=history[-1]["lr"] or config.lr)
            _compile(model, plain, len(images.classes), steps_per_epoch, 0)
        run.save_model(model)
        result = _evaluate(model, val_loader, binary)
    finally:
        alone.close()
        train_loader.close()
        if val_loader is not None:
            val_loader.close()

    unreadable = {**train_loader.bad, **(val_loader.bad if val_loader else {})}
    skipped = images.skipped + [images.keys[i] for i in sorted(unreadable)]
    epoch_seconds = [row["epoch_seconds"] for row in history]
    compiled = sorted(set(e for e in compiled if e <= len(history)))
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
        "best_epoch": progress["best_epoch"],  # lowest validation log loss
        "model_epoch": model_epoch,  # whose weights model.keras holds: the best one with early stopping
        "weights": config.weights,
        "recipe": config.recipe(),
        "classes": images.classes,
        "params": int(model.count_params()),
        "trainable_params": int(sum(np.prod(v.shape) for v in model.trainable_weights)),
        "train_images": int(len(train_idx)),
        "val_images": int(len(val_idx)),
        "epoch_seconds": epoch_seconds,
        "epochs_with_compilation": compiled,
        "train_images_per_second": len(train_idx) / statistics.median(steady),
        **result,
        "skipped_images": skipped,
        "keras_version": keras.__version__,
    }
    run.write_metrics(record)
    run.clear_checkpoint()
    if skipped:
        log.warning("%d image file(s) were skipped as unreadable", len(skipped))
    return record


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:200]


def _split(images: ImageSet, config: TrainConfig, resume_from: Run | None) -> tuple[np.ndarray, np.ndarray]:
    if resume_from:
        saved = resume_from.split
        if saved.get("fingerprint") not in (None, data_fingerprint(images)):
            raise KbenchError(
                f"{config.data} no longer holds the images {resume_from.path} was trained on; "
                "resume needs the same data"
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
        "fingerprint": data_fingerprint(images),
        "val_split": config.val_split,
        "seed": config.seed,
        "train": [images.keys[i] for i in train_idx],
        "val": [images.keys[i] for i in val_idx],
    }


def _build(config: TrainConfig, num_classes: int):
    import keras

    from kbench.backbones import build_classifier

    model = build_classifier(get_backbone(config.backbone), num_classes, config.image_size, config.weights)
    if config.bn_momentum is not None:
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = config.bn_momentum
    _set_phase(model, config.phase(0), config.frozen_bn)
    return model


def _set_phase(model, phase: str, frozen_bn: bool) -> None:
    """Make the head trainable, and the backbone too in the ``full`` phase. A BatchNormalization layer
    that isn't trainable runs in inference mode in Keras 3 (its moving statistics stay as loaded)."""
    import keras

    from kbench.backbones import HEAD_LAYER

    for layer in model.layers:
        if layer.name == HEAD_LAYER:
            layer.trainable = True
        else:
            batch_norm = isinstance(layer, keras.layers.BatchNormalization)
            layer.trainable = phase == "full" and not (frozen_bn and batch_norm)


def _compile(model, config: TrainConfig, num_classes: int, steps_per_epoch: int, first_epoch: int) -> None:
    """Compile with a fresh Adam (AdamW with weight decay) whose schedule continues the run's: the
    schedule is a function of the run's global step, ``first_epoch * steps_per_epoch`` + the optimizer's.

    At the switch from the head phase to the full one the optimizer starts afresh: the backbone's
    weights have no moments yet, and Adam's bias correction is per optimizer, so keeping the old one
    would make the backbone's first steps many times --lr.
    """
    import keras

    if config.schedule == "constant" and not config.warmup_epochs:
        lr = config.lr  # the reference recipe: a plain float, as before
    else:
        lr = _schedule_class()(
            config.lr,
            config.warmup_epochs * steps_per_epoch,
            config.epochs * steps_per_epoch,
            config.schedule == "cosine",
            first_epoch * steps_per_epoch,
        )
    if config.weight_decay:
        optimizer = keras.optimizers.AdamW(lr, weight_decay=config.weight_decay)
    else:
        optimizer = keras.optimizers.Adam(lr)
    binary = num_classes == 2
    loss = "binary_crossentropy" if binary else "sparse_categorical_crossentropy"
    metrics = ["accuracy"]
    if config.label_smoothing:  # the loss is no longer the log loss: measure that separately
        loss = keras.losses.BinaryCrossentropy(label_smoothing=config.label_smoothing)
        metrics.append(keras.metrics.BinaryCrossentropy(name="log_loss"))
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics)


@functools.cache
def _schedule_class():
    """The learning-rate schedule class, registered with keras so that a checkpoint reloads with
    ``safe_mode=True`` (kbench's other readers load models with ``compile=False``)."""
    import keras
    from keras import ops

    @keras.saving.register_keras_serializable(package="kbench")
    class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
        """``peak`` * (linear warm-up over ``warmup_steps``, then 1 or a cosine that reaches 0 at
        ``total_steps``), at global step = optimizer step + ``offset``. Same numbers as ``scheduled_lr``."""

        def __init__(self, peak, warmup_steps, total_steps, cosine, offset=0):
            self.peak, self.warmup_steps, self.total_steps = float(peak), int(warmup_steps), int(total_steps)
            self.cosine, self.offset = bool(cosine), int(offset)

        def __call__(self, step):
            step = ops.cast(step, "float32") + self.offset
            warm = (step + 1) / max(self.warmup_steps, 1)
            factor = ops.ones_like(step)
            if self.cosine:
                progress = ops.clip((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 0, 1)
                factor = 0.5 * (1 + ops.cos(np.pi * progress))
            return self.peak * ops.where(step < self.warmup_steps, warm, factor)

        def get_config(self):
            return {
                "peak": self.peak,
                "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps,
                "cosine": self.cosine,
                "offset": self.offset,
            }

    return WarmupSchedule


def scheduled_lr(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The learning rate at global ``step`` (0-based) of a run of ``config``.

    >>> config = TrainConfig("small_cnn", "d", "r", epochs=4, lr=0.1, schedule="cosine", warmup_epochs=1)
    >>> [round(scheduled_lr(config, step, 10), 4) for step in (0, 9, 10, 25, 40)]
    [0.01, 0.1, 0.1, 0.05, 0.0]
    """
    warmup, total = config.warmup_epochs * steps_per_epoch, config.epochs * steps_per_epoch
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.schedule == "constant":
        return config.lr
    progress = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


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


def _fit(
    model,
    run: Run,
    config,
    train_loader,
    val_loader,
    binary,
    history,
    stop,
    verbose,
    devices: int,
    compiled: list[int],
    progress: dict,
    compile_for,
) -> None:
    """One ``fit`` call per epoch, so that each epoch's data order is fixed by its number and a
    resumed run replays exactly the epochs it missed. ``progress`` (the phase, the best epoch so
    far) goes into every checkpoint, so a resumed run switches phase and stops where a whole one does."""
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
            loss = (logs or {}).get("loss")
            if loss is not None and not np.isfinite(float(loss)):
                raise KbenchError(
                    f"training diverged: the loss is {float(loss)} in epoch {len(history) + 1}, "
                    f"batch {batch + 1}; lower --lr (now {config.lr})"
                )

    class Progress(keras.callbacks.ProgbarLogger):
        def set_params(self, params):
            super().set_params(params)
            self.epochs = config.epochs  # one fit per epoch: show the run's total, not 1

    clock = EpochClock()
    callbacks = [clock] + ([Progress()] if verbose else [])
    val_data = epoch_batches(val_loader, 0, binary, devices) if val_loader is not None else None
    monitor = "val_log_loss" if config.label_smoothing else "val_loss"  # the log loss, not the smoothed loss
    for epoch in range(len(history), config.epochs):
        if stop.signal is None and config.phase(epoch) != progress["phase"]:  # head -> full
            progress["phase"] = config.phase(epoch)
            _set_phase(model, progress["phase"], config.frozen_bn)
            compile_for(model, epoch)
            compiled.append(epoch + 1)
        if stop.signal is None:
            logs = model.fit(
                epoch_batches(train_loader, epoch, binary, devices),
                validation_data=val_data,
                initial_epoch=epoch,
                epochs=epoch + 1,
                shuffle=False,  # the loader orders each epoch by (seed, epoch); keras' own shuffle uses
                # Python's global random state, which a resumed process has consumed differently
                callbacks=callbacks,
                verbose=verbose,
            ).history
        state = {"epochs_done": len(history), "history": history, "epochs_with_compilation": compiled, **progress}
        if stop.signal is not None:  # the interrupted epoch is redone on resume
            with process_local_values(model):
                run.save_checkpoint(model, state)
            raise TrainingInterrupted(
                f"interrupted in epoch {epoch + 1}/{config.epochs}; checkpoint saved in {run.path}; "
                f"continue with: kbench train --run-dir {run.path} --resume",
                stop.signal,
            )
        row = {
            "epoch": epoch + 1,
            "phase": progress["phase"],
            "lr": _current_lr(model.optimizer),
            "epoch_seconds": clock.seconds,
        }
        row.update({name: float(values[-1]) for name, values in logs.items()})
        history.append(row)
        run.write_history(history)
        title = run.name if run.name == config.backbone else f"{run.name} ({config.backbone})"
        if run.writer:  # redrawn with each checkpoint, so it is never stale
            write_curves(history, run.file(CURVES), title)
        if monitor in row and (progress["best_val_loss"] is None or row[monitor] < progress["best_val_loss"]):
            progress["best_epoch"], progress["best_val_loss"] = epoch + 1, row[monitor]
            if config.early_stopping:
                with process_local_values(model):
                    run.save_best(model)
        waited = epoch + 1 - (progress["best_epoch"] or epoch + 1)
        if config.early_stopping and waited >= config.early_stopping:
            log.info(
                "early stopping after epoch %d: no better validation log loss since epoch %d",
                epoch + 1,
                progress["best_epoch"],
            )
            break
        if epoch + 1 < config.epochs:
            with process_local_values(model):
                run.save_checkpoint(model, {**state, "epochs_done": len(history), **progress})


def _current_lr(optimizer) -> float:
    """The learning rate the optimizer would use next: at the end of an epoch, that epoch's last."""
    from keras import ops

    return float(ops.convert_to_numpy(optimizer.learning_rate))


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
        if STOP_REQUESTS:  # asked before training began (its KeyboardInterrupt may have been swallowed)
            self.signal = STOP_REQUESTS[0]
        return self

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        return False
