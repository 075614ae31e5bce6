import logging
import os
import re
import shutil
import stat
import zipfile

import numpy as np
import pytest

from kbench.core.errors import KbenchError
from kbench.data.dataset import LAYOUTS, find_images, split_indices
from kbench.data.loader import ImageLoader
from kbench.data.synthetic import encode_jpeg, make_image

from conftest import run_cli

pytestmark = pytest.mark.once  # backend-independent: `make test` runs it under TensorFlow only


def test_kaggle_zip_is_read_in_place(kaggle_data):
    folder = os.path.dirname(kaggle_data["train"])
    before = {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder)}
    images = find_images(kaggle_data["train"])
    assert images.layout == "kaggle"
    assert images.classes == ["cat", "dog"]  # sorted: class 1 is dog, so a binary output is P(dog)
    assert len(images) == 240
    assert all(key.startswith("train/") for key in images.keys)
    assert set(images.labels.tolist()) == {0, 1}
    assert [images.classes[label] for label in images.labels[:4]] == [
        k.split("/")[1].split(".")[0] for k in images.keys[:4]
    ]
    loader = ImageLoader(images, np.arange(8), 32, 8)
    pixels, labels = loader.batch(0, 0)
    loader.close()
    assert pixels.shape == (8, 32, 32, 3) and labels.tolist() == images.labels[:8].tolist()
    # read from the zip itself: nothing extracted beside it, the zip untouched
    assert {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder)} == before


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


JPEG = encode_jpeg(make_image(0, 16, np.random.default_rng(0)))
KAGGLE = [f"{label}.{n}.jpg" for label in ("cat", "dog") for n in range(6)]


def write_tree(root, names, data=JPEG):
    """Files named ``names`` (relative, '/'-separated) under ``root``; a .zip root becomes a zip."""
    root = str(root)
    if root.endswith(".zip"):
        with zipfile.ZipFile(root, "w") as archive:
            for name in names:
                archive.writestr(name, data)
        return root
    for name in names:
        path = os.path.join(root, *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)
    return root


@pytest.mark.parametrize(
    "names, message",
    [
        (
            [f"{n}.jpg" for n in range(1, 40)],  # a test set given as training data
            r"39 images in one folder \(the top level\), 39 of them with no <label>.<n> name \(e.g. 1.jpg\): expected",
        ),
        ([f"cats/{n}.jpg" for n in range(20)], r"20 images in one folder \(cats/\), 20 of them with no <label>"),
        (KAGGLE + ["extra/dog.100.jpg"], r"images at different depths \(cat.0.jpg and extra/dog.100.jpg\)"),
        (
            ["x.jpg"] + [f"{c}/{n}.jpg" for c in ("cats", "dogs") for n in range(3)],
            r"images at different depths \(cats/0.jpg and x.jpg\)",
        ),
        (
            [f"cats/{where}/{n}.jpg" for where in ("indoor", "outdoor") for n in range(3)] + ["dogs/0.jpg"],
            r"images at different depths \(cats/indoor/0.jpg and dogs/0.jpg\)",
        ),
        (
            [f"a/cats/{n}.jpg" for n in range(3)] + [f"b/dogs/{n}.jpg" for n in range(3)],
            r"class folders under different parents \(a/cats/0.jpg and b/dogs/0.jpg\)",
        ),
        (
            [f"{c} {n}.jpg" for c in ("Dog", "Cat") for n in range(11)],
            r"22 of them with no <label>.<n> name \(e.g. Cat 0.jpg\)",
        ),
        (
            [f"{n}/x.jpg" for n in range(12)],
            r"12 distinct labels among 12 images .*names, not classes.*--layout kaggle\|folders",
        ),
        ([f"{c}.{n}.jpg" for c in "abcdefghijkl" for n in range(1)], r"12 distinct labels among 12 images"),
        ([f"cat.{n}.jpg" for n in range(3)], r"holds a single class \('cat'\)"),
        (
            [f"dogs/{breed}.{n}.jpg" for breed in ("beagle", "poodle") for n in range(3)] + ["cats/0.jpg"],
            r"folder dogs/ holds images named for different labels \(beagle.N, poodle.N\), so it is not one class",
        ),
    ],
)
def test_anything_but_the_two_layouts_is_refused_in_one_line(tmp_path, names, message):
    root = write_tree(tmp_path / "data", names)
    with pytest.raises(KbenchError, match=message) as refused:
        find_images(root)
    assert "\n" not in str(refused.value) and str(refused.value).startswith(root)


def test_zip_with_a_kaggle_folder_beside_another_folder_is_refused(tmp_path):
    root = write_tree(tmp_path / "data.zip", [f"train/{name}" for name in KAGGLE] + ["extra/dog.100.jpg"])
    with pytest.raises(KbenchError, match=r"folder train/ holds images named for different labels \(cat.N, dog.N\)"):
        find_images(root)
    forced = find_images(root, layout="folders")  # the user says the folders are the classes
    assert forced.classes == ["extra", "train"] and np.bincount(forced.labels).tolist() == [1, 12]


@pytest.mark.parametrize(
    "name", ["../evil.jpg", "/etc/evil.jpg", "train/../../evil.jpg", "C:\\evil.jpg", "..\\evil.jpg", "C:/evil.jpg"]
)
def test_unsafe_zip_names_refuse_the_zip(tmp_path, name):
    root = write_tree(tmp_path / "data.zip", [f"train/{n}" for n in KAGGLE] + [name])
    for labelled in (True, False):
        with pytest.raises(KbenchError, match=f"unsafe entry {re.escape(repr(name))}"):
            find_images(root, labelled=labelled)


@pytest.mark.parametrize("zipped", [False, True])
def test_hidden_files_and_macos_folders_are_ignored(tmp_path, zipped):
    names = (
        [f"train/{n}" for n in KAGGLE]
        + ["train/.ipynb_checkpoints/cat.0-checkpoint.jpg", "train/.dog.7.jpg", ".hidden/cat.9.jpg"]
        + [f"__MACOSX/train/._{n}" for n in KAGGLE]
    )
    root = write_tree(tmp_path / ("data.zip" if zipped else "data"), names)
    images = find_images(root)
    assert images.layout == "kaggle" and images.classes == ["cat", "dog"]
    assert images.keys == sorted(f"train/{n}" for n in KAGGLE)
    assert find_images(root, labelled=False).keys == images.keys


def test_class_folders_in_a_zip_and_kaggle_labels_lower_cased(tmp_path):
    zipped = find_images(
        write_tree(tmp_path / "f.zip", [f"train/{c}/{n}.png" for c in ("dog", "Cat") for n in range(3)])
    )
    assert zipped.layout == "class-folders" and zipped.classes == ["Cat", "dog"]
    assert [zipped.classes[i] for i in zipped.labels] == [key.split("/")[1] for key in zipped.keys]
    kaggle = find_images(write_tree(tmp_path / "k", ["Dog.1.JPG", "dog.2.jpg", "CAT.1.png", "cat.3.jpeg"]))
    assert kaggle.layout == "kaggle" and kaggle.classes == ["cat", "dog"] and kaggle.labels.tolist() == [0, 1, 0, 1]


def test_a_forced_layout_checks_its_own_rule(tmp_path):
    assert LAYOUTS == ("auto", "kaggle", "folders")
    breeds = write_tree(
        tmp_path / "breeds",
        [f"dogs/{b}.{n}.jpg" for b in ("beagle", "poodle") for n in range(3)] + [f"cats/{n}.jpg" for n in range(3)],
    )
    assert find_images(breeds, layout="folders").classes == ["cats", "dogs"]
    with pytest.raises(KbenchError, match=r"cats/0.jpg is not in dogs/ with|dogs/beagle.0.jpg is not in cats/ with"):
        find_images(breeds, layout="kaggle")
    kaggle = write_tree(tmp_path / "kaggle", KAGGLE + ["dog 7.jpg"])
    with pytest.raises(
        KbenchError, match=r"kaggle: dog 7.jpg is not named <label>.<n>.<ext> as the Kaggle layout needs"
    ):
        find_images(kaggle, layout="kaggle")
    with pytest.raises(KbenchError, match=r"cat.0.jpg is not inside a class folder"):
        find_images(kaggle, layout="folders")
    nested = write_tree(tmp_path / "nested", ["cats/0.jpg", "dogs/0.jpg", "dogs/puppies/1.jpg"])
    with pytest.raises(KbenchError, match=r"images at different depths \(cats/0.jpg and dogs/puppies/1.jpg\)"):
        find_images(nested, layout="folders")
    unique = write_tree(tmp_path / "unique", [f"{n}/x.jpg" for n in range(12)])
    assert len(find_images(unique, layout="folders").classes) == 12  # forced: the user knows
    with pytest.raises(KbenchError, match=r"unknown layout 'flat'; choose auto, kaggle, folders"):
        find_images(unique, layout="flat")


def test_empty_files_are_skipped_for_training_but_kept_in_test_sets(tmp_path):
    root = write_tree(tmp_path / "test", [f"{n}.jpg" for n in range(1, 6)])
    (tmp_path / "test" / "7.jpg").write_bytes(b"")
    unlabelled = find_images(root, labelled=False)
    assert unlabelled.keys == ["1.jpg", "2.jpg", "3.jpg", "4.jpg", "5.jpg", "7.jpg"] and unlabelled.skipped == []
    assert unlabelled.labels.tolist() == [-1] * 6
    write_tree(tmp_path / "train", KAGGLE)
    (tmp_path / "train" / "dog.99.jpg").write_bytes(b"")
    labelled = find_images(str(tmp_path / "train"))
    assert labelled.skipped == ["dog.99.jpg"] and len(labelled) == 12


def test_train_refuses_a_test_set_through_the_cli(tmp_path):
    root = write_tree(tmp_path / "test", [f"{n}.jpg" for n in range(1, 30)])
    done = run_cli(
        "train",
        "--backbone",
        "small_cnn",
        "--data",
        root,
        "--run-dir",
        str(tmp_path / "run"),
        "--weights",
        "none",
        "--epochs",
        "1",
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kbench: error: ") and "29 images in one folder" in lines[0]
    assert not (tmp_path / "run").exists()


def write_links(root):
    """A dangling symlink, a loop of two symlinks and a folder symlinked to itself among the images."""
    os.symlink(os.path.join(str(root), "missing", "x.jpg"), os.path.join(root, "dog.90.jpg"))
    os.symlink("cat.92.jpg", os.path.join(root, "cat.91.jpg"))
    os.symlink("cat.91.jpg", os.path.join(root, "cat.92.jpg"))
    os.symlink(".", os.path.join(root, "again"))


def write_zip_with_links(path):
    with zipfile.ZipFile(path, "w") as archive:
        for name in KAGGLE:
            archive.writestr(f"train/{name}", JPEG)
        links = {"dog.90.jpg": "../missing/x.jpg", "cat.91.jpg": "cat.92.jpg", "cat.92.jpg": "cat.91.jpg"}
        for name, target in links.items():
            info = zipfile.ZipInfo(f"train/{name}")
            info.create_system = 3  # Unix, as `zip -y` writes a symlink
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return str(path)


@pytest.mark.parametrize("where", ["folder", "symlinked folder", "zip"])
def test_dangling_symlinks_and_loops_are_skipped_by_name(tmp_path, caplog, where):
    if where == "zip":
        root, prefix = write_zip_with_links(tmp_path / "data.zip"), "train/"
    else:
        root, prefix = write_tree(tmp_path / "data", KAGGLE), ""
        write_links(root)
        if where == "symlinked folder":
            os.symlink(root, tmp_path / "link")
            root = str(tmp_path / "link")
    links = [f"{prefix}{name}" for name in ("cat.91.jpg", "cat.92.jpg", "dog.90.jpg")]
    with caplog.at_level(logging.WARNING, logger="kbench"):
        images = find_images(root)
    assert images.layout == "kaggle" and images.keys == [prefix + name for name in sorted(KAGGLE)]
    assert images.skipped == links and len(images.labels) == len(KAGGLE)
    reasons = {"folder": ("a symlink loop", "a symlink loop", "a dangling symlink"), "zip": ("a symlink",) * 3}
    for link, reason in zip(links, reasons["zip" if where == "zip" else "folder"]):
        assert f"skipped unreadable image file {link} ({reason})" in caplog.text
    assert find_images(root, labelled=False).keys == sorted(images.keys + links)  # a test set keeps them


def test_a_data_set_of_only_broken_links_is_one_line(tmp_path):
    (tmp_path / "data").mkdir()
    for name in KAGGLE:
        os.symlink(str(tmp_path / "gone" / name), tmp_path / "data" / name)
    with pytest.raises(KbenchError, match=r"all 12 image files are empty or unreadable"):
        find_images(str(tmp_path / "data"))


def damaged_zip(tmp_path, damage):
    """A Kaggle train zip, then damaged: an encrypted entry, Deflate64 (as Windows may write), cut short."""
    path = write_tree(tmp_path / "train.zip", [f"train/{name}" for name in KAGGLE])
    data = bytearray(open(path, "rb").read())
    local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
    if damage == "encrypted":
        data[local + 6] |= 1
        data[central + 8] |= 1
    elif damage == "deflate64":
        data[local + 8 : local + 10] = data[central + 10 : central + 12] = (9).to_bytes(2, "little")
    else:
        data = data[: len(data) // 2]
    open(path, "wb").write(bytes(data))
    return path


@pytest.mark.parametrize(
    "damage, message",
    [
        ("encrypted", r"train/cat.0.jpg is encrypted; kbench reads zips without a password: extract it"),
        ("deflate64", r"train/cat.0.jpg is compressed with method 9 \(Deflate64\), which Python's zipfile can't"),
        ("truncated", r"damaged or truncated zip file"),
    ],
)
def test_zips_python_cannot_read_are_refused_in_one_line(tmp_path, damage, message):
    root = damaged_zip(tmp_path, damage)
    for labelled in (True, False):
        with pytest.raises(KbenchError, match=message):
            find_images(root, labelled=labelled)


def test_a_class_left_without_readable_images_is_refused(tmp_path):
    root = write_tree(tmp_path / "data", [name for name in KAGGLE if name.startswith("cat")])
    (tmp_path / "data" / "dog.0.jpg").write_bytes(b"")
    os.symlink(str(tmp_path / "gone.jpg"), tmp_path / "data" / "dog.1.jpg")
    with pytest.raises(KbenchError, match=r"every image file of class 'dog' is empty or unreadable; a classifier"):
        find_images(root)


def test_zip_names_with_backslashes_read_as_folders(tmp_path):
    with zipfile.ZipFile(tmp_path / "old.zip", "w") as archive:  # as old Windows tools wrote them
        for index, name in enumerate(KAGGLE):
            archive.writestr(f"train\\{name}", JPEG + bytes([index]))
    images = find_images(str(tmp_path / "old.zip"))
    assert images.layout == "kaggle" and images.keys == sorted(f"train/{name}" for name in KAGGLE)
    assert images.reader().read("train/dog.5.jpg") == JPEG + bytes([KAGGLE.index("dog.5.jpg")])
    assert find_images(str(tmp_path / "old.zip"), labelled=False).keys == images.keys


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_a_damaged_zip_entry_is_an_unreadable_image(tmp_path, method):
    with zipfile.ZipFile(tmp_path / "train.zip", "w", compression=method) as archive:
        for name in KAGGLE:
            archive.writestr(f"train/{name}", JPEG)
    data = bytearray((tmp_path / "train.zip").read_bytes())
    start = data.find(b"PK\x03\x04") + 30 + len("train/cat.0.jpg") + 40  # inside the first entry's data
    data[start : start + 40] = bytes(byte ^ 0x5A for byte in data[start : start + 40])
    (tmp_path / "train.zip").write_bytes(bytes(data))
    images = find_images(str(tmp_path / "train.zip"))
    with pytest.raises(OSError, match="damaged zip entry|Invalid data stream"):  # bz2 says the latter itself
        images.reader().read("train/cat.0.jpg")
    loader = ImageLoader(images, np.arange(len(images)), 16, 4)
    assert sum(len(labels) for _, labels in loader) == len(KAGGLE) - 1
    assert [images.keys[i] for i in loader.bad] == ["train/cat.0.jpg"]


def _same_names_other_pixels(source_zip: str, target_zip: str) -> None:
    """A copy of ``source_zip`` whose every image is another picture under the same name and label."""
    with zipfile.ZipFile(source_zip) as source, zipfile.ZipFile(target_zip, "w") as target:
        for index, name in enumerate(sorted(source.namelist())):
            label = 1 if "/dog." in name else 0
            target.writestr(name, encode_jpeg(make_image(label, 32, np.random.default_rng(1000 + index))))


def test_the_fingerprint_covers_content_not_only_names(kaggle_data, tmp_path):
    """#36.1: other pixels under the same names and labels change the fingerprint, in a zip (its
    directory's CRC-32) and in a folder (the bytes, even when size and modification time are kept);
    a plain copy of either keeps it."""
    from kbench.data.dataset import data_change, data_fingerprint, fingerprints, names_fingerprint

    original = find_images(kaggle_data["train"])
    other_zip = str(tmp_path / "other.zip")
    _same_names_other_pixels(kaggle_data["train"], other_zip)
    other = find_images(other_zip)
    assert other.keys == original.keys and list(other.labels) == list(original.labels)
    assert names_fingerprint(other) == names_fingerprint(original)
    assert data_fingerprint(other) != data_fingerprint(original)
    copy = str(tmp_path / "copy.zip")
    shutil.copyfile(kaggle_data["train"], copy)
    assert data_fingerprint(find_images(copy)) == data_fingerprint(original)

    folder = tmp_path / "folder"
    with zipfile.ZipFile(kaggle_data["train"]) as archive:
        archive.extractall(folder)
    before = data_fingerprint(find_images(str(folder)))
    shutil.copytree(folder, tmp_path / "copied")  # new modification times, same bytes
    assert data_fingerprint(find_images(str(tmp_path / "copied"))) == before
    victim = folder / "train" / "cat.0.jpg"
    status = victim.stat()
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF  # one byte of pixels, same size
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(status.st_atime_ns, status.st_mtime_ns))  # and the old time put back
    changed = find_images(str(folder))
    assert data_fingerprint(changed) != before

    recorded = fingerprints(find_images(kaggle_data["train"]))
    assert data_change(recorded, original) == "" and data_change(recorded, other) == "changed"
    older = {"fingerprint": recorded["fingerprint"]}  # split.json of an earlier kbench: names only
    assert data_change(older, other) == "unverified"
    assert data_change({"fingerprint": "0" * 16}, other) == "changed"
