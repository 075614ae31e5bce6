"""How a data set is read: decoding, resizing, augmenting and batching images (OpenCV, a thread pool,
no keras), and the prediction loop over those batches. What a data set is lives in kbench.data."""

from __future__ import annotations

import logging
import os
import threading
import zipfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from kbench.core.errors import KbenchError
from kbench.data.dataset import ImageSet

log = logging.getLogger("kbench")

# Decoding and resizing run on our own threads; OpenCV's internal ones would only compete with them.
cv2.setNumThreads(1)
# An image OpenCV can't decode is reported once, by name, as a kbench warning; OpenCV's own lines
# ("[ WARN:0@5.6] ... PNG input buffer is incomplete") would only repeat it without the name.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


class BadImage(ValueError):
    """An image file that can't be decoded (empty, truncated, not an image)."""


def decode_image(data: bytes) -> np.ndarray:
    """Bytes of an image file -> RGB uint8 array (H, W, 3), turned upright by its EXIF orientation as
    image viewers and ``cv2.imread`` show it (a phone's portrait photo is taller than wide).
    Grayscale, alpha and 16-bit images are converted; anything undecodable or truncated raises BadImage."""
    if not data:
        raise BadImage("empty file")
    # libjpeg fills a truncated JPEG with grey and only warns; its end-of-image marker tells.
    if data[:2] == b"\xff\xd8" and not jpeg_complete(data):
        raise BadImage("truncated JPEG")
    # IMREAD_UNCHANGED would ignore the EXIF orientation; ANYCOLOR | ANYDEPTH applies it and keeps
    # gray and 16-bit images as they are, dropping only an alpha channel (kbench drops it anyway)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH)
    except cv2.error as error:  # e.g. a header claiming more than OpenCV's 2^30 pixels
        raise BadImage(f"OpenCV refused it: {error.err}") from None
    if image is None or image.size == 0:
        raise BadImage("not a decodable image")
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if image.ndim == 2 or image.shape[2] == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def jpeg_complete(data: bytes) -> bool:
    """Whether the JPEG in ``data`` reaches its end-of-image marker: the segments are walked by their
    lengths (an EXIF thumbnail's own end marker inside APP1 doesn't count) and each scan's coded data
    to the marker after it. What follows the end marker (a phone's motion-photo video, padding) is
    not the image's and doesn't matter."""
    position, size = 2, len(data)
    while position + 4 <= size:
        if data[position] != 0xFF:
            return False
        marker = data[position + 1]
        if marker == 0xD9:  # end of image
            return True
        if marker == 0xFF or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # fill byte, restart, TEM: no length
            position += 1 if marker == 0xFF else 2
            continue
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == 0xDA:  # start of scan: coded data up to the next marker that isn't a stuffed 0 or a restart
            while True:
                position = data.find(b"\xff", position)
                if position < 0 or position + 1 >= size:
                    return False
                following = data[position + 1]
                if following == 0 or 0xD0 <= following <= 0xD7:
                    position += 2
                    continue
                break
    return position + 2 <= size and data[position : position + 2] == b"\xff\xd9"


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
        top, left = [(0, 0), (0, offset), (offset, 0), (offset, offset), (offset // 2, offset // 2)][rng.integers(5)]
        image = cv2.resize(
            np.ascontiguousarray(image[top : top + crop, left : left + crop]),
            (size, size),
            interpolation=cv2.INTER_LINEAR,
        )
    return np.ascontiguousarray(image)


class ImageLoader:
    """Batches of (pixels float32 NHWC 0..255, labels) decoded by a thread pool with prefetch.

    Each worker writes its image into its batch's array, so the batch is assembled in the pool, not on
    the thread that asks for it (the training loop). ``pixel_dtype="uint8"`` ships a quarter of
    float32's bytes to the device; a Keras model casts its input to float32 there (its Input's dtype).

    Batch ``i`` of epoch ``e`` is a pure function of (seed, e, i): the shuffle order and every image's
    augmentation come from seeded generators, so results don't depend on thread timing. A file that
    fails to decode is dropped from its batch with a warning and left out of later epochs.
    ``cache=True`` keeps decoded, resized images in memory so later epochs skip decoding.

    ``shard=(index, count)``: one of ``count`` processes training together reads only its part of
    each batch. The batch is first cut to a multiple of ``multiple`` (all processes' devices), or a
    short last batch is filled to one row by repeating images, as data parallelism needs; then
    process ``index`` reads the ``index``-th of ``count`` equal, contiguous parts.
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
        shard: tuple[int, int] = (0, 1),
        multiple: int = 1,
        pixel_dtype: str = "float32",
    ):
        if batch_size < 1:
            raise KbenchError(f"batch size must be positive; got {batch_size}")
        if not 0 <= shard[0] < shard[1] or multiple % shard[1]:
            raise KbenchError(f"shard {shard} of batches cut to multiples of {multiple} is impossible")
        self.images = images
        self.indices = np.asarray(indices, dtype=np.int64)
        self.image_size = image_size
        self.batch_size = batch_size
        self.augment = augment
        self.shuffle = shuffle
        self.seed = seed
        self.cache: dict[int, np.ndarray] | None = {} if cache else None
        self.workers = workers or os.cpu_count() or 1  # a GPU trains faster than 8 threads decode
        self.pixel_dtype = np.dtype(pixel_dtype)
        self.prefetch = max(1, prefetch)
        self.shard, self.multiple = shard, multiple
        self.bad: dict[int, str] = {}
        self._reader = images.reader()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque = deque()  # (epoch, batch index, (pixels, futures)) in request order
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

    def _submit(self, epoch: int, batch: int) -> tuple[np.ndarray, list]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="kbench-decode")
        members = self.members(epoch, batch)
        pixels = np.empty((len(members), self.image_size, self.image_size, 3), self.pixel_dtype)
        return pixels, [
            (index, self._pool.submit(self._load_into, pixels, slot, index, epoch))
            for slot, index in enumerate(members)
        ]

    def _load_into(self, pixels: np.ndarray, slot: int, index: int, epoch: int) -> bool:
        image = self.load(index, epoch)
        if image is None:
            return False
        pixels[slot] = image
        return True

    def members(self, epoch: int, batch: int) -> np.ndarray:
        """The image indices this process reads for batch ``batch`` of ``epoch`` (its shard).

        >>> images = ImageSet("d", [f"{i}.jpg" for i in range(10)], np.zeros(10, int), ["a", "b"], "folders")
        >>> loaders = [ImageLoader(images, np.arange(10), 8, 4, shard=(rank, 2), multiple=2) for rank in (0, 1)]
        >>> [loader.members(0, 2).tolist() for loader in loaders]  # the last batch, 8 and 9
        [[8], [9]]
        """
        members = self.order(epoch)[batch * self.batch_size : (batch + 1) * self.batch_size]
        index, count = self.shard
        if count == 1:
            return members
        members = np.resize(members, max(self.multiple, len(members) - len(members) % self.multiple))
        part = len(members) // count
        return members[index * part : (index + 1) * part]

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
        _, _, (pixels, futures) = self._pending.popleft()
        read = np.array([future.result() for _, future in futures], dtype=bool)
        kept = np.asarray([index for index, _ in futures], dtype=np.int64)[read]
        if not read.all():
            pixels = pixels[read]
        if not len(kept):  # every file of this batch was bad: borrow one good image
            for index in self.indices:
                image = self.load(int(index), epoch)
                if image is not None:
                    pixels, kept = image[None].astype(self.pixel_dtype), np.asarray([index], dtype=np.int64)
                    break
            else:
                raise KbenchError(f"none of the images in {self.images.root} could be decoded")
        return pixels, self.images.labels[kept], kept

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


def loader_throughput(
    images: ImageSet,
    indices: np.ndarray,
    image_size: int,
    batch_size: int,
    workers: int | None = None,
    seed: int = 0,
    pixel_dtype: str = "uint8",
) -> dict:
    """How fast an ``ImageLoader`` feeds training: one augmented, shuffled pass (epoch 0) over
    ``indices``, timed from the first batch asked to the last one read. Returns ``images`` (those
    decoded), ``seconds``, ``images_per_second`` and ``threads`` (the loader's workers). The input
    pipeline's benchmarks (benchmarks/pipeline.py, gpu_bench.py) measure with this; batches are
    ``pixel_dtype`` (uint8, as training ships them)."""
    import time

    loader = ImageLoader(
        images,
        indices,
        image_size,
        batch_size,
        augment=True,
        shuffle=True,
        seed=seed,
        workers=workers,
        pixel_dtype=pixel_dtype,
    )
    try:
        start = time.perf_counter()
        count = sum(len(loader.batch(0, batch)[1]) for batch in range(len(loader)))
        seconds = time.perf_counter() - start
    finally:
        loader.close()
    return {"images": count, "seconds": seconds, "images_per_second": count / seconds, "threads": loader.workers}
