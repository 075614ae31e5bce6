"""The run folder: the one place that knows its file names, its lock, its kind and how to read it.

A run folder is what ``kbench train`` (kind ``backbone``) and ``kbench ensemble`` (kind
``ensemble``) write, and what ``export``, ``latency``, ``predict``, ensembles and studies read::

    config.json      the config the run was made from (it can be re-run from it; resume compares it)
    split.json       the data, its layout and classes, and the train / validation file names
    history.csv      one row per epoch
    metrics.json     the result; its presence means the run finished
    model.keras      the trained model (the best epoch's)
    checkpoint.keras, checkpoint.json   while training, for --resume
    best.weights.h5  while training with early stopping: the best epoch's weights so far
    features/        an ensemble's cached member features
    latency.json     a study's timings of this model
    curves.png       loss, accuracy (and learning rate) per epoch, redrawn after every epoch

Every other module asks this one for those names. Two processes never write one folder at once:
``Run.lock()`` takes an exclusive ``flock`` that the second process is refused (exit 2). When
several processes train one model together, only process 0 writes: the others open the folder
with ``writer=False``, which reads as usual but writes, locks and clears nothing.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import logging
import os
import shutil
from contextlib import contextmanager

from kbench.core import files
from kbench.core.errors import KbenchError

log = logging.getLogger("kbench")

CONFIG, SPLIT, HISTORY, METRICS, MODEL = "config.json", "split.json", "history.csv", "metrics.json", "model.keras"
CHECKPOINT, CHECKPOINT_STATE, BEST = "checkpoint.keras", "checkpoint.json", "best.weights.h5"
FEATURES, LATENCY, CURVES = "features", "latency.json", "curves.png"
LOCK = ".kbench.lock"
KINDS = ("backbone", "ensemble")
REPLACED = ".replaced-"  # the prefix of an old run's files that --overwrite set aside
# Everything kbench may write into a run folder: what --overwrite removes, and nothing else.
OWNED = (CONFIG, SPLIT, HISTORY, METRICS, MODEL, CHECKPOINT, CHECKPOINT_STATE, BEST, FEATURES, LATENCY, CURVES)


class Run:
    """A run or ensemble folder. ``Run(path)`` names one (it may not exist yet); ``Run.open(path)``
    requires a finished one.

    >>> Run("runs/b0").file(MODEL)
    'runs/b0/model.keras'
    """

    def __init__(self, path: str, writer: bool = True):
        self.path = path
        self.writer = writer  # False: a process other than 0 of several training together

    def __repr__(self) -> str:
        return f"Run({self.path!r})"

    @classmethod
    def open(cls, path: str) -> "Run":
        """A finished run or ensemble folder; KbenchError saying what is missing otherwise."""
        run = cls(path)
        if not os.path.exists(path):
            raise KbenchError(f"{path} is not a finished kbench run (not found)")
        if not os.path.isdir(path):
            raise KbenchError(f"{path} is not a finished kbench run (a file, not a run folder)")
        for needed in (MODEL, CONFIG, SPLIT, METRICS):
            if not os.path.isfile(run.file(needed)):
                raise KbenchError(f"{path} is not a finished kbench run (no {needed})")
        return run

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def exists(self, name: str) -> bool:
        return os.path.exists(self.file(name))

    # -- reads --------------------------------------------------------------------------------------
    def _read(self, name: str):
        try:
            return files.read_json(self.file(name))
        except FileNotFoundError:
            raise KbenchError(f"{self.path} has no {name} (is it a kbench run folder?)") from None
        except (ValueError, UnicodeDecodeError) as error:
            raise KbenchError(
                f"{self.file(name)} is corrupt ({error}); remove the run folder and train again"
            ) from None

    @property
    def config(self) -> dict:
        return self._read(CONFIG)

    @property
    def metrics(self) -> dict | None:
        return self._read(METRICS) if self.exists(METRICS) else None

    @property
    def split(self) -> dict:
        return self._read(SPLIT)

    @property
    def history(self) -> list[dict]:
        """history.csv's rows, numbers as floats (``phase`` and other words as text); [] if none."""
        if not self.exists(HISTORY):
            return []
        with open(self.file(HISTORY), encoding="utf-8", newline="") as handle:
            return [{key: _number_or_text(value) for key, value in row.items()} for row in csv.DictReader(handle)]

    @property
    def latency(self) -> list[dict]:
        """The timing rows a study recorded in latency.json; [] if none (or unreadable)."""
        if not self.exists(LATENCY):
            return []
        try:
            saved = files.read_json(self.file(LATENCY))
        except (ValueError, UnicodeDecodeError):
            return []
        rows = saved.get("rows") if isinstance(saved, dict) else saved
        return [row for row in rows or [] if isinstance(row, dict)]

    @property
    def kind(self) -> str:
        """``backbone`` or ``ensemble``, as the run recorded it (older runs: told by their fields)."""
        record = self.metrics or (self.config if self.exists(CONFIG) else {})
        if record.get("kind") in KINDS:
            return record["kind"]
        return "ensemble" if "members" in record else "backbone"

    @property
    def finished(self) -> bool:
        return self.exists(METRICS) and self.exists(MODEL)

    @property
    def model_path(self) -> str:
        return self.file(MODEL)

    def model_hash(self) -> str:
        """SHA-256 of ``model.keras``: the model's identity for caches (ONNX files, features)."""
        return file_hash(self.model_path)

    def images(self, part: str):
        """(ImageSet, indices) of the run's ``train`` or ``val`` part, as split.json recorded them;
        KbenchError when the images changed since (other pixels under the same names included)."""
        from kbench.data.dataset import data_change, find_images, indices_of

        split = self.split
        images = find_images(split["data"], layout=_layout_option(split.get("layout")))
        indices = indices_of(images, split[part])
        if data_change(split, images) == "changed":
            raise KbenchError(f"the images in {split['data']} changed since {self.path} was made; train it again")
        return images, indices

    def labels(self) -> dict:
        """What a model file alone doesn't say: classes and backbone(s) (for ONNX metadata)."""
        record = self.metrics or {}
        found = {"classes": record.get("classes")}
        if record.get("members"):
            found["backbones"] = [member.get("backbone") for member in record["members"]]
        elif record.get("backbone"):
            found["backbones"] = [record["backbone"]]
        return {key: value for key, value in found.items() if value}

    def read_checkpoint(self) -> dict | None:
        if not self.exists(CHECKPOINT_STATE):
            return None
        state = self._read(CHECKPOINT_STATE)
        if not isinstance(state, dict) or not isinstance(state.get("history"), list) or not self.exists(CHECKPOINT):
            raise KbenchError(f"the checkpoint in {self.path} is incomplete; remove the folder and train again")
        return state

    # -- writes -------------------------------------------------------------------------------------
    def write_config(self, record: dict) -> None:
        if not self.writer:
            return
        files.write_json(self.file(CONFIG), record)

    def write_split(self, record: dict) -> None:
        if not self.writer:
            return
        files.write_json(self.file(SPLIT), record)

    def write_metrics(self, record: dict) -> None:
        if not self.writer:
            return
        files.write_json(self.file(METRICS), record)
        self._drop_replaced()  # the new run is finished: the one --overwrite set aside goes

    def write_history(self, rows: list[dict]) -> None:
        if not self.writer:
            return
        files.write_csv(self.file(HISTORY), rows)

    def save_model(self, model) -> None:
        if not self.writer:
            return
        files.save_model(model, self.model_path)

    def save_checkpoint(self, model, state: dict) -> None:
        if not self.writer:
            return
        files.save_model(model, self.file(CHECKPOINT))
        files.write_json(self.file(CHECKPOINT_STATE), state)

    def save_best(self, model) -> None:
        """Keep the best epoch's weights so far (early stopping restores them, also after --resume)."""
        if not self.writer:
            return
        with files.atomic_path(self.file(BEST), suffix=".weights.h5") as temporary:
            model.save_weights(temporary)

    def load_best(self, model) -> None:
        model.load_weights(self.file(BEST))

    def clear_checkpoint(self) -> None:
        if not self.writer:
            return
        for name in (CHECKPOINT, CHECKPOINT_STATE, BEST):
            if self.exists(name):
                os.remove(self.file(name))

    def feature_path(self, member: str, part: str, epoch: int) -> str:
        return os.path.join(self.path, FEATURES, f"{member}-{part}-{epoch}.npz")

    def _owned(self) -> tuple[str, ...]:
        return OWNED if self.kind == "ensemble" else tuple(name for name in OWNED if name != FEATURES)

    def clear(self) -> None:
        """Remove what kbench wrote here (files of others stay; ``features/`` is kbench's in ensemble
        folders only), then put back the run that ``--overwrite`` set aside for it, if any: a new run
        that failed before it finished leaves the old one as it was."""
        if not self.writer:
            return
        _remove(self.path, self._owned())
        self._restore_replaced()

    def _replaced(self) -> list[str]:
        """The names of the run ``--overwrite`` set aside (still kept until the new one finishes)."""
        return sorted(name for name in OWNED if os.path.lexists(self.file(REPLACED + name)))

    def _set_aside(self) -> None:
        """``--overwrite``: rename the old run's files aside (``.replaced-NAME``, same folder), to be
        removed once the new run has finished (``write_metrics``) and put back if it fails first. A
        file that can't be moved refuses the overwrite with every file back in place. A folder that
        already holds a set-aside run holds an unfinished replacement of it: that is what is removed."""
        if self._replaced():
            if self.exists(METRICS):  # the replacement finished; its predecessor's removal failed then
                self._drop_replaced()
            else:
                try:
                    _remove(self.path, OWNED)
                except OSError as error:
                    raise KbenchError(f"can't replace the unfinished run in {self.path}: {_why(error)}") from None
                return
        moved = []
        try:
            for name in self._owned():
                if os.path.lexists(self.file(name)):
                    os.rename(self.file(name), self.file(REPLACED + name))
                    moved.append(name)
        except OSError as error:
            for name in moved:
                os.rename(self.file(REPLACED + name), self.file(name))
            raise KbenchError(f"can't replace the run in {self.path}: {_why(error)}; nothing was changed") from None

    def _restore_replaced(self) -> None:
        for name in self._replaced():
            os.rename(self.file(REPLACED + name), self.file(name))

    def _drop_replaced(self) -> None:
        try:
            _remove(self.path, [REPLACED + name for name in self._replaced()])
        except OSError as error:  # the new run is written; an old file left over is only untidy
            log.warning(f"the replaced run's files in {self.path} could not all be removed: {_why(error)}")

    # -- preparing a folder to write ------------------------------------------------------------------
    def prepare(self, kind: str, overwrite: bool = False, resume: bool = False) -> dict | None:
        """Check that this folder may receive a new run of ``kind`` (or resume one); returns the
        checkpoint state to resume from. Call it while holding ``lock()``.

        Refuses a path that is a file or unwritable, a finished run (of anything) unless
        ``overwrite``, and an interrupted run unless ``resume`` or ``overwrite``. A reader
        (``writer=False``) only reads the checkpoint to resume from: process 0 decides and prepares.
        """
        if not self.writer:
            return self.read_checkpoint() if resume else None
        if resume:
            state = self.read_checkpoint()
            if state is not None:
                if self.kind != kind:
                    raise KbenchError(f"{self.path} holds an interrupted {self.kind} run, not a {kind} run")
                return state
            if self.exists(METRICS):
                raise KbenchError(f"{self.path} has already finished training; nothing to resume")
            raise KbenchError(f"{self.path} holds no checkpoint to resume from")
        finished, interrupted = self.exists(METRICS), self.exists(CHECKPOINT_STATE)
        if (finished or interrupted) and not overwrite:
            what = f" ({self.kind})" if os.path.isfile(self.file(CONFIG)) else ""
            state = "a finished" if finished else "an interrupted"
            advice = ", continue it with --resume" if interrupted and not finished else ""
            raise KbenchError(
                f"{self.path} already holds {state} run{what}{advice}; choose another "
                "--run-dir, or pass --overwrite to replace it"
            )
        if overwrite:
            self._set_aside()
        return None

    @contextmanager
    def lock(self):
        """Hold this folder for one process: a second one gets KbenchError at once.

        The lock file exists only while held; a locker checks that the file it locked is still the
        one at the path (another process may have just removed it), so the unlink can't let two in.
        A reader (``writer=False``) takes no lock: process 0 holds it for all.
        """
        if not self.writer:
            yield self
            return
        created = not os.path.exists(self.path)
        ensure_writable_folder(self.path, "--run-dir")
        try:
            with folder_lock(self.path, what="run folder"):
                files.remove_stale_temporaries(self.path)
                if self._replaced() and not (self.exists(METRICS) or self.exists(CHECKPOINT_STATE)):
                    self.clear()  # an --overwrite killed before its first checkpoint: the old run comes back
                yield self
        finally:
            if created and os.path.isdir(self.path) and not os.listdir(self.path):
                try:
                    os.rmdir(self.path)  # a refused or failed first run leaves no empty folder behind
                except OSError:
                    pass


def ensure_writable_folder(path: str, option: str) -> None:
    """Create ``path`` if needed; KbenchError in one line if it is a file or can't be written."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise KbenchError(f"{option} {path} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise KbenchError(f"can't create {option} {path}: {error.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise KbenchError(f"{option} {path} is not writable")


@contextmanager
def folder_lock(path: str, what: str = "folder"):
    """An exclusive, non-blocking ``flock`` on ``path/.kbench.lock``, released (and the file
    removed) on exit; the kernel drops it when a process dies, even on kill -9."""
    lock_path = os.path.join(path, LOCK)
    while True:
        try:
            handle = open(lock_path, "a+")
        except OSError as error:
            raise KbenchError(f"can't lock {path}: {error.strerror}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            handle.seek(0)
            owner = handle.read().strip()
            handle.close()
            if error.errno in (errno.EAGAIN, errno.EACCES):
                raise KbenchError(
                    f"{path} is in use by another kbench process{f' (pid {owner})' if owner else ''}; "
                    f"wait for it to finish or use another {what}"
                ) from None
            raise
        try:
            same = os.fstat(handle.fileno()).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()  # the holder removed it between our open and our lock: try the new one
    try:
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        try:
            os.remove(lock_path)
        except OSError:
            pass
        handle.close()


def refuse_overwriting(output: str, option: str, inputs) -> None:
    """KbenchError in one line when writing ``output`` would replace one of ``inputs`` (the file itself,
    the folder, or a run folder's own file: its model.keras, config.json, ...): ``kbench predict
    --data test.zip -o test.zip`` replaced the test set, ``export onnx RUN -o RUN/model.keras`` the model."""
    for given in inputs:
        if not given or not os.path.exists(given):
            continue
        if os.path.exists(output) and os.path.samefile(output, given):
            raise KbenchError(f"{option} {output} would overwrite {given}, an input; choose another file")
        if os.path.isdir(given) and files.within(output, given) and os.path.isfile(os.path.join(given, CONFIG)):
            name = os.path.relpath(os.path.realpath(output), os.path.realpath(given)).split(os.sep)[0]
            if name in (*OWNED, LOCK):
                raise KbenchError(f"{option} {output} would overwrite the {name} of run {given}; choose another file")


def _remove(folder: str, names) -> None:
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def _why(error: OSError) -> str:
    return f"{error.filename}: {error.strerror}" if error.filename and error.strerror else str(error)


def file_hash(path: str) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _number_or_text(value: str | None):
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError:
        return value


def _layout_option(recorded: str | None) -> str:
    """split.json's layout name -> the find_images option that reads it the same way."""
    return {"kaggle": "kaggle", "class-folders": "folders"}.get(recorded or "", "auto")
