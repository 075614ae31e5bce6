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

from kbench import files, metrics
from kbench.backend import use_backend
from kbench.data import ImageLoader, find_images, indices_of
from kbench.errors import KbenchError

METHODS = ("stack", "mean")


@dataclass
class EnsembleConfig:
    members: list[str]  # run folders
    run_dir: str
    data: str | None = None  # default: the members' own data
    backend: str | None = None
    method: str = "stack"
    epochs: int = 10  # head epochs, as in the reference study
    batch_size: int = 32
    lr: float = 1e-3
    tta_passes: int = 0  # augmented passes of the training split added to the head's training features
    seed: int = 0
    workers: int | None = None


@dataclass
class Member:
    run_dir: str
    name: str
    backbone: str
    image_size: int
    val_log_loss: float | None


def check_members(config: EnsembleConfig) -> tuple[list[Member], dict]:
    """The members and their common split; KbenchError when they don't share classes, data and split."""
    if len(config.members) < 2:
        raise KbenchError("an ensemble needs at least two --members run folders")
    members, split = [], None
    for run_dir in config.members:
        for needed in ("model.keras", "config.json", "split.json", "metrics.json"):
            if not os.path.isfile(os.path.join(run_dir, needed)):
                raise KbenchError(f"member {run_dir} is not a finished kbench run (no {needed})")
        run_config = files.read_json(os.path.join(run_dir, "config.json"))
        run_metrics = files.read_json(os.path.join(run_dir, "metrics.json"))
        run_split = files.read_json(os.path.join(run_dir, "split.json"))
        if split is None:
            split = run_split
        for key, what in (("classes", "classes"), ("data", "data"), ("train", "split"), ("val", "split")):
            if run_split[key] != split[key]:
                raise KbenchError(
                    f"members {config.members[0]} and {run_dir} were trained on different {what}; "
                    "ensemble members must share data and split (same --data, --val-split and --seed)"
                )
        name = os.path.basename(os.path.normpath(run_dir))
        members.append(Member(run_dir, name, run_config["backbone"], run_config["image_size"],
                              run_metrics.get("val_log_loss")))
    if len({m.name for m in members}) < len(members):
        raise KbenchError("member run folders must have different names")
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
        x = image if member.image_size == size else layers.Resizing(
            member.image_size, member.image_size, name=f"resize_{member.name}")(image)
        if method == "stack":
            model = keras.Model(model.inputs, model.get_layer("probability").input, name=f"{member.name}_features")
        else:
            model.name = f"{member.name}_model"
        branches.append(model(x))
    if method == "mean":
        return keras.Model(image, layers.Average(name="probability")(branches), name="ensemble_mean"), None
    width = sum(int(branch.shape[-1]) for branch in branches)
    units, activation = (1, "sigmoid") if num_classes == 2 else (num_classes, "softmax")
    head_layers = [layers.Dense(32, activation="relu", name="head_dense_32"),
                   layers.Dense(8, activation="relu", name="head_dense_8"),
                   layers.Dense(units, activation=activation, name="probability")]
    features = keras.Input((width,), name="features")
    x = features
    for layer in head_layers:
        x = layer(x)
    head = keras.Model(features, x, name="head")
    output = head(layers.Concatenate(name="concatenate")(branches))
    return keras.Model(image, output, name="ensemble_stack"), head


def _member_features(extractor, images, indices, image_size, config, cache_path, augment, epoch):
    """Pooled features of one member over ``indices`` (cached as .npy); rows aligned with labels."""
    if os.path.isfile(cache_path):
        cached = np.load(cache_path)
        return cached["features"], cached["labels"]
    loader = ImageLoader(images, indices, image_size, config.batch_size, augment=augment, seed=config.seed,
                         workers=config.workers)
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
        np.savez(temporary, features=features, labels=labels)
    return features, labels


def train_ensemble(config: EnsembleConfig, verbose: int | str = "auto") -> dict:
    """Build, fit (``stack``) and score an ensemble; write its folder; return metrics.json's record."""
    if config.method not in METHODS:
        raise KbenchError(f"unknown method {config.method!r}; choose {' or '.join(METHODS)}")
    members, split = check_members(config)
    data = config.data or split["data"]
    images = find_images(data)
    if images.classes != split["classes"]:
        raise KbenchError(f"{data} has classes {images.classes}; the members were trained on {split['classes']}")
    train_idx, val_idx = indices_of(images, split["train"]), indices_of(images, split["val"])

    use_backend(config.backend)
    import keras

    keras.utils.set_random_seed(config.seed)
    os.makedirs(config.run_dir, exist_ok=True)
    files.write_json(os.path.join(config.run_dir, "config.json"), dataclasses.asdict(config))
    files.write_json(os.path.join(config.run_dir, "split.json"), {**split, "data": os.path.abspath(data)})
    models = [keras.saving.load_model(os.path.join(m.run_dir, "model.keras"), compile=False, safe_mode=True)
              for m in members]
    ensemble, head = build_ensemble(models, members, len(images.classes), config.method)
    binary = len(images.classes) == 2

    feature_seconds = head_seconds = 0.0
    if head is not None:
        start = time.perf_counter()
        cache = os.path.join(config.run_dir, "features")
        passes = [(False, 0)] + [(True, k + 1) for k in range(config.tta_passes)]
        train_parts = []
        for augment, epoch in passes:
            columns = [_member_features(
                keras.Model(model.inputs, model.get_layer("probability").input), images, train_idx, m.image_size,
                config, os.path.join(cache, f"{m.name}-train-{epoch}.npz"), augment, epoch)
                for m, model in zip(members, models)]
            train_parts.append(_aligned(columns))
        features = np.concatenate([f for f, _ in train_parts])
        labels = np.concatenate([y for _, y in train_parts])
        feature_seconds = time.perf_counter() - start

        start = time.perf_counter()
        loss = "binary_crossentropy" if binary else "sparse_categorical_crossentropy"
        head.compile(optimizer=keras.optimizers.Adam(config.lr), loss=loss, metrics=["accuracy"])
        targets = labels.astype("float32")[:, None] if binary else labels
        head.fit(features, targets, batch_size=config.batch_size, epochs=config.epochs, shuffle=True, verbose=verbose)
        head_seconds = time.perf_counter() - start

    files.save_model(ensemble, os.path.join(config.run_dir, "model.keras"))
    size = max(m.image_size for m in members)
    from kbench.train import predict

    loader = ImageLoader(images, val_idx, size, config.batch_size, workers=config.workers)
    probabilities, val_labels = predict(ensemble.predict_on_batch, loader)
    record = {
        "backbone": "ensemble",
        "method": config.method,
        "backend": keras.backend.backend(),
        "classes": images.classes,
        "image_size": size,
        "params": int(ensemble.count_params()),
        "members": [{"run_dir": m.run_dir, "backbone": m.backbone, "image_size": m.image_size,
                     "val_log_loss": m.val_log_loss} for m in members],
        "epochs": config.epochs if head is not None else 0,
        "tta_passes": config.tta_passes,
        "feature_seconds": feature_seconds,
        "head_seconds": head_seconds,
        "val_images": int(len(val_labels)),
        "val_log_loss": metrics.log_loss(val_labels, probabilities),
        "val_accuracy": metrics.accuracy(val_labels, probabilities),
    }
    files.write_json(os.path.join(config.run_dir, "metrics.json"), record)
    return record


def _aligned(columns: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate members' features; an image unreadable for one member is unreadable for all, so
    rows line up, which the labels confirm."""
    labels = columns[0][1]
    for _, other in columns[1:]:
        if len(other) != len(labels) or not np.array_equal(other, labels):
            raise KbenchError("members' cached features don't line up; delete the ensemble's features/ folder")
    return np.concatenate([f for f, _ in columns], axis=1), labels
