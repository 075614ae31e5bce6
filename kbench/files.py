"""Atomic writes: every file a user keeps is written to a temporary name, then renamed."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from contextlib import contextmanager


@contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    ``suffix`` keeps an extension some writers insist on (keras saves only to ``*.keras``).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=f".tmp{suffix}", dir=folder)
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
    write_text(path, json.dumps(value, indent=2, sort_keys=False, default=_jsonable) + "\n")


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


def save_model(model, path: str) -> None:
    """``model.save`` to a temporary ``.keras`` file, then rename."""
    with atomic_path(path, suffix=".keras") as temporary:
        model.save(temporary)


def _jsonable(value):
    # numpy scalars and arrays in metrics
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"can't write {type(value).__name__} as JSON")
