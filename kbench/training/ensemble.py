"""Ensembles of trained runs: a stacked head on cached member features, or the mean of the members'
probabilities; saved as ONE Keras model with ONE image input.

The reference study pushed every image through every frozen backbone in each head epoch. Here each
member's pooled features are computed once per image (plus K augmented passes of the training split
if asked) and cached in the ensemble folder, so head epochs cost next to nothing. The saved model
resizes and preprocesses for each member inside its graph, so members of different native sizes
combine and `predict`, `latency` and `export onnx` take the folder like any run folder.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import numpy as np

from kbench.core import files, metrics
from kbench.core.backend import use_backend
from kbench.core.config import MAX_EPOCHS, check_bounds, option, positive
from kbench.core.errors import KbenchError
from kbench.data.dataset import (
    LAYOUTS,
    ImageSet,
    data_change,
    data_fingerprint,
    find_images,
    fingerprints,
    indices_of,
)
from kbench.data.loader import ImageLoader, predict
from kbench.models.backbones import HEAD_LAYER, feature_model, load_model
from kbench.training.runs import METRICS, Run

METHODS = ("stack", "mean")


@dataclass
class EnsembleConfig:
    members: list[str]  # run folders
    run_dir: str = option(help="Folder for the ensemble.", path=True)
    data: str | None = option(None, "The members' data.", shown_default="the path their runs recorded", path=True)
    backend: str | None = None
    method: str = option(
        "stack",
        "stack: the study's head (Dense 32-8-1) on cached features; mean: average of probabilities.",
        choices=METHODS,
    )
    epochs: int = option(10, "Head epochs (stack), as in the reference study.")
    batch_size: int = option(32, "Images per batch.")
    lr: float = option(1e-3, "Head learning rate (Adam).")
    tta_passes: int = option(
        0, "Augmented passes of the training split added to the head's features.", minimum=0, below=2**32
    )
    seed: int = option(0, "Seed for the head and the augmented passes.", minimum=0, below=2**32)
    workers: int | None = None
    layout: str = option("auto", "How labels are read from the data (see docs/data.md).", choices=LAYOUTS)

    def check(self) -> "EnsembleConfig":
        if self.method not in METHODS:
            raise KbenchError(f"unknown method {self.method!r}; choose {' or '.join(METHODS)}")
        positive(self.epochs, "--epochs", whole=True, most=MAX_EPOCHS)
        positive(self.batch_size, "--batch-size", whole=True)
        positive(self.lr, "--lr")
        if self.workers is not None:
            positive(self.workers, "--workers", whole=True)
        check_bounds(self, "tta_passes", "seed")
        if self.layout not in LAYOUTS:
            raise KbenchError(f"--layout must be one of {', '.join(LAYOUTS)}; got {self.layout!r}")
        return self


@dataclass
class Member:
    run: Run
    name: str
    backbone: str
    image_size: int
    val_log_loss: float | None
    model_hash: str


def check_members(config: EnsembleConfig) -> tuple[list[Member], dict]:
    """The members and their common split; KbenchError when they don't share classes, data and split."""
    if len(config.members) < 2:
        raise KbenchError("an ensemble needs at least two --members run folders")
    members, split = [], None
    target = os.path.realpath(config.run_dir)
    for run_dir in config.members:
        member = os.path.realpath(run_dir)
        if member == target:
            raise KbenchError(f"--run-dir {config.run_dir} is one of the members; write the ensemble elsewhere")
        for inside, outer in ((config.run_dir, run_dir), (run_dir, config.run_dir)):
            if files.within(inside, outer):  # removing or replacing one folder would take the other with it
                raise KbenchError(f"{inside} is inside {outer}; give the ensemble and each member folders of their own")
        run = Run.open(run_dir)
        if run.kind != "backbone":
            raise KbenchError(f"member {run_dir} is an ensemble; members must be training runs (kbench train)")
        run_config, run_metrics, run_split = run.config, run.metrics, run.split
        if split is None:
            split = run_split
        for key, what in (
            ("classes", "classes"),
            ("data", "data"),
            ("content_fingerprint", "images (other pixels under the same names)"),
            ("train", "split"),
            ("val", "split"),
        ):
            if run_split.get(key) != split.get(key):
                raise KbenchError(
                    f"members {config.members[0]} and {run_dir} were trained on different {what}; "
                    "ensemble members must share data and split (same --data, --val-split and --seed)"
                )
        backbone = "+".join(run.labels().get("backbones", [])) or run_config.get("backbone", "?")
        members.append(
            Member(
                run,
                run.name,
                backbone,
                int(run_metrics["image_size"]),
                run_metrics.get("val_log_loss"),
                run.model_hash(),
            )
        )
    if len({m.name for m in members}) < len(members):
        raise KbenchError("member run folders must have different names")
    if len({m.model_hash for m in members}) < len(members):
        raise KbenchError("two members are the same model (identical model.keras)")
    if not split["val"]:
        raise KbenchError("the members have no validation split to score the ensemble on (train with --val-split > 0)")
    return members, split


def build_ensemble(member_models: list, members: list[Member], num_classes: int, method: str):
    """One model, one image input at the largest member size: each member resizes inside the graph.
    Returns (ensemble model, head model on concatenated features or None for "mean")."""
    import keras
    from keras import layers

    size = max(m.image_size for m in members)
    image = keras.Input((size, size, 3), name="image")
    branches = []
    for member, model in zip(members, member_models):
        model.trainable = False
        x = (
            image
            if member.image_size == size
            else layers.Resizing(member.image_size, member.image_size, name=f"resize_{member.name}")(image)
        )
        if method == "stack":
            model = feature_model(model)
            model.name = f"{member.name}_features"
        else:
            model.name = f"{member.name}_model"
        branches.append(model(x))
    if method == "mean":
        return keras.Model(image, layers.Average(name=HEAD_LAYER)(branches), name="ensemble_mean"), None
    width = sum(int(branch.shape[-1]) for branch in branches)
    units, activation = (1, "sigmoid") if num_classes == 2 else (num_classes, "softmax")
    head_layers = [
        layers.Dense(32, activation="relu", name="head_dense_32"),
        layers.Dense(8, activation="relu", name="head_dense_8"),
        layers.Dense(units, activation=activation, name=HEAD_LAYER),
    ]
    features = keras.Input((width,), name="features")
    x = features
    for layer in head_layers:
        x = layer(x)
    head = keras.Model(features, x, name="head")
    output = head(layers.Concatenate(name="concatenate")(branches))
    return keras.Model(image, output, name="ensemble_stack"), head


def _member_features(extractor, member: Member, images, indices, config, cache_path, augment, epoch):
    """Pooled features of one member over ``indices``, cached as .npz under a key made of the member
    model's content hash, the data and the pass: a cache made from another model (a member retrained
    in place) or other images is never reused."""
    key = f"{member.model_hash}:{data_fingerprint(images)}:{len(indices)}:{config.seed}:{augment}:{epoch}"
    if os.path.isfile(cache_path):
        try:
            with np.load(cache_path) as cached:
                if str(cached["key"]) == key:
                    return cached["features"], cached["labels"]
        except Exception:  # a cache from an older kbench or cut short: compute it again
            pass
    loader = ImageLoader(
        images, indices, member.image_size, config.batch_size, augment=augment, seed=config.seed, workers=config.workers
    )
    features, labels = [], []
    try:
        for batch in range(len(loader)):
            pixels, batch_labels = loader.batch(epoch, batch)
            features.append(np.asarray(extractor.predict_on_batch(pixels)))
            labels.append(batch_labels)
    finally:
        loader.close()
    features, labels = np.concatenate(features), np.concatenate(labels)
    with files.atomic_path(cache_path, suffix=".npz") as temporary:
        np.savez(temporary, features=features, labels=labels, key=np.array(key))
    return features, labels


def train_ensemble(config: EnsembleConfig, verbose: int | str = "auto", overwrite: bool = False) -> dict:
    """Build, fit (``stack``) and score an ensemble; write its folder; return metrics.json's record."""
    config.check()
    members, split = check_members(config)
    data = config.data or split["data"]
    layout = (
        config.layout
        if config.layout != "auto"
        else {"kaggle": "kaggle", "class-folders": "folders"}.get(split.get("layout"), "auto")
    )
    images = find_images(data, layout=layout)
    if images.classes != split["classes"]:
        raise KbenchError(f"{data} has classes {images.classes}; the members were trained on {split['classes']}")
    train_idx, val_idx = indices_of(images, split["train"]), indices_of(images, split["val"])
    if data_change(split, images) == "changed":
        raise KbenchError(
            f"the images in {data} changed since the members were trained (other pixels under the same names); "
            "train them again"
        )

    config.backend = use_backend(config.backend)
    run = Run(config.run_dir)
    with run.lock():
        run.prepare("ensemble", overwrite=overwrite)
        try:
            found = _Images(images, data, split, train_idx, val_idx)
            return _train_locked(run, config, members, found, verbose)
        except BaseException:
            if not run.exists(METRICS):
                run.clear()  # nothing half-made stays
            raise


@dataclass
class _Images:
    """The members' images: where they are, their recorded split and its indices."""

    images: ImageSet
    data: str
    split: dict
    train_idx: np.ndarray
    val_idx: np.ndarray


def _train_locked(run: Run, config: EnsembleConfig, members: list[Member], found: _Images, verbose) -> dict:
    import keras

    keras.utils.set_random_seed(config.seed)
    run.write_config(
        {"kind": "ensemble", **dataclasses.asdict(config), "member_hashes": {m.name: m.model_hash for m in members}}
    )
    run.write_split({**found.split, "data": os.path.abspath(found.data), **fingerprints(found.images)})
    models = [load_model(m.run.model_path) for m in members]
    ensemble, head = build_ensemble(models, members, len(found.images.classes), config.method)

    feature_seconds = head_seconds = 0.0
    if head is not None:
        start = time.perf_counter()
        features, labels = _head_features(run, config, members, models, found)
        feature_seconds = time.perf_counter() - start
        start = time.perf_counter()
        _fit_head(head, features, labels, config, len(found.images.classes) == 2, verbose)
        head_seconds = time.perf_counter() - start

    run.save_model(ensemble)
    size = max(m.image_size for m in members)
    loader = ImageLoader(found.images, found.val_idx, size, config.batch_size, workers=config.workers)
    probabilities, val_labels = predict(ensemble.predict_on_batch, loader)
    record = {
        "kind": "ensemble",
        "method": config.method,
        "backbones": [m.backbone for m in members],
        "backend": keras.backend.backend(),
        "classes": found.images.classes,
        "image_size": size,
        "params": int(ensemble.count_params()),
        "members": [
            {
                "run_dir": m.run.path,
                "backbone": m.backbone,
                "image_size": m.image_size,
                "val_log_loss": m.val_log_loss,
                "model_hash": m.model_hash,
            }
            for m in members
        ],
        "epochs": config.epochs if head is not None else 0,
        "tta_passes": config.tta_passes,
        "feature_seconds": feature_seconds,
        "head_seconds": head_seconds,
        "val_images": int(len(val_labels)),
        "val_log_loss": metrics.log_loss(val_labels, probabilities),
        "val_accuracy": metrics.accuracy(val_labels, probabilities),
    }
    run.write_metrics(record)
    return record


def _head_features(run: Run, config: EnsembleConfig, members: list[Member], models: list, found: _Images):
    """The stacked head's training rows: every member's cached features of the training split, plain
    and then once per augmented (TTA) pass, side by side; and their labels."""
    passes = [(False, 0)] + [(True, k + 1) for k in range(config.tta_passes)]
    train_parts = []
    for augment, epoch in passes:
        columns = [
            _member_features(
                feature_model(model),
                m,
                found.images,
                found.train_idx,
                config,
                run.feature_path(m.name, "train", epoch),
                augment,
                epoch,
            )
            for m, model in zip(members, models)
        ]
        train_parts.append(_aligned(columns))
    return np.concatenate([f for f, _ in train_parts]), np.concatenate([y for _, y in train_parts])


def _fit_head(head, features: np.ndarray, labels: np.ndarray, config: EnsembleConfig, binary: bool, verbose) -> None:
    import keras

    loss = "binary_crossentropy" if binary else "sparse_categorical_crossentropy"
    head.compile(optimizer=keras.optimizers.Adam(config.lr), loss=loss, metrics=["accuracy"])
    targets = labels.astype("float32")[:, None] if binary else labels
    head.fit(features, targets, batch_size=config.batch_size, epochs=config.epochs, shuffle=True, verbose=verbose)


def _aligned(columns: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate members' features; an image unreadable for one member is unreadable for all, so
    rows line up, which the labels confirm."""
    labels = columns[0][1]
    for _, other in columns[1:]:
        if len(other) != len(labels) or not np.array_equal(other, labels):
            raise KbenchError("members' cached features don't line up; delete the ensemble's features/ folder")
    return np.concatenate([f for f, _ in columns], axis=1), labels
