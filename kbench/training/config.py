"""What a training run is: ``TrainConfig``, every option of ``kbench train`` with its check, as
``config.json`` records it and a study TOML's ``[train]`` becomes; and ``resume_config``, which
reads it back for ``--resume``.

Apart from ``kbench.training.train`` (how a run is trained) so that the CLI, the study's config and the
recipe read a run's settings without the training loop, and the recipe can depend on the config
while the loop depends on both.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from kbench.core import files
from kbench.core.backend import named_backend, use_backend
from kbench.core.config import MAX_EPOCHS, check_bounds, from_dict, option, positive
from kbench.core.errors import KbenchError
from kbench.data.dataset import LAYOUTS
from kbench.models.backbones import get_backbone, weights_kind
from kbench.training.devices import count_devices
from kbench.training.runs import Run, file_hash

MAX_IMAGE_SIZE = 1024  # pixels per side; the largest native size is 600 (EfficientNet-B7)
# What may differ between a run's config and a resumed run's: the length of the run.
RESUMABLE_CHANGES = ("epochs",)
SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    """Everything that defines a training run. ``None`` fields are resolved by ``resolved()``."""

    backbone: str = option(help="Registered backbone name (see `kbench backbones`).")
    data: str = option(help="Kaggle train folder or train.zip, or one folder per class.", path=True)
    run_dir: str = option(help="Folder for the model, metrics and history.", path=True)
    backend: str | None = None  # --backend, else KERAS_BACKEND, else kbench.core.backend's default
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
    seed: int = option(0, "Seed for the split, shuffling, augmentation and weights.", minimum=0, below=2**32)
    freeze_backbone: bool = option(False, "Train only the head.")
    cache: bool = option(False, "Keep decoded images in memory after the first epoch.")
    workers: int | None = option(None, "Image decoding threads.", shown_default="the CPU count")
    devices: str | None = option(None, "Data parallel over 'all' local devices or N of them.", shown_default="one")
    mixed_precision: str | None = option(
        None,
        "Half-precision compute, float32 head and loss: on a GPU or TPU, or bfloat16 on a CPU with "
        "AMX-BF16 or AVX512-BF16 (faster there only for some backbones).",
        choices=("bfloat16", "float16"),
        flag_value="bfloat16",
    )
    layout: str = option(
        "auto", "How labels are read from the data (see docs/data.md).", choices=("auto", "kaggle", "folders")
    )
    # The fine-tuning recipe. The defaults are the reference study's: every layer trains from the first
    # step at a constant Adam rate for a fixed number of epochs (seed.toml adds train_bn = true).
    head_epochs: int = option(
        0, "Epochs with the backbone frozen (only the head trains) before it is unfrozen.", minimum=0
    )
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
    warmup_epochs: int = option(0, "Epochs of linear learning-rate warm-up from 0 to --lr.", minimum=0)
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
        minimum=0,
    )

    def check(self) -> "TrainConfig":
        """KbenchError in one line for any value that can't work, before anything is read or built."""
        positive(self.epochs, "--epochs", whole=True, most=MAX_EPOCHS)
        positive(self.batch_size, "--batch-size", whole=True)
        positive(self.lr, "--lr")
        if self.image_size is not None:
            positive(self.image_size, "--image-size", whole=True)
            if self.image_size > MAX_IMAGE_SIZE:
                raise KbenchError(
                    f"--image-size {self.image_size} is more than {MAX_IMAGE_SIZE} pixels per side, "
                    "larger than any backbone is trained at"
                )
        check_bounds(self, "seed")
        if self.workers is not None:
            positive(self.workers, "--workers", whole=True)
        if not (isinstance(self.val_split, (int, float)) and 0 <= self.val_split < 1):
            raise KbenchError(f"--val-split must be in [0, 1); got {self.val_split}")
        if self.layout not in LAYOUTS:
            raise KbenchError(f"--layout must be one of {', '.join(LAYOUTS)}; got {self.layout!r}")
        if self.data and self.run_dir and os.path.isdir(self.data) and files.within(self.run_dir, self.data):
            raise KbenchError(
                f"--run-dir {self.run_dir} is inside --data {self.data}: its files would be read as images "
                "next time; choose a folder outside the data"
            )
        if self.devices is not None:
            count_devices(self.devices, available=10**6)  # its form; the count is checked on the devices
        check_bounds(self, "head_epochs", "warmup_epochs", "early_stopping")
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
    with a different learning rate or data); only its length (``epochs``) may change.

    The run continues under its recorded backend (``train`` selects it before keras is imported), not
    this machine's default: only a backend the user names, in ``given`` or ``KERAS_BACKEND``, can
    differ from it, and is refused as any other option would be."""
    config = TrainConfig.load(run_dir)
    config.run_dir = run_dir
    changes = {}
    given = dict(given or {})
    if "backend" not in given and config.backend and (named := named_backend()) not in (None, config.backend):
        raise KbenchError(
            f"--resume continues {run_dir} with its own settings; KERAS_BACKEND={named} differs from the "
            f"recorded {config.backend} and would be ignored: unset it, or train a new --run-dir"
        )
    for key, value in given.items():
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
        elif key == "backend" and recorded is None:  # a run recorded before backends were: as asked
            changes[key] = value
        elif value != recorded:
            option = "--" + key.replace("_", "-")
            raise KbenchError(
                f"--resume continues {run_dir} with its own settings; {option} {value} differs from "
                f"the recorded {recorded} and would be ignored: drop it, or train a new --run-dir"
            )
    return dataclasses.replace(config, **changes) if changes else config
