"""The fine-tuning recipe: which layers train in each phase, the optimizer, and the one
learning-rate schedule.

A run has up to two phases (``PHASES``): ``head`` (the backbone frozen, for ``--head-epochs``) and
``full``. Each phase starts with a fresh Adam (AdamW with ``--weight-decay``) whose rate is one
function of the run's global step, ``learning_rate``: a linear warm-up from 0 to ``--lr`` over
``--warmup-epochs``, then constant or a cosine that reaches 0 at the last step. It is written once,
over an array namespace: keras' ops inside training (``WarmupSchedule``), numpy for ``scheduled_lr``.
"""

from __future__ import annotations

import functools

import numpy as np

from kbench.models.backbones import HEAD_LAYER, build_classifier, get_backbone
from kbench.training.config import TrainConfig

PHASES = ("head", "full")  # backbone frozen (only the head trains); every layer trains


def phase(config: TrainConfig, epoch: int) -> str:
    """The phase of the 0-based ``epoch``.

    >>> [phase(TrainConfig("small_cnn", "d", "r", epochs=3, head_epochs=1), epoch) for epoch in range(3)]
    ['head', 'full', 'full']
    """
    head, full = PHASES
    return head if config.freeze_backbone or epoch < config.head_epochs else full


def settings(config: TrainConfig) -> dict:
    """The recipe's settings (metrics.json repeats them beside the results)."""
    return {
        "lr": config.lr,
        "optimizer": "adamw" if config.weight_decay else "adam",
        "schedule": config.schedule,
        "warmup_epochs": config.warmup_epochs,
        "head_epochs": config.head_epochs,
        "freeze_backbone": config.freeze_backbone,
        "bn_frozen": config.frozen_bn,
        "bn_momentum": config.bn_momentum,
        "weight_decay": config.weight_decay,
        "label_smoothing": config.label_smoothing,
        "early_stopping": config.early_stopping,
    }


def build_model(config: TrainConfig, num_classes: int):
    """The classifier as the recipe starts it: ``--bn-momentum`` applied, the first epoch's phase set."""
    import keras

    model = build_classifier(get_backbone(config.backbone), num_classes, config.image_size, config.weights)
    if config.bn_momentum is not None:
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = config.bn_momentum
    set_phase(model, phase(config, 0), config.frozen_bn)
    return model


def set_phase(model, phase: str, frozen_bn: bool) -> None:
    """Make the head trainable, and the backbone too in the ``full`` phase. A BatchNormalization layer
    that isn't trainable runs in inference mode in Keras 3 (its moving statistics stay as loaded)."""
    import keras

    for layer in model.layers:
        if layer.name == HEAD_LAYER:
            layer.trainable = True
        else:
            batch_norm = isinstance(layer, keras.layers.BatchNormalization)
            layer.trainable = phase == "full" and not (frozen_bn and batch_norm)


def compile_model(model, config: TrainConfig, num_classes: int, steps_per_epoch: int, first_epoch: int) -> None:
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
        lr = schedule_class()(
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


def learning_rate(step, peak: float, warmup_steps: int, total_steps: int, cosine: bool, xp=np):
    """The schedule: ``peak`` * (linear warm-up over ``warmup_steps``, then 1 or a cosine that reaches 0
    at ``total_steps``) at the 0-based global ``step``, computed with ``xp`` (numpy, or keras.ops on a
    tensor inside training). ``scheduled_lr`` shows it.
    """
    warm = (step + 1) / max(warmup_steps, 1)
    factor = xp.ones_like(step)
    if cosine:
        progress = xp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0, 1)
        factor = 0.5 * (1 + xp.cos(np.pi * progress))
    return peak * xp.where(step < warmup_steps, warm, factor)


@functools.cache
def schedule_class():
    """The learning-rate schedule class, registered with keras (as ``kbench>WarmupSchedule``) so that a
    checkpoint reloads with ``safe_mode=True`` (kbench's other readers load models with ``compile=False``)."""
    import keras
    from keras import ops

    @keras.saving.register_keras_serializable(package="kbench")
    class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
        """``learning_rate`` at global step = optimizer step + ``offset``, in float32."""

        def __init__(self, peak, warmup_steps, total_steps, cosine, offset=0):
            self.peak, self.warmup_steps, self.total_steps = float(peak), int(warmup_steps), int(total_steps)
            self.cosine, self.offset = bool(cosine), int(offset)

        def __call__(self, step):
            step = ops.cast(step, "float32") + self.offset
            return learning_rate(step, self.peak, self.warmup_steps, self.total_steps, self.cosine, ops)

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
    """The learning rate at global ``step`` (0-based) of a run of ``config``: what its optimizer uses.

    >>> config = TrainConfig("small_cnn", "d", "r", epochs=4, lr=0.1, schedule="cosine", warmup_epochs=1)
    >>> [round(scheduled_lr(config, step, 10), 4) for step in (0, 9, 10, 25, 40)]
    [0.01, 0.1, 0.1, 0.05, 0.0]
    """
    warmup, total = config.warmup_epochs * steps_per_epoch, config.epochs * steps_per_epoch
    return float(learning_rate(np.float64(step), config.lr, warmup, total, config.schedule == "cosine"))


def current_lr(optimizer) -> float:
    """The learning rate the optimizer would use next: at the end of an epoch, that epoch's last."""
    from keras import ops

    return float(ops.convert_to_numpy(optimizer.learning_rate))
