"""Atomic writes: every file a user keeps is written to a temporary name, then renamed. Scratch
folders that a killed process left behind are removed by the next one.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager

from kbench.core.errors import KbenchError

TEMPORARY_MARK = ".tmp"  # in every temporary name written here


@contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    ``suffix`` keeps an extension some writers insist on (keras saves only to ``*.keras``).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if os.path.isdir(path):
        raise KbenchError(f"{path} is a folder; give a file name")
    handle, temporary = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", suffix=f"{TEMPORARY_MARK}{suffix}", dir=folder
    )
    os.close(handle)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; keep the usual permissions
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as temporary:
        with open(temporary, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(data)


def write_json(path: str, value) -> None:
    """JSON with ``null`` where a number is NaN or infinite (bare ``NaN`` is not JSON)."""
    text = json.dumps(_finite(value), indent=2, sort_keys=False, default=_jsonable, allow_nan=False)
    write_text(path, text + "\n")


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return _finite(value.tolist())
    return value


def read_json(path: str):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def write_csv(path: str, rows: list[dict], columns: list[str] | None = None) -> None:
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def within(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (links resolved; neither need exist)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def save_model(model, path: str) -> None:
    """``model.save`` to a temporary ``.keras`` file, then rename."""
    with atomic_path(path, suffix=".keras") as temporary:
        model.save(temporary)


def remove_stale_temporaries(folder: str) -> None:
    """Remove half-written files that a killed writer left in ``folder`` (call it holding the
    folder's lock, so that no live writer's temporary is taken)."""
    for path in glob.glob(os.path.join(folder, f".*{TEMPORARY_MARK}*")):
        if os.path.isfile(path):
            os.remove(path)


SCRATCH_PREFIX = "kbench-"


@contextmanager
def scratch_folder(purpose: str):
    """A temporary folder named after this process, removed on exit; folders of processes that no
    longer exist (killed with -9) are swept first."""
    root = tempfile.gettempdir()
    for path in glob.glob(os.path.join(root, f"{SCRATCH_PREFIX}*-pid*-*")):
        try:
            pid = int(path.rsplit("-pid", 1)[1].split("-", 1)[0])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(path, ignore_errors=True)
    folder = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{purpose}-pid{os.getpid()}-", dir=root)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _jsonable(value):
    # numpy scalars and arrays in metrics
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"can't write {type(value).__name__} as JSON")
