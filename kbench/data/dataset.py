"""What a data set is: its layouts, finding its images and labels, splitting it (no decoding: see loader).

Two layouts, each as a folder or a zip read in place, recognised exactly (see find_images):
- Kaggle: ``train/cat.0.jpg``, ``train/dog.0.jpg``: the label is the file name before the first dot;
- class folders: ``root/<class>/<any name>.jpg``.
Anything else is refused rather than guessed. Classes are sorted by name, so for cats and dogs class 1
is "dog" and a binary model's output is P(dog).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import lzma
import os
import re
import stat
import threading
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from kbench.core.errors import KbenchError

log = logging.getLogger("kbench")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class ImageSet:
    """Image files found under ``root``. ``keys`` are paths relative to the folder or zip members;
    ``labels[i]`` indexes ``classes`` (-1 when the set is unlabelled). ``skipped``: image files left
    out of ``keys`` (empty or unreadable files of a labelled set: dangling symlinks, symlink loops).
    ``stamps[i]`` says what ``keys[i]``'s content is without reading it (see ``data_fingerprint``): a
    zip member's CRC-32 and size; "" for a folder's file (and no list for a set made by hand)."""

    root: str
    keys: list[str]
    labels: np.ndarray
    classes: list[str]
    layout: str  # "kaggle", "class-folders" or "unlabelled"
    skipped: list[str] = field(default_factory=list)
    stamps: list[str] = field(default_factory=list)
    _fingerprint: str | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.keys)

    def reader(self) -> "ImageReader":
        return ImageReader(self.root)


def _zip_key(name: str) -> str:
    """A zip entry's key: old Windows tools wrote ``train\\cat.0.jpg`` for ``train/cat.0.jpg``."""
    return name.replace("\\", "/")


class ImageReader:
    """Reads raw bytes by key from a folder or a zip; each thread keeps its own zip handle. A folder's
    entry that is not a regular file (a FIFO, a device behind a symlink) raises OSError rather than
    blocking or reading for ever; a damaged zip entry raises OSError too. A zip's keys are its entry
    names with ``/`` for ``\\``."""

    def __init__(self, root: str):
        self.root = root
        self._zip = os.path.isfile(root)
        self._local = threading.local()

    def read(self, key: str) -> bytes:
        if not self._zip:
            # O_NONBLOCK: opening a FIFO named x.jpg would otherwise wait for a writer
            flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
            with open(os.open(os.path.join(self.root, key), flags), "rb") as handle:
                if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                    raise OSError(f"{key} is not a regular file")
                return handle.read()
        archive = getattr(self._local, "archive", None)
        if archive is None:
            archive = self._local.archive = zipfile.ZipFile(self.root)
            self._local.names = {_zip_key(name): name for name in archive.namelist()}
        try:
            return archive.read(self._local.names.get(key, key))
        except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError) as error:  # a bad CRC, a corrupt stream
            raise OSError(f"damaged zip entry: {error}") from None


LAYOUTS = ("auto", "kaggle", "folders")
# A Kaggle training name: a label starting with a letter, a number, an extension (cat.0.jpg, Dog.12.JPG).
KAGGLE_NAME = re.compile(r"([^\W\d_][\w-]*)\.(\d+)\.[^.]+")
# Below this many images a labelled set isn't tested for mostly-unique labels (tiny sets are legitimate).
UNIQUE_LABEL_CHECK_FROM = 10
EXPECTED = "expected <folder>/<label>.<n>.jpg (Kaggle: train/cat.0.jpg) or one folder per class (<class>/<name>.jpg)"
FORCE = "pass --layout kaggle|folders to force one"
# What Python's zipfile decompresses; Windows may write Deflate64 (method 9), which it can't.
READABLE_COMPRESSION = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA} | {
    getattr(zipfile, "ZIP_ZSTANDARD", zipfile.ZIP_STORED)
}


def _parts(key: str) -> list[str]:
    return [part for part in key.split("/") if part not in ("", ".")]


def _is_image_name(key: str) -> bool:
    """An image by its extension, outside hidden files and folders and macOS' ``__MACOSX``."""
    parts = _parts(key)
    return (
        bool(parts)
        and parts[-1].lower().endswith(IMAGE_EXTENSIONS)
        and not any(part.startswith(".") or part == "__MACOSX" for part in parts)
    )


def _unsafe_zip_name(name: str) -> bool:
    """Absolute paths, drive letters and ``..`` components: names that point outside the archive."""
    normal = name.replace("\\", "/")
    return normal.startswith("/") or re.match(r"[A-Za-z]:", normal) is not None or ".." in normal.split("/")


def _file_size(full: str) -> tuple[int, str]:
    """(size in bytes, why the file can't be read or ""): a dangling symlink or a symlink loop is
    listed (it has an image's name) but unreadable, as is anything that is not a regular file."""
    try:
        status = os.stat(full)
    except OSError as error:
        if os.path.islink(full):
            return 0, "a symlink loop" if error.errno == errno.ELOOP else "a dangling symlink"
        return 0, error.strerror or str(error)
    if not stat.S_ISREG(status.st_mode):
        return 0, "not a regular file"
    return status.st_size, ""


def _list_files(path: str) -> list[tuple[str, int, str, str]]:
    """(key, size in bytes, why it is unreadable or "", stamp) of every image file under a folder or
    in a zip, sorted by key. A zip member's stamp is ``crc:<CRC-32>:<size>`` from the zip's directory;
    a folder's files have none (their bytes are hashed when a fingerprint is asked for)."""
    if os.path.isdir(path):
        found, seen = [], {os.path.realpath(path)}
        for folder, dirs, files in os.walk(path, followlinks=True):  # class folders may be symlinks
            kept = sorted(d for d in dirs if not d.startswith(".") and d != "__MACOSX")
            real = {d: os.path.realpath(os.path.join(folder, d)) for d in kept}
            dirs[:] = [d for d in kept if real[d] not in seen]  # a link back up would loop for ever
            seen.update(real[d] for d in dirs)
            for name in files:
                full = os.path.join(folder, name)
                key = os.path.relpath(full, path).replace(os.sep, "/")
                if _is_image_name(key):
                    found.append((key, *_file_size(full), ""))
        return sorted(found)
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                entries = archive.infolist()
        except (zipfile.BadZipFile, OSError) as error:
            raise KbenchError(f"{path}: unreadable zip file ({error})") from None
        seen = set()
        for info in entries:
            if _unsafe_zip_name(info.filename):
                raise KbenchError(
                    f"{path}: unsafe entry {info.filename!r} (absolute or outside the archive); refusing the zip"
                )
            if _zip_key(info.filename) in seen and not info.is_dir():
                raise KbenchError(f"{path}: the zip holds two entries named {_zip_key(info.filename)}")
            seen.add(_zip_key(info.filename))
        images = [info for info in entries if not info.is_dir() and _is_image_name(_zip_key(info.filename))]
        for info in images:
            if info.flag_bits & 1:
                raise KbenchError(
                    f"{path}: {info.filename} is encrypted; kbench reads zips without a password: extract it "
                    "and give the folder"
                )
            if info.compress_type not in READABLE_COMPRESSION:
                method = " (Deflate64)" if info.compress_type == 9 else ""
                raise KbenchError(
                    f"{path}: {info.filename} is compressed with method {info.compress_type}{method}, which "
                    "Python's zipfile can't read: extract it and give the folder"
                )
        # a symlink stored in a zip (zip -y) holds its target's path, not an image
        links = {info.filename for info in images if info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16)}
        return sorted(
            (
                _zip_key(info.filename),
                info.file_size,
                "a symlink" if info.filename in links else "",
                f"crc:{info.CRC:08x}:{info.file_size}",
            )
            for info in images
        )
    with open(path, "rb") as handle:
        if handle.read(4) == b"PK\x03\x04":
            raise KbenchError(f"{path}: damaged or truncated zip file (its directory at the end is missing)")
    raise KbenchError(f"{path} is neither a folder nor a zip file")


def _folder_name(parts: list[str]) -> str:
    return "/".join(parts) + "/" if parts else "the top level"


def _kaggle_names(path: str, keys: list[str], parts: list[list[str]], forced: bool) -> list[str]:
    """Labels of a Kaggle layout: every image in one folder, every name ``<label>.<n>.<ext>``."""
    folder = parts[0][:-1]
    for key, key_parts in zip(keys, parts):
        if key_parts[:-1] != folder:
            raise KbenchError(
                f"{path}: {key} is not in {_folder_name(folder)} with {keys[0]}; the Kaggle layout "
                "keeps every image in one folder"
            )
    bad = [key for key, key_parts in zip(keys, parts) if not KAGGLE_NAME.fullmatch(key_parts[-1])]
    if bad and forced:
        raise KbenchError(
            f"{path}: {bad[0]} is not named <label>.<n>.<ext> as the Kaggle layout needs "
            f"(e.g. cat.0.jpg){_and_more(bad)}"
        )
    if bad:
        raise KbenchError(
            f"{path}: {len(keys)} images in one folder ({_folder_name(folder)}), {len(bad)} of them "
            f"with no <label>.<n> name (e.g. {parts[keys.index(bad[0])][-1]}): {EXPECTED}"
        )
    return [KAGGLE_NAME.fullmatch(key_parts[-1]).group(1).lower() for key_parts in parts]


def _class_folder_names(path: str, keys: list[str], parts: list[list[str]], forced: bool) -> list[str]:
    """Labels of class folders: every image directly inside ``<container>/<class>/``, one container."""
    hint = "" if forced else f"; {EXPECTED}"
    depth = Counter(len(key_parts) for key_parts in parts).most_common(1)[0][0]
    typical = next(i for i, key_parts in enumerate(parts) if len(key_parts) == depth)
    for key, key_parts in zip(keys, parts):
        if len(key_parts) != depth:
            raise KbenchError(
                f"{path}: images at different depths ({keys[typical]} and {key}); class folders "
                f"need every image directly in <class>/, no subfolders{hint}"
            )
    for key, key_parts in zip(keys, parts):
        if len(key_parts) < 2:
            raise KbenchError(
                f"{path}: {key} is not inside a class folder; class folders need every image directly in <class>/{hint}"
            )
        if key_parts[:-2] != parts[typical][:-2]:
            raise KbenchError(
                f"{path}: class folders under different parents ({keys[typical]} and {key}); class "
                f"folders need every image directly in <class>/ inside one folder{hint}"
            )
    if not forced:
        # a folder of cat.N.jpg and dog.N.jpg is a Kaggle folder beside something else, not one class
        by_folder: dict[str, set] = {}
        for key_parts in parts:
            match = KAGGLE_NAME.fullmatch(key_parts[-1])
            by_folder.setdefault(key_parts[-2], set()).add(match.group(1).lower() if match else None)
        for folder, labels in sorted(by_folder.items()):
            if None not in labels and len(labels) >= 2:
                named = ", ".join(f"{label}.N" for label in sorted(labels)[:3])
                raise KbenchError(
                    f"{path}: folder {folder}/ holds images named for different labels ({named}), "
                    f"so it is not one class; {EXPECTED}; {FORCE}"
                )
    return [key_parts[-2] for key_parts in parts]


def _and_more(items: list) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def find_images(path: str, labelled: bool = True, layout: str = "auto") -> ImageSet:
    """Find the images under ``path`` (folder or zip) and their labels.

    ``layout`` is one of LAYOUTS. ``auto`` recognises exactly two layouts and refuses anything else:
    - Kaggle: every image in one folder and named ``<label>.<n>.<ext>`` (``train/cat.0.jpg``); the
      label, lower-cased, is the part before the first dot;
    - class folders: every image directly inside ``<class>/`` at one depth under one folder
      (``root/cat/x.jpg``, or ``train/cat/x.jpg`` in a zip); a folder that holds ``<label>.<n>`` files
      of two labels isn't taken for one class.
    A forced layout (``kaggle``, ``folders``) checks its own rule and the two classes, no more.
    Hidden files and folders and ``__MACOSX`` are ignored; a zip entry naming a path outside the
    archive refuses the zip. A labelled set needs two classes, and (auto, more than
    UNIQUE_LABEL_CHECK_FROM images) no more distinct labels than half its images: mostly unique
    labels are names, not classes. Empty files are left out (``skipped``) of a labelled set, as are
    unreadable ones (a dangling symlink, a symlink loop), each named in a warning.

    With ``labelled=False`` (a test set) every image is kept, empty and unreadable files included (the
    loader fails on them and prediction gives them the uniform row), and labels are -1.
    Every refusal is a one-line KbenchError that says what was found and what is accepted.
    """
    if layout not in LAYOUTS:
        raise KbenchError(f"unknown layout {layout!r}; choose {', '.join(LAYOUTS)}")
    if not os.path.exists(path):
        raise KbenchError(f"data not found: {path}")
    files = _list_files(path)
    if not files:
        raise KbenchError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {path}; expected train/cat.N.jpg "
            "files (Kaggle layout) or one folder per class"
        )
    keys = [key for key, _, _, _ in files]
    if not labelled:
        stamps = [stamp for _, _, _, stamp in files]
        return ImageSet(path, keys, np.full(len(keys), -1, dtype=np.int64), [], "unlabelled", stamps=stamps)

    parts = [_parts(key) for key in keys]
    if layout == "kaggle" or (layout == "auto" and len({tuple(p[:-1]) for p in parts}) == 1):
        kind, names = "kaggle", _kaggle_names(path, keys, parts, forced=layout == "kaggle")
    else:
        kind, names = "class-folders", _class_folder_names(path, keys, parts, forced=layout == "folders")
    classes = sorted(set(names))
    if len(classes) < 2:
        raise KbenchError(
            f"{path} holds a single class ({classes[0]!r}); a classifier needs at least two: name "
            "files like cat.1.jpg / dog.1.jpg or use one folder per class"
        )
    if layout == "auto" and len(keys) > UNIQUE_LABEL_CHECK_FROM and len(classes) > len(keys) / 2:
        raise KbenchError(
            f"{path}: {len(classes)} distinct labels among {len(keys)} images (e.g. {', '.join(keys[:2])}): "
            f"labels this unique are names, not classes; {EXPECTED}; {FORCE}"
        )
    index = {name: i for i, name in enumerate(classes)}
    kept, skipped = [], []
    for i, (key, size, problem, _) in enumerate(files):
        if problem:
            log.warning("skipped unreadable image file %s (%s)", key, problem)
        elif size == 0:
            log.warning("skipped empty image file %s", key)
        else:
            kept.append(i)
            continue
        skipped.append(key)
    if not kept:
        raise KbenchError(f"{path}: all {len(keys)} image files are empty or unreadable")
    lost = sorted(set(names) - {names[i] for i in kept})
    if lost:
        raise KbenchError(
            f"{path}: every image file of class {lost[0]!r} is empty or unreadable{_and_more(lost)}; a "
            "classifier needs images of each class"
        )
    labels = np.array([index[names[i]] for i in kept], dtype=np.int64)
    stamps = [files[i][3] for i in kept]
    return ImageSet(path, [keys[i] for i in kept], labels, classes, kind, skipped, stamps)


def data_fingerprint(images: ImageSet) -> str:
    """What a labelled set is, content included, as a short hash: its classes, file names and labels,
    and each file's content: a zip member's CRC-32 and size from the zip's directory, a folder file's
    bytes (SHA-256; about 1 s for 25,000 JPEGs in the page cache, measured on the project's 2-core
    machine: modification times would change on a plain copy and can be kept by a replacing tool).
    Computed once per set. Other pixels under the same names give another fingerprint.

    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ("cat.0.jpg", "dog.0.jpg"): _ = (root / name).write_bytes(b"pixels of " + name.encode())
    >>> before = data_fingerprint(find_images(str(root)))
    >>> _ = (root / "cat.0.jpg").write_bytes(b"other pixels")
    >>> data_fingerprint(find_images(str(root))) != before
    True
    """
    if images._fingerprint is None:
        digest = _names_digest(images)
        stamps = images.stamps if len(images.stamps) == len(images.keys) else [""] * len(images.keys)
        reader = None
        for key, stamp in zip(images.keys, stamps):
            if not stamp:
                reader = reader or images.reader()
                try:
                    stamp = "sha256:" + hashlib.sha256(reader.read(key)).hexdigest()
                except OSError as error:
                    raise KbenchError(f"can't read {key} in {images.root}: {error}") from None
            digest.update(f"\n{stamp}".encode())
        images._fingerprint = digest.hexdigest()[:16]
    return images._fingerprint


def _names_digest(images: ImageSet):
    digest = hashlib.sha256()
    digest.update("\n".join(images.classes).encode())
    digest.update("\n".join(images.keys).encode())
    digest.update(np.asarray(images.labels, dtype=np.int64).tobytes())
    return digest


def names_fingerprint(images: ImageSet) -> str:
    """The fingerprint earlier kbench versions recorded: file names and labels, not their content."""
    return _names_digest(images).hexdigest()[:16]


def data_change(recorded: dict, images: ImageSet) -> str:
    """How ``images`` differ from the set a run recorded in split.json: "" (the same), "changed" (other
    names, labels or content) or "unverified" (the same names and labels, recorded by a kbench that
    didn't record content, so a change of pixels can't be seen)."""
    if recorded.get("content_fingerprint"):
        return "" if recorded["content_fingerprint"] == data_fingerprint(images) else "changed"
    if recorded.get("fingerprint") not in (None, names_fingerprint(images)):
        return "changed"
    return "unverified"


def fingerprints(images: ImageSet) -> dict:
    """What split.json records of a set's identity (the names fingerprint too, for older readers)."""
    return {"fingerprint": names_fingerprint(images), "content_fingerprint": data_fingerprint(images)}


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
