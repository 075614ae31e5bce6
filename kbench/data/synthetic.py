"""Generated, learnable image sets for the offline demo and the tests (no downloads).

Class 0 ("cat") shows a grating near horizontal, class 1 ("dog") one near vertical, each with random
colours, frequency, phase and noise: a small CNN learns it in a few epochs, and the reference study's
flips and crops keep the label.
"""

from __future__ import annotations

import csv
import os
import zipfile

import cv2
import numpy as np

CLASSES = ("cat", "dog")


def make_image(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One RGB uint8 image of class ``label`` (0 or 1)."""
    angle = (0.0 if label == 0 else np.pi / 2) + rng.uniform(-0.35, 0.35)
    frequency = rng.uniform(2.5, 5.0) * 2 * np.pi / size
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    wave = np.sin(frequency * (x * np.sin(angle) + y * np.cos(angle)) + rng.uniform(0, 2 * np.pi))
    background, stripes = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    mix = (wave[..., None] + 1) / 2
    image = background * (1 - mix) + stripes * mix + rng.normal(0, 12, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def sample_pixels(batch_size: int, image_size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Image-like pixels (generated photographs' statistics, not zeros or noise) at a model's size,
    float32 RGB 0..255 NHWC: what latency is timed on, and what the export's logits are checked on."""
    rng = np.random.default_rng(seed)
    images = [cv2.resize(make_image(i % 2, 64, rng), image_size[::-1]) for i in range(batch_size)]
    return np.stack(images).astype(np.float32)


def encode_jpeg(image: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buffer.tobytes()


def _atomic_zip(path: str, members: dict[str, bytes]) -> None:
    temporary = f"{path}.tmp"
    with zipfile.ZipFile(temporary, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    os.replace(temporary, path)


def write_kaggle_dataset(
    folder: str, n_train: int = 400, n_test: int = 100, image_size: int = 64, seed: int = 0
) -> dict[str, str]:
    """Write ``train.zip`` (train/cat.N.jpg, train/dog.N.jpg), ``test.zip`` (test/N.jpg, ids from 1)
    and ``answers.csv`` (id,label with label 1 for dog) into ``folder``, as Kaggle's Dogs vs. Cats
    Redux lays them out. Returns the three paths."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    train = {}
    for index in range(n_train):
        label = index % 2
        train[f"train/{CLASSES[label]}.{index // 2}.jpg"] = encode_jpeg(make_image(label, image_size, rng))
    test, answers = {}, []
    for image_id in range(1, n_test + 1):
        label = int(rng.integers(2))
        test[f"test/{image_id}.jpg"] = encode_jpeg(make_image(label, image_size, rng))
        answers.append((image_id, label))
    paths = {
        "train": os.path.join(folder, "train.zip"),
        "test": os.path.join(folder, "test.zip"),
        "answers": os.path.join(folder, "answers.csv"),
    }
    _atomic_zip(paths["train"], train)
    _atomic_zip(paths["test"], test)
    temporary = paths["answers"] + ".tmp"
    with open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "label"])
        writer.writerows(answers)
    os.replace(temporary, paths["answers"])
    return paths


def write_class_folders(folder: str, per_class: int = 20, image_size: int = 48, seed: int = 0, classes=CLASSES) -> str:
    """Write ``folder/<class>/<n>.png`` images (the class-folder layout); returns ``folder``."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        for index in range(per_class):
            image = make_image(label % 2, image_size, rng)
            cv2.imwrite(os.path.join(folder, name, f"{index}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return folder
