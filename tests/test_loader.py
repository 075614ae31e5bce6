"""How images are read: decoding, augmentation and the batching ImageLoader (kbench.data.loader)."""

import logging
import os
import struct
import threading
import zlib

import cv2
import numpy as np
import pytest

from kbench.data.dataset import find_images
from kbench.data.loader import BadImage, ImageLoader, augment, decode_image
from kbench.data.synthetic import encode_jpeg, make_image

pytestmark = pytest.mark.once  # backend-independent: `make test` runs it under TensorFlow only


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
    for (x1, y1), (x4, y4), (xc, _) in zip(one, four, cached):
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
        assert images.skipped == ["cat.92.jpg"] and "cat.92.jpg" not in images.keys
        loader = ImageLoader(images, np.arange(len(images)), 16, 4)
        seen = sum(len(labels) for _, labels in loader)
        loader.close()
    assert seen == 12
    assert sorted(images.keys[i] for i in loader.bad) == ["cat.91.jpg", "dog.90.jpg"]
    assert "dog.90.jpg" in caplog.text and "cat.92.jpg" in caplog.text


def with_orientation(jpeg: bytes, orientation: int, byte_order: str = "MM") -> bytes:
    """``jpeg`` with an EXIF APP1 segment right after SOI whose IFD0 holds only Orientation (0x0112)."""
    e = ">" if byte_order == "MM" else "<"
    tiff = byte_order.encode() + struct.pack(e + "HI", 42, 8) + struct.pack(e + "H", 1)
    tiff += struct.pack(e + "HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(e + "I", 0)
    payload = b"Exif\0\0" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


# What EXIF orientation N asks a viewer to do with the stored pixels to show them upright.
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),  # the phone was held upright: turn 90° clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def quadrants(height: int = 32, width: int = 48) -> np.ndarray:
    """RGB with four differently coloured quadrants: every one of the eight orientations looks different."""
    image = np.zeros((height, width, 3), np.uint8)
    image[: height // 2, : width // 2] = (255, 0, 0)
    image[: height // 2, width // 2 :] = (0, 255, 0)
    image[height // 2 :, : width // 2] = (0, 0, 255)
    image[height // 2 :, width // 2 :] = (255, 255, 255)
    return image


@pytest.mark.parametrize("byte_order", ["MM", "II"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_decode_applies_the_exif_orientation(orientation, byte_order):
    stored = quadrants()  # 32 high, 48 wide as stored, like a phone's sensor
    jpeg = cv2.imencode(".jpg", cv2.cvtColor(stored, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])[1]
    decoded = decode_image(with_orientation(jpeg.tobytes(), orientation, byte_order))
    upright = UPRIGHT[orientation](stored)
    assert decoded.shape == upright.shape == ((48, 32, 3) if orientation >= 5 else (32, 48, 3))
    assert np.abs(decoded.astype(int) - upright).mean() < 4  # pixels in place, up to JPEG's rounding
    if orientation == 6:  # stored top-left (red) shows at the top right, stored bottom-left (blue) top left
        assert decoded[2, -3].tolist() == pytest.approx([255, 0, 0], abs=8)
        assert decoded[2, 2].tolist() == pytest.approx([0, 0, 255], abs=8)


def test_training_and_prediction_read_a_phone_photo_upright(tmp_path):
    stored = quadrants()
    jpeg = cv2.imencode(".jpg", cv2.cvtColor(stored, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])[1]
    (tmp_path / "1.jpg").write_bytes(with_orientation(jpeg.tobytes(), 6))
    loader = ImageLoader(find_images(str(tmp_path), labelled=False), np.arange(1), 16, 1)
    pixels, _ = loader.batch(0, 0)  # the one path of train, evaluate and predict
    loader.close()
    upright = cv2.resize(np.rot90(stored, -1), (16, 16), interpolation=cv2.INTER_AREA)
    assert np.abs(pixels[0] - upright).mean() < 4


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_named_like_an_image_is_unreadable_not_a_hang(tmp_path):
    os.mkfifo(tmp_path / "1.jpg")
    (tmp_path / "2.jpg").write_bytes(encode_jpeg(make_image(0, 16, np.random.default_rng(0))))
    images = find_images(str(tmp_path), labelled=False)
    result = {}
    worker = threading.Thread(target=lambda: result.update(read=list(ImageLoader(images, np.arange(2), 16, 2))))
    worker.daemon = True  # on a regression it stays blocked in open(); the test fails instead of hanging
    worker.start()
    worker.join(30)
    assert "read" in result, "reading a FIFO blocked"
    assert [len(pixels) for pixels, _ in result["read"]] == [1]


def test_dangling_symlinks_are_skipped_in_training_and_uniform_in_prediction(tmp_path, caplog):
    from kbench.serving.submission import predict_test_set
    from kbench.training.train import TrainConfig, train

    rng = np.random.default_rng(0)
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    for index in range(8):
        for label, name in enumerate(("cat", "dog")):
            (tmp_path / "train" / f"{name}.{index}.jpg").write_bytes(encode_jpeg(make_image(label, 32, rng)))
    for index in range(1, 5):
        (tmp_path / "test" / f"{index}.jpg").write_bytes(encode_jpeg(make_image(index % 2, 32, rng)))
    os.symlink(str(tmp_path / "gone.jpg"), tmp_path / "train" / "dog.99.jpg")
    os.symlink("cat.98.jpg", tmp_path / "train" / "cat.98.jpg")  # a link to itself: a loop
    os.symlink(str(tmp_path / "gone.jpg"), tmp_path / "test" / "5.jpg")
    (tmp_path / "train" / "cat.97.jpg").write_bytes(b"not a JPEG at all")  # found, then not decodable
    config = TrainConfig(
        backbone="small_cnn", data=str(tmp_path / "train"), run_dir=str(tmp_path / "run"), epochs=1, image_size=32
    )
    with caplog.at_level(logging.WARNING, logger="kbench"):
        record = train(config, verbose=0)
    assert sorted(record["skipped_images"]) == ["cat.97.jpg", "cat.98.jpg", "dog.99.jpg"]
    assert record["train_images"] + record["val_images"] == 16  # the undecodable file is not counted
    assert "dog.99.jpg (a dangling symlink)" in caplog.text and "cat.98.jpg (a symlink loop)" in caplog.text
    result = predict_test_set(str(tmp_path / "run"), str(tmp_path / "test"), str(tmp_path / "submission.csv"))
    rows = (tmp_path / "submission.csv").read_text().splitlines()
    assert result["skipped"] == 1 and result["predicted"] == 4 and len(rows) == 6
    assert rows[-1] == "5,0.500000" and all(row != "5,0.500000" for row in rows[1:-1])


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels over a few bytes of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


def test_oversized_and_truncated_images_are_one_quiet_line(capfd):
    with pytest.raises(BadImage, match=r"^OpenCV refused it: pixels <= CV_IO_MAX_IMAGE_PIXELS$"):
        decode_image(png_claiming(40000, 40000))  # 1.6 Gpx: a decompression bomb
    png = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))[1].tobytes()
    with pytest.raises(BadImage, match="not a decodable image"):
        decode_image(png[: len(png) // 2])
    assert capfd.readouterr().err == ""  # OpenCV's own "[ WARN ...]" lines stay off the terminal


def test_jpegs_with_data_after_their_end_decode_and_truncated_ones_are_refused():
    """A motion photo (a video after the image's end marker) or padding decodes as viewers show it;
    a JPEG cut short is refused, even one whose EXIF thumbnail carries an end marker of its own."""
    pixels = make_image(1, 64, np.random.default_rng(0))
    baseline = encode_jpeg(pixels)
    progressive = cv2.imencode(".jpg", pixels[..., ::-1], [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    thumbnail = encode_jpeg(make_image(2, 16, np.random.default_rng(1)))
    app1 = b"Exif\0\0" + thumbnail  # an APP1 segment holding a whole JPEG (a thumbnail's place)
    with_thumbnail = baseline[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + baseline[2:]
    tail = np.random.default_rng(2).integers(0, 256, 20_000, dtype=np.uint8).tobytes()
    for jpeg in (baseline, progressive, with_thumbnail):
        expected = decode_image(jpeg)
        assert np.array_equal(decode_image(jpeg + b"\0" * 8192), expected)
        assert np.array_equal(decode_image(jpeg + b"ftypmp42" + tail), expected)
        with pytest.raises(BadImage, match="truncated JPEG"):
            decode_image(jpeg[: len(jpeg) - 300])


def test_loader_throughput_counts_one_augmented_pass(kaggle_data):
    from kbench.data.loader import loader_throughput

    images = find_images(kaggle_data["train"])
    measured = loader_throughput(images, np.arange(len(images)), 32, 4, workers=2)
    assert measured["images"] == len(images) and measured["threads"] == 2
    assert measured["seconds"] > 0 and measured["images_per_second"] == measured["images"] / measured["seconds"]
