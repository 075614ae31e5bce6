"""The run folder's owner: its lock, what it refuses to overwrite, its typed reads, and that no
other module spells its file names."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from kbench.core import files
from kbench.core.errors import KbenchError
from kbench.training.runs import CHECKPOINT_STATE, CONFIG, FEATURES, METRICS, OWNED, SPLIT, Run, folder_lock

from conftest import REPO

pytestmark = pytest.mark.once  # backend-independent: `make test` runs it under TensorFlow only


def test_a_second_process_is_refused_while_the_first_holds_the_folder(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from kbench.training.runs import folder_lock\n"
            "with folder_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(30)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(KbenchError, match=rf"in use by another kbench process \(pid {holder.pid}\)"):
            with folder_lock(str(tmp_path)):
                pass
    finally:
        holder.kill()  # kill -9: the kernel drops the lock with the process
        holder.wait()
    with folder_lock(str(tmp_path)):
        assert os.path.isfile(tmp_path / ".kbench.lock")
    assert not os.path.exists(tmp_path / ".kbench.lock")  # held only while in use


def test_prepare_refuses_finished_and_interrupted_runs_unless_told(tmp_path):
    run = Run(str(tmp_path / "run"))
    os.makedirs(run.path)
    assert run.prepare("backbone") is None  # an empty folder is fine
    files.write_json(run.file(CONFIG), {"kind": "ensemble"})
    files.write_json(run.file(METRICS), {"kind": "ensemble"})
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(KbenchError, match=r"already holds a finished run \(ensemble\).*--overwrite"):
        run.prepare("backbone")
    with pytest.raises(KbenchError, match="already finished training"):
        run.prepare("backbone", resume=True)
    run.prepare("backbone", overwrite=True)
    visible = [name for name in os.listdir(run.path) if not name.startswith(".")]
    assert visible == ["notes.txt"]  # only kbench's own files are set aside
    run.write_metrics({"kind": "backbone"})  # the new run finished: the old one is gone
    assert sorted(os.listdir(run.path)) == [METRICS, "notes.txt"]


def finished_run(path) -> Run:
    run = Run(str(path))
    os.makedirs(run.path)
    for name in (CONFIG, SPLIT, METRICS):
        files.write_json(run.file(name), {"kind": "backbone", "old": name})
    os.makedirs(run.file(FEATURES))  # not kbench's in a backbone folder: stays
    return run


def contents(run: Run) -> dict:
    return {
        name: open(run.file(name)).read()
        for name in sorted(os.listdir(run.path))
        if name != ".kbench.lock" and os.path.isfile(run.file(name))
    }


def test_overwrite_that_cannot_move_a_file_refuses_with_the_old_run_untouched(tmp_path, monkeypatch):
    run = finished_run(tmp_path / "run")
    before = contents(run)
    rename, calls = os.rename, []

    def refuse_the_second(source, target):
        calls.append(source)
        if len(calls) == 2:
            raise PermissionError(13, "Permission denied", source)
        rename(source, target)

    monkeypatch.setattr(os, "rename", refuse_the_second)
    with pytest.raises(KbenchError, match=r"^can't replace the run in .*Permission denied; nothing was changed$"):
        with run.lock():
            run.prepare("backbone", overwrite=True)
    monkeypatch.undo()
    assert contents(run) == before and os.path.isdir(run.file(FEATURES))


def test_an_overwrite_that_fails_or_is_killed_before_it_finishes_leaves_the_old_run(tmp_path):
    run = finished_run(tmp_path / "run")
    before = contents(run)
    with run.lock():
        run.prepare("backbone", overwrite=True)
        run.write_config({"kind": "backbone", "new": True})
        run.clear()  # what train and ensemble do when the new run fails in its first epoch
    assert contents(run) == before
    with run.lock():  # killed (-9) before its first checkpoint: the next kbench process puts it back
        run.prepare("backbone", overwrite=True)
        run.write_config({"kind": "backbone", "new": True})
    with run.lock():
        assert contents(run) == before
    with run.lock():  # an unfinished replacement overwritten again: the finished run stays set aside
        run.prepare("backbone", overwrite=True)
        files.write_json(run.file(CHECKPOINT_STATE), {"history": []})
        run.prepare("backbone", overwrite=True)
        assert not run.exists(CHECKPOINT_STATE) and not run.exists(CONFIG)
        run.clear()
    assert contents(run) == before


def test_run_dir_that_is_a_file_or_unwritable_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(KbenchError, match="is a file, not a folder"):
        with Run(str(tmp_path / "file")).lock():
            pass
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(KbenchError, match="not writable"):
            with Run(str(locked)).lock():
                pass


def test_stale_temporaries_of_a_killed_writer_are_removed_under_the_lock(tmp_path):
    (tmp_path / ".model.keras.abc.tmp.keras").write_bytes(b"half")
    (tmp_path / "keep.txt").write_text("x")
    with Run(str(tmp_path)).lock():
        pass
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]


def test_corrupt_records_are_one_line_errors(tmp_path):
    run = Run(str(tmp_path))
    (tmp_path / CONFIG).write_text("{not json")
    with pytest.raises(KbenchError, match="config.json is corrupt"):
        _ = run.config
    with pytest.raises(KbenchError, match="not a finished kbench run"):
        Run.open(str(tmp_path))
    with pytest.raises(KbenchError, match="not found"):
        Run.open(str(tmp_path / "nope"))


def test_json_never_holds_bare_nan(tmp_path):
    import numpy as np

    files.write_json(str(tmp_path / "m.json"), {"loss": float("nan"), "rows": [np.float32("inf"), 1.5]})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"loss": None, "rows": [None, 1.5]}


def test_only_the_owner_spells_the_run_folder_file_names():
    """A grep, as the design asks: run-folder file names appear as literals in kbench/training/runs.py only."""
    names = [name for name in OWNED if name not in ("features",)]
    offenders = []
    for module in sorted(os.listdir(os.path.join(REPO, "kbench"))):
        if not module.endswith(".py") or module == "runs.py":
            continue
        text = open(os.path.join(REPO, "kbench", module), encoding="utf-8").read()
        for name in names:
            if re.search(rf"[\"']{re.escape(name)}[\"']", text):
                offenders.append(f"{module}: {name}")
    assert offenders == []


def test_scratch_folders_of_dead_processes_are_swept(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"kbench-export-pid{dead.pid}-abc"
    stale.mkdir()
    (stale / "model.keras").write_text("x")
    with files.scratch_folder("test") as folder:
        assert os.path.isdir(folder) and f"pid{os.getpid()}" in folder
        assert not stale.exists()
    assert not os.path.exists(folder)


def test_a_run_folder_from_before_the_stage_packages_loads_and_is_reused(tmp_path):
    """#34.1: a run folder, its ONNX file and a .keras file holding kbench's own layer, made by main
    before the modules moved into stage packages (a5a5a66), still load, read their data and are
    reused (tests/data/*before-packages*)."""
    import numpy as np

    from kbench.export.onnx import onnx_for
    from kbench.models.backbones import load_model

    data = os.path.join(REPO, "tests", "data")
    run_dir = shutil.copytree(os.path.join(data, "run-before-packages"), tmp_path / "run")
    zipped = shutil.copy(os.path.join(data, "run-before-packages-train.zip"), tmp_path / "train.zip")
    split = json.loads((run_dir / "split.json").read_text())
    (run_dir / "split.json").write_text(json.dumps({**split, "data": str(zipped)}))
    onnx_path = shutil.copy(os.path.join(data, "run-before-packages.onnx"), tmp_path / "run.onnx")
    run = Run.open(str(run_dir))
    assert load_model(run.model_path).output_shape == (None, 1)
    assert onnx_for(str(run_dir), str(onnx_path))["reused"] is True
    images, indices = run.images("val")  # the content fingerprint it recorded still matches
    assert len(indices) == 4 and images.classes == ["cat", "dog"]
    layer = load_model(os.path.join(data, "preprocessing-before-packages.keras"))
    probability = layer.predict(np.full((1, 8, 8, 3), 100, "float32"), verbose=0)
    assert abs(float(probability[0, 0]) - 0.32039282) < 1e-6  # as the old code computed it
