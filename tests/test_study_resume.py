"""A study run again: what it reuses, what it redoes, and how a stop request ends it (apart from
test_study.py, whose module fixture runs a whole study, so that the two files run side by side)."""

import json
import os
import signal

import pytest

from kbench.study.config import load_config
from kbench.study.study import run_study

from conftest import MINIMAL_STUDY, write_study

pytestmark = pytest.mark.once  # backend-independent: `make test` runs it under TensorFlow only

# Timing is not what these tests are about: one runtime, one batch size, two runs, no ONNX export.
KERAS_ONLY = """
[latency]
runtimes = ["keras-compiled"]
batch_sizes = [1]
runs = 2
warmup = 0
"""


def test_resume_is_keyed_by_configuration(kaggle_data, tmp_path):
    """A finished member is reused only while its settings are unchanged; a changed one retrains."""
    path = write_study(tmp_path, MINIMAL_STUDY + KERAS_ONLY, data=kaggle_data["train"])
    out = str(tmp_path / "out")
    run_study(load_config(path), out, echo=lambda line: None)
    model = os.path.join(out, "runs", "small_cnn", "model.keras")
    first = os.path.getmtime(model)
    run_study(load_config(path), out, echo=lambda line: None)
    assert os.path.getmtime(model) == first
    longer = (MINIMAL_STUDY + KERAS_ONLY).replace("epochs = 1", "epochs = 2")
    changed = write_study(tmp_path, longer, data=kaggle_data["train"])
    results = run_study(load_config(changed), out, echo=lambda line: None)
    assert os.path.getmtime(model) != first
    assert results["rows"][0]["epochs"] == 2 and results["failed"] == 0
    assert json.load(open(os.path.join(out, "runs", "small_cnn", "config.json")))["epochs"] == 2


def test_a_node_that_cannot_read_the_study_folder_is_named(tmp_path):
    from kbench.core.version import __version__
    from kbench.study.cluster import _probe_task

    assert _probe_task(str(tmp_path / "elsewhere"), "token").startswith("error:")  # the driver's token unseen
    (tmp_path / ".kbench-probe-token").write_text("token")
    written, identity = _probe_task(str(tmp_path), "token").split("\t")
    assert open(written).read() == "token" and identity.split()[0] == __version__  # and its kbench


def test_a_lost_stop_request_stops_the_study_before_its_next_stage(kaggle_data, tmp_path, monkeypatch):
    """A SIGTERM whose KeyboardInterrupt Python swallowed (in a gc callback, while exporting) stops
    the study there: no timing, no next member, exit status 143."""
    from kbench.core.errors import STOP_REQUESTS, TrainingInterrupted
    from kbench.study import stages

    trained = []
    monkeypatch.setattr(stages, "_train_member", lambda member, *args: trained.append(member.name) or {})

    def export_meeting_a_signal(model_dir, onnx_dir):
        STOP_REQUESTS.append(signal.SIGTERM)  # recorded by the handler; its KeyboardInterrupt lost
        return "model.onnx"

    monkeypatch.setattr(stages, "_export", export_meeting_a_signal)
    monkeypatch.setattr(stages, "_latency_rows", lambda *args: pytest.fail("timed after a stop request"))
    two = MINIMAL_STUDY + '[[backbones]]\nname = "second"\nbackbone = "small_cnn"\n'
    config = load_config(write_study(tmp_path, two, data=kaggle_data["train"]))
    try:
        with pytest.raises(TrainingInterrupted, match="run the same command again to resume") as stopped:
            run_study(config, str(tmp_path / "out"), echo=lambda line: None)
    finally:
        STOP_REQUESTS.clear()
    assert trained == ["small_cnn"] and stopped.value.signal_number == signal.SIGTERM


def test_a_demo_out_that_cannot_be_a_folder_is_refused_in_one_line_before_any_work(tmp_path):
    from kbench.core.errors import KbenchError
    from kbench.study.study import run_demo

    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(KbenchError, match=r"^can't write the demo to --out .*a-file: Not a directory$"):
        run_demo(str(tmp_path / "a-file"), echo=lambda line: pytest.fail(f"work began: {line}"))


def test_other_pixels_under_the_same_names_retrain_the_study(kaggle_data, tmp_path, caplog):
    """#36.1: the training zip replaced by other images under the same names and labels: the same
    command trains its members again and says why, instead of reusing them (and their ensembles and
    submission) in seconds."""
    import logging
    import shutil

    from kbench.data.synthetic import write_kaggle_dataset

    data = str(tmp_path / "train.zip")
    shutil.copyfile(kaggle_data["train"], data)
    path = write_study(tmp_path, MINIMAL_STUDY + KERAS_ONLY, data=data)
    out = str(tmp_path / "out")
    run_study(load_config(path), out, echo=lambda line: None)
    model = os.path.join(out, "runs", "small_cnn", "model.keras")
    first = os.path.getmtime(model)
    other = write_kaggle_dataset(str(tmp_path / "other"), n_train=240, n_test=2, image_size=32, seed=7)
    shutil.copyfile(other["train"], data)  # same names and labels, other pixels
    with caplog.at_level(logging.WARNING, logger="kbench"):
        results = run_study(load_config(path), out, echo=lambda line: None)
    assert os.path.getmtime(model) != first and results["failed"] == 0
    assert "settings changed since it was trained (data)" in caplog.text
    second = os.path.getmtime(model)
    run_study(load_config(path), out, echo=lambda line: None)  # and the retrained member is reused
    assert os.path.getmtime(model) == second
