"""Finding, splitting, decoding and batching images (OpenCV, a thread pool, no keras).

Two layouts, each as a folder or a zip read in place:
- Kaggle: ``train/cat.0.jpg``, ``train/dog.0.jpg``: the label is the file name before the first dot;
- class folders: ``root/<class>/<any name>.jpg``.
Classes are sorted by name, so for cats and dogs class 1 is "dog" and a binary model's output is P(dog).
"""

from __future__ import annotations

import logging
import os
import threading
import zipfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import cv2
import numpy as np

from kbench.errors import KbenchError

log = logging.getLogger("kbench")

LAYOUTS = ("auto", "kaggle", "folders")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Decoding and resizing run on our own threads; OpenCV's internal ones would only compete with them.
cv2.setNumThreads(1)


class BadImage(ValueError):
    """An image file that can't be decoded (empty, truncated, not an image)."""


@dataclass
class ImageSet:
    """Image files found under ``root``. ``keys`` are paths relative to the folder or zip members;
    ``labels[i]`` indexes ``classes`` (-1 when the set is unlabelled)."""

    root: str
    keys: list[str]
    labels: np.ndarray
    classes: list[str]
    layout: str  # "kaggle", "class-folders" or "unlabelled"
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    def reader(self) -> "ImageReader":
        return ImageReader(self.root)


class ImageReader:
    """Reads raw bytes by key from a folder or a zip; each thread keeps its own zip handle."""

    def __init__(self, root: str):
        self.root = root
        self._zip = os.path.isfile(root)
        self._local = threading.local()

    def read(self, key: str) -> bytes:
        if not self._zip:
            with open(os.path.join(self.root, key), "rb") as handle:
                return handle.read()
        archive = getattr(self._local, "archive", None)
        if archive is None:
            archive = self._local.archive = zipfile.ZipFile(self.root)
        return archive.read(key)


def _is_image_name(name: str) -> bool:
    base = os.path.basename(name)
    return (
        base.lower().endswith(IMAGE_EXTENSIONS)
        and not base.startswith(".")
        and "__MACOSX" not in name.split("/")
    )


def _list_files(path: str) -> list[tuple[str, int]]:
    """(key, size in bytes) of every image file under a folder or in a zip."""
    if os.path.isdir(path):
        found = []
        for folder, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in files:
                full = os.path.join(folder, name)
                key = os.path.relpath(full, path).replace(os.sep, "/")
                if _is_image_name(key):
                    found.append((key, os.path.getsize(full)))
        return found
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return [
                (info.filename, info.file_size)
                for info in archive.infolist()
                if not info.is_dir() and _is_image_name(info.filename)
            ]
    raise KbenchError(f"{path} is neither a folder nor a zip file")


def find_images(path: str, labelled: bool = True, layout: str = "auto") -> ImageSet:
    """Find the images under ``path`` (folder or zip) and their labels.

    With ``labelled=False`` (a test set) every image is kept and labels are -1. Raises KbenchError for
    a missing path, no images, or a labelled set with fewer than two classes.
    """
    if not os.path.exists(path):
        raise KbenchError(f"data not found: {path}")
    files = _list_files(path)
    skipped = [key for key, size in files if size == 0]
    for key in skipped:
        log.warning("skipped empty image file %s", key)
    keys = sorted(key for key, size in files if size > 0)
    if not keys:
        raise KbenchError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {path}; expected train/cat.N.jpg "
            "files (Kaggle layout) or one folder per class"
        )
    if not labelled:
        return ImageSet(path, keys, np.full(len(keys), -1), [], "unlabelled", skipped)

    parents = {os.path.dirname(key) for key in keys}
    if len(parents) >= 2:
        layout, names = "class-folders", [os.path.basename(os.path.dirname(key)) for key in keys]
    else:
        layout, names = "kaggle", [os.path.basename(key).split(".")[0].lower() for key in keys]
    classes = sorted(set(names))
    if len(classes) < 2:
        raise KbenchError(
            f"{path} holds a single class ({classes[0]!r}); a classifier needs at least two: name "
            "files like cat.1.jpg / dog.1.jpg or use one folder per class"
        )
    index = {name: i for i, name in enumerate(classes)}
    labels = np.array([index[name] for name in names], dtype=np.int64)
    return ImageSet(path, keys, labels, classes, layout, skipped)


def indices_of(images: ImageSet, keys: list[str]) -> np.ndarray:
    """Positions of ``keys`` (recorded file names) in ``images``; KbenchError if the data lost any."""
    position = {key: i for i, key in enumerate(images.keys)}
    missing = [key for key in keys if key not in position]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise KbenchError(f"{images.root} no longer holds {missing[0]}{more}, which the run used")
    return np.array([position[key] for key in keys], dtype=np.int64)


def split_indices(labels: np.ndarray, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded hold-out: (train indices, validation indices), each sorted."""
    if not 0 <= val_split < 1:
        raise KbenchError(f"--val-split must be in [0, 1); got {val_split}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        count = int(round(len(members) * val_split))
        if val_split > 0 and len(members) > 1:
            count = min(max(count, 1), len(members) - 1)
        val.extend(members[:count])
        train.extend(members[count:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(val, dtype=np.int64))


def decode_image(data: bytes) -> np.ndarray:
    """Bytes of an image file -> RGB uint8 array (H, W, 3). Grayscale, alpha and 16-bit images are
    converted; anything undecodable or truncated raises BadImage."""
    if not data:
        raise BadImage("empty file")
    # libjpeg fills a truncated JPEG with grey and only warns; its end-of-image marker tells.
    if data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-4096:]:
        raise BadImage("truncated JPEG")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise BadImage("not a decodable image")
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if image.ndim == 2 or image.shape[2] == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def resize(image: np.ndarray, image_size: int) -> np.ndarray:
    if image.shape[0] == image_size and image.shape[1] == image_size:
        return image
    shrinking = image.shape[0] > image_size or image.shape[1] > image_size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (image_size, image_size), interpolation=interpolation)


FLIP_PROBABILITY = 0.25
CROP_PROBABILITY = 0.5
CROP_FRACTION = 7 / 8  # 196 of 224 px, as in the reference study


def augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The reference study's augmentation on a square image: horizontal flip with p = 0.25; with
    p = 0.5 one of five crops (four corners or the centre, 7/8 of each side) resized back."""
    if rng.random() < FLIP_PROBABILITY:
        image = image[:, ::-1]
    if rng.random() < CROP_PROBABILITY:
        size = image.shape[0]
        crop = int(round(size * CROP_FRACTION))
        offset = size - crop
        top, left = [(0, 0), (0, offset), (offset, 0), (offset, offset), (offset // 2, offset // 2)][
            rng.integers(5)
        ]
        image = cv2.resize(
            np.ascontiguousarray(image[top : top + crop, left : left + crop]),
            (size, size),
            interpolation=cv2.INTER_LINEAR,
        )
    return np.ascontiguousarray(image)


class ImageLoader:
    """Batches of (pixels float32 NHWC 0..255, labels) decoded by a thread pool with prefetch.

    Batch ``i`` of epoch ``e`` is a pure function of (seed, e, i): the shuffle order and every image's
    augmentation come from seeded generators, so results don't depend on thread timing. A file that
    fails to decode is dropped from its batch with a warning and left out of later epochs.
    ``cache=True`` keeps decoded, resized images in memory so later epochs skip decoding.
    """

    def __init__(
        self,
        images: ImageSet,
        indices: np.ndarray,
        image_size: int,
        batch_size: int,
        augment: bool = False,
        shuffle: bool = False,
        seed: int = 0,
        cache: bool = False,
        workers: int | None = None,
        prefetch: int = 4,
    ):
        if batch_size < 1:
            raise KbenchError(f"batch size must be positive; got {batch_size}")
        self.images = images
        self.indices = np.asarray(indices, dtype=np.int64)
        self.image_size = image_size
        self.batch_size = batch_size
        self.augment = augment
        self.shuffle = shuffle
        self.seed = seed
        self.cache: dict[int, np.ndarray] | None = {} if cache else None
        self.workers = workers or min(8, os.cpu_count() or 1)
        self.prefetch = max(1, prefetch)
        self.bad: dict[int, str] = {}
        self._reader = images.reader()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque = deque()  # (epoch, batch index, futures) in request order
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.indices
        return np.random.default_rng([self.seed, epoch]).permutation(self.indices)

    def load(self, index: int, epoch: int) -> np.ndarray | None:
        """One image, resized (and augmented when enabled); None if it can't be decoded."""
        if index in self.bad:
            return None
        image = self.cache.get(index) if self.cache is not None else None
        if image is None:
            key = self.images.keys[index]
            try:
                image = resize(decode_image(self._reader.read(key)), self.image_size)
            except (BadImage, OSError, zipfile.BadZipFile, cv2.error) as error:
                with self._lock:
                    if index not in self.bad:
                        self.bad[index] = str(error)
                        log.warning("skipped unreadable image %s (%s)", key, error)
                return None
            if self.cache is not None:
                self.cache[index] = image
        if self.augment:
            image = augment(image, np.random.default_rng([self.seed, epoch, index]))
        return image

    def _submit(self, epoch: int, batch: int) -> list:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="kbench-decode")
        members = self.order(epoch)[batch * self.batch_size : (batch + 1) * self.batch_size]
        return [(index, self._pool.submit(self.load, index, epoch)) for index in members]

    def batch(self, epoch: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch ``batch`` of ``epoch`` as (pixels, labels); queues the next ``prefetch`` batches."""
        pixels, labels, _ = self.batch_items(epoch, batch)
        return pixels, labels

    def batch_items(self, epoch: int, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(pixels, labels, image indices) of one batch: the indices say which images were kept."""
        while self._pending and (self._pending[0][0], self._pending[0][1]) != (epoch, batch):
            self._pending.popleft()  # out-of-order request: drop stale prefetches
        if not self._pending:
            self._pending.append((epoch, batch, self._submit(epoch, batch)))
        queued = {(e, b) for e, b, _ in self._pending}
        for ahead in range(batch + 1, min(batch + 1 + self.prefetch, len(self))):
            if (epoch, ahead) not in queued:
                self._pending.append((epoch, ahead, self._submit(epoch, ahead)))
        _, _, futures = self._pending.popleft()
        pixels, kept = [], []
        for index, future in futures:
            image = future.result()
            if image is not None:
                pixels.append(image)
                kept.append(index)
        if not pixels:  # every file of this batch was bad: borrow one good image
            for index in self.indices:
                image = self.load(int(index), epoch)
                if image is not None:
                    pixels, kept = [image], [index]
                    break
            else:
                raise KbenchError(f"none of the images in {self.images.root} could be decoded")
        kept = np.asarray(kept, dtype=np.int64)
        return np.stack(pixels).astype(np.float32), self.images.labels[kept], kept

    def __iter__(self):
        """One pass in order (epoch 0): for prediction and evaluation."""
        for batch in range(len(self)):
            yield self.batch(0, batch)

    def close(self) -> None:
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


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
    if not probabilities:
        raise KbenchError("no images to predict")
    return np.concatenate(probabilities), np.concatenate(labels)
