import logging
import shutil
import zipfile

import cv2
import numpy as np
import pytest

from kbench.data import BadImage, ImageLoader, augment, decode_image, find_images, split_indices
from kbench.errors import KbenchError
from kbench.synthetic import encode_jpeg, make_image


def test_kaggle_zip_is_read_in_place(kaggle_data, tmp_path):
    images = find_images(kaggle_data["train"])
    assert images.layout == "kaggle"
    assert images.classes == ["cat", "dog"]  # sorted: class 1 is dog, so a binary output is P(dog)
    assert len(images) == 240
    assert all(key.startswith("train/") for key in images.keys)
    assert set(images.labels.tolist()) == {0, 1}
    assert [images.classes[label] for label in images.labels[:4]] == [k.split("/")[1].split(".")[0] for k in images.keys[:4]]
    assert list(tmp_path.iterdir()) == []  # nothing extracted


def test_kaggle_folder_and_class_folders(kaggle_data, class_folders, tmp_path):
    with zipfile.ZipFile(kaggle_data["train"]) as archive:
        archive.extractall(tmp_path)
    folder = find_images(str(tmp_path / "train"))
    assert folder.layout == "kaggle" and folder.classes == ["cat", "dog"] and len(folder) == 240

    classes = find_images(class_folders)
    assert classes.layout == "class-folders"
    assert classes.classes == ["ant", "bee", "cow"]
    assert np.bincount(classes.labels).tolist() == [8, 8, 8]

    archive_path = shutil.make_archive(str(tmp_path / "folders"), "zip", class_folders)
    zipped = find_images(archive_path)
    assert zipped.layout == "class-folders" and zipped.classes == ["ant", "bee", "cow"]


def test_bad_data_paths_are_one_line_errors(tmp_path):
    with pytest.raises(KbenchError, match="data not found"):
        find_images(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(KbenchError, match="no images"):
        find_images(str(tmp_path / "empty"))
    single = tmp_path / "single"
    single.mkdir()
    for index in range(3):
        (single / f"cat.{index}.jpg").write_bytes(encode_jpeg(make_image(0, 16, np.random.default_rng(index))))
    with pytest.raises(KbenchError, match="single class"):
        find_images(str(single))


def test_split_is_stratified_and_seeded():
    labels = np.array([0] * 50 + [1] * 30)
    train, val = split_indices(labels, 0.1, seed=3)
    assert len(set(train) & set(val)) == 0 and len(train) + len(val) == 80
    assert np.bincount(labels[val]).tolist() == [5, 3]
    again_train, again_val = split_indices(labels, 0.1, seed=3)
    assert np.array_equal(val, again_val)
    assert not np.array_equal(val, split_indices(labels, 0.1, seed=4)[1])


def test_decode_converts_gray_alpha_and_16_bit():
    gray = np.full((5, 7), 100, np.uint8)
    assert decode_image(cv2.imencode(".png", gray)[1].tobytes()).shape == (5, 7, 3)
    bgra = np.zeros((4, 4, 4), np.uint8)
    bgra[..., 2] = 255  # red in OpenCV's BGR(A) order
    rgb = decode_image(cv2.imencode(".png", bgra)[1].tobytes())
    assert rgb.shape == (4, 4, 3) and rgb[0, 0].tolist() == [255, 0, 0]
    deep = np.full((3, 3, 3), 65535, np.uint16)
    decoded = decode_image(cv2.imencode(".png", deep)[1].tobytes())
    assert decoded.dtype == np.uint8 and decoded.max() == 255


@pytest.mark.parametrize("data", [b"", b"not an image at all", None])
def test_decode_rejects_broken_files(data):
    if data is None:  # a truncated JPEG
        data = encode_jpeg(make_image(1, 64, np.random.default_rng(0)))[:-600]
    with pytest.raises(BadImage):
        decode_image(data)


def test_augment_keeps_shape_and_is_seeded():
    image = make_image(0, 32, np.random.default_rng(0))
    outputs = [augment(image, np.random.default_rng([5, i])) for i in range(40)]
    assert all(out.shape == image.shape for out in outputs)
    assert any(not np.array_equal(out, image) for out in outputs)
    assert np.array_equal(augment(image, np.random.default_rng([5, 1])), outputs[1])


def test_loader_is_deterministic_whatever_the_thread_count(kaggle_data):
    images = find_images(kaggle_data["train"])
    indices = np.arange(len(images))

    def first_batches(workers, cache):
        loader = ImageLoader(images, indices, 24, 16, augment=True, shuffle=True, seed=7, workers=workers, cache=cache)
        try:
            return [loader.batch(epoch, b) for epoch in (0, 1) for b in (0, 3, 1)]
        finally:
            loader.close()

    one, four, cached = first_batches(1, False), first_batches(4, False), first_batches(4, True)
    for (x1, y1), (x4, y4), (xc, yc) in zip(one, four, cached):
        assert x1.shape == (16, 24, 24, 3) and x1.dtype == np.float32
        assert np.array_equal(x1, x4) and np.array_equal(y1, y4) and np.array_equal(x1, xc)
    assert not np.array_equal(one[0][0], one[3][0])  # epochs differ in order and augmentation


def test_loader_skips_unreadable_files_with_a_warning(tmp_path, caplog):
    rng = np.random.default_rng(0)
    for index in range(6):
        (tmp_path / f"cat.{index}.jpg").write_bytes(encode_jpeg(make_image(0, 16, rng)))
        (tmp_path / f"dog.{index}.jpg").write_bytes(encode_jpeg(make_image(1, 16, rng)))
    (tmp_path / "dog.90.jpg").write_bytes(b"garbage")
    (tmp_path / "cat.91.jpg").write_bytes(encode_jpeg(make_image(0, 64, rng))[:-500])
    (tmp_path / "cat.92.jpg").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="kbench"):
        images = find_images(str(tmp_path))
        assert images.skipped == ["cat.92.jpg"]
        loader = ImageLoader(images, np.arange(len(images)), 16, 4)
        seen = sum(len(labels) for _, labels in loader)
        loader.close()
    assert seen == 12
    assert sorted(images.keys[i] for i in loader.bad) == ["cat.91.jpg", "dog.90.jpg"]
    assert "dog.90.jpg" in caplog.text and "cat.92.jpg" in caplog.text
