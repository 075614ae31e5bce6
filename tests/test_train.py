import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from kbench.core.errors import KbenchError
from kbench.models.backbones import build_classifier, get_backbone
from kbench.training.config import TrainConfig
from kbench.training.train import train

from conftest import BACKEND, REPO, run_cli

OTHER_BACKEND = {"jax": "tensorflow", "tensorflow": "jax"}[BACKEND]


@pytest.fixture(scope="module")
def trained_run(small_cnn_run):
    from kbench.training.runs import Run

    run_dir = small_cnn_run(epochs=10)
    return run_dir, Run(run_dir).metrics


def test_small_cnn_learns_the_generated_set(trained_run):
    _, result = trained_run
    # 48 held-out images; chance is 0.5 accuracy and 0.693 log loss
    assert result["val_accuracy"] >= 0.8, result
    assert result["val_log_loss"] < 0.55, result


def test_run_folder_records_everything(trained_run, kaggle_data):
    run_dir, result = trained_run
    assert sorted(os.listdir(run_dir)) == [
        "config.json",
        "curves.png",
        "history.csv",
        "metrics.json",
        "model.keras",
        "split.json",
    ]
    saved = json.load(open(os.path.join(run_dir, "metrics.json")))
    for key in (
        "backbone",
        "backend",
        "devices",
        "image_size",
        "batch_size",
        "epochs",
        "params",
        "epoch_seconds",
        "train_images_per_second",
        "val_log_loss",
        "val_accuracy",
    ):
        assert key in saved, key
    assert saved["backend"] == BACKEND and saved["image_size"] == 32 and len(saved["epoch_seconds"]) == 10
    assert saved["train_images"] == 192 and saved["val_images"] == 48 and saved["classes"] == ["cat", "dog"]
    rows = list(csv.DictReader(open(os.path.join(run_dir, "history.csv"))))
    assert [int(row["epoch"]) for row in rows] == list(range(1, 11))
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "epoch_seconds"} <= set(rows[0])
    split = json.load(open(os.path.join(run_dir, "split.json")))
    assert len(split["train"]) == 192 and not set(split["train"]) & set(split["val"])
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert config["weights"] == "none" and config["data"] == os.path.abspath(kaggle_data["train"])


def test_finished_run_is_not_overwritten(trained_run, kaggle_data):
    run_dir, _ = trained_run
    with pytest.raises(KbenchError, match="already holds a finished run"):
        train(TrainConfig(backbone="small_cnn", data=kaggle_data["train"], run_dir=run_dir, image_size=32), verbose=0)


def test_weights_file_initialises_the_whole_model(trained_run):
    import keras

    run_dir, _ = trained_run
    trained = keras.saving.load_model(os.path.join(run_dir, "model.keras"), safe_mode=True)
    copy = build_classifier(get_backbone("small_cnn"), 2, 32, weights=os.path.join(run_dir, "model.keras"))
    assert len(trained.get_weights()) > 0
    for a, b in zip(trained.get_weights(), copy.get_weights(), strict=True):
        assert np.array_equal(a, b)


def test_model_trained_here_predicts_the_same_under_the_other_backend(trained_run, tmp_path):
    import keras

    run_dir, _ = trained_run
    pixels = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    np.save(tmp_path / "pixels.npy", pixels)
    model = keras.saving.load_model(os.path.join(run_dir, "model.keras"), safe_mode=True)
    here = np.asarray(model.predict_on_batch(pixels))
    script = (
        "import sys, numpy as np, keras; m = keras.saving.load_model(sys.argv[1], safe_mode=True); "
        "np.save(sys.argv[3], np.asarray(m.predict_on_batch(np.load(sys.argv[2])))); print(keras.backend.backend())"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            os.path.join(run_dir, "model.keras"),
            str(tmp_path / "pixels.npy"),
            str(tmp_path / "there.npy"),
        ],
        env={**os.environ, "KERAS_BACKEND": OTHER_BACKEND},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == OTHER_BACKEND
    assert np.allclose(np.load(tmp_path / "there.npy"), here, atol=1e-5)


def test_sigterm_in_a_real_process_resumes_to_the_uninterrupted_history(tiny_data, uninterrupted, tmp_path):
    """SIGTERM from outside, as a scheduler sends it: exit 143 with the --resume line, and the resumed run
    is the uninterrupted one."""
    run_dir = str(tmp_path / "run")
    options = ["--epochs", "3", "--batch-size", "16", "--image-size", "16", "--lr", "3e-3", "--val-split", "0.2"]
    options += ["--schedule", "cosine", "--warmup-epochs", "1", "--head-epochs", "1", "--backend", BACKEND]
    command = [sys.executable, os.path.join(REPO, "cli.py"), "train", "--backbone", "small_cnn"]
    command += ["--data", tiny_data["train"], "--run-dir", run_dir, "--quiet", *options]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    history = os.path.join(run_dir, "history.csv")
    deadline = time.time() + 240
    while not os.path.exists(history) and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)  # in the second epoch: its checkpoint, the recompile for the full phase
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    done_before = json.load(open(os.path.join(run_dir, "checkpoint.json")))["epochs_done"]
    assert done_before == len(list(csv.DictReader(open(history)))) in (1, 2)

    resumed = run_cli("train", "--run-dir", run_dir, "--resume", "--quiet", "--backend", BACKEND)
    assert resumed.returncode == 0, resumed.stderr
    assert not os.path.exists(os.path.join(run_dir, "checkpoint.keras"))
    assert "val log loss" in resumed.stdout
    from kbench.training.runs import Run

    _assert_same_history(Run(run_dir).history, uninterrupted("cosine", 1)[0])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backbone", "small_cnn", "--data", "/nonexistent/train.zip"], "data not found: /nonexistent/train.zip"),
        (["--backbone", "resnet9", "--data", "."], "unknown backbone 'resnet9'"),
        (["--backbone", "small_cnn", "--data", "SINGLE"], "single class"),
        (["--backbone", "small_cnn", "--data", "SINGLE", "--weights", "nothing.h5"], "weights file not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    from kbench.data.synthetic import encode_jpeg, make_image

    (single / "dog.1.jpg").write_bytes(encode_jpeg(make_image(1, 16, np.random.default_rng(0))))
    args = [str(single) if a == "SINGLE" else a for a in args]
    done = run_cli("train", *args, "--run-dir", str(tmp_path / "run"), "--backend", BACKEND)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # one line, nothing else
    assert not (tmp_path / "run").exists()  # nothing built, nothing written


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lr", "nan"], "--lr must be a positive number; got nan"),
        (["--lr", "inf"], "--lr must be a positive number; got inf"),
        (["--lr", "0"], "--lr must be a positive number; got 0"),
        (["--seed", "-1"], "--seed must be a whole number >= 0"),
        (["--workers", "0"], "--workers must be a positive whole number"),
        (["--image-size", "0"], "--image-size must be a positive whole number"),
        (["--image-size", "5000"], "more than 1024 pixels per side"),
        (["--epochs", "0"], "--epochs must be a positive whole number"),
        (["--epochs", "99999999999"], "--epochs 99999999999 is more than the limit of 10,000"),
        (["--val-split", "1"], "--val-split must be in [0, 1)"),
        (["--devices", "two"], "--devices must be 'all' or a positive number"),
        (["--seed", str(2**32)], "--seed must be a whole number >= 0 and < 2**32"),
        (["--devices", "64"], "--devices 64: only"),
    ],
)
def test_impossible_numbers_are_refused_before_any_work(args, message, kaggle_data, tmp_path):
    done = run_cli(
        "train",
        "--backbone",
        "small_cnn",
        "--data",
        kaggle_data["train"],
        "--run-dir",
        str(tmp_path / "run"),
        "--backend",
        BACKEND,
        *args,
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


def test_refusals_name_the_data_as_given_and_a_run_dir_inside_the_data_is_refused(kaggle_data, tmp_path):
    (tmp_path / "empty").mkdir()
    images = tmp_path / "images"
    with zipfile.ZipFile(kaggle_data["train"]) as archive:
        archive.extractall(images)
    train = ["train", "--backbone", "small_cnn", "--backend", BACKEND, "--epochs", "1", "--image-size", "24"]
    done = run_cli(*train, "--data", "empty", "--run-dir", "run", cwd=str(tmp_path))
    assert done.returncode == 2 and "found in empty;" in done.stderr and str(tmp_path) not in done.stderr
    done = run_cli(*train, "--data", "missing", "--run-dir", "run", cwd=str(tmp_path))
    assert done.returncode == 2 and done.stderr.strip() == "kbench: error: data not found: missing"
    for run_dir in ("images", "images/run", "images/train/run"):
        done = run_cli(*train, "--data", "images", "--run-dir", run_dir, cwd=str(tmp_path))
        assert done.returncode == 2 and f"--run-dir {run_dir} is inside --data images" in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(images)) == ["train"] and not (tmp_path / "run").exists()


def test_resume_refuses_options_it_would_ignore(kaggle_data, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = TrainConfig(
        backbone="small_cnn", data=kaggle_data["train"], run_dir=str(run_dir), image_size=24, epochs=3, lr=2e-3
    ).resolved()
    (run_dir / "config.json").write_text(json.dumps(config.record()))
    from kbench.training.config import resume_config

    assert resume_config(str(run_dir), {"epochs": 5, "lr": 2e-3}).epochs == 5  # same value: fine
    with pytest.raises(KbenchError, match="--lr 0.01 differs from the recorded 0.002 and would be ignored"):
        resume_config(str(run_dir), {"lr": 0.01})
    with pytest.raises(KbenchError, match="--batch-size 8 differs"):
        resume_config(str(run_dir), {"batch_size": 8})
    # the backend: the recorded one, unless the user names another with --backend or KERAS_BACKEND
    assert resume_config(str(run_dir)).backend == BACKEND
    with pytest.raises(KbenchError, match=f"--backend {OTHER_BACKEND} differs from the recorded {BACKEND}"):
        resume_config(str(run_dir), {"backend": OTHER_BACKEND})
    monkeypatch.setenv("KERAS_BACKEND", OTHER_BACKEND)
    with pytest.raises(KbenchError, match=f"KERAS_BACKEND={OTHER_BACKEND} differs from the recorded {BACKEND}"):
        resume_config(str(run_dir))
    assert resume_config(str(run_dir), {"backend": BACKEND}).backend == BACKEND  # --backend wins, as always


def test_resume_refuses_other_pixels_under_the_same_names(kaggle_data, tmp_path, caplog):
    """#36.1: --resume checks the images' content, not only their names; a run folder of an earlier
    kbench (names only) resumes with a warning that the content is unchecked."""
    from kbench.data.dataset import find_images, fingerprints
    from kbench.data.synthetic import write_kaggle_dataset
    from kbench.training.runs import Run
    from kbench.training.train import _split

    repainted = write_kaggle_dataset(str(tmp_path / "repainted"), n_train=240, n_test=2, image_size=32, seed=7)
    images = find_images(kaggle_data["train"])
    config = TrainConfig(backbone="small_cnn", data=repainted["train"], run_dir=str(tmp_path / "run"))
    run = Run(str(tmp_path / "run"))
    os.makedirs(run.path)
    split = {**fingerprints(images), "train": images.keys[:200], "val": images.keys[200:]}
    run.write_split(split)
    with pytest.raises(KbenchError, match="no longer holds the images .* pixels"):
        _split(find_images(repainted["train"]), config, run)
    run.write_split({key: value for key, value in split.items() if key != "content_fingerprint"})
    with caplog.at_level(logging.WARNING, logger="kbench"):
        train_idx, val_idx = _split(find_images(repainted["train"]), config, run)
    assert len(train_idx) == 200 and len(val_idx) == 40 and "unchecked" in caplog.text


def test_plain_resume_uses_the_recorded_backend_not_the_machine_default(tiny_data, tmp_path, monkeypatch):
    """The `--resume` line kbench prints, typed as is (neither --backend nor KERAS_BACKEND), continues a
    run recorded under the backend this machine would not pick, selected before keras is imported."""
    from kbench.core.backend import default_backend
    from kbench.core.errors import TrainingInterrupted

    recorded = {"jax": "tensorflow", "tensorflow": "jax"}[default_backend()[0]]
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:  # a checkpoint at the start of epoch 2 (it loads under either backend)
        _interrupt_at(patch, signal.SIGTERM, epoch=1, batch=0)
        with pytest.raises(TrainingInterrupted):
            train(_tiny_config(tiny_data, run_dir, epochs=2), verbose=0)
    config = json.load(open(run_dir / "config.json"))
    (run_dir / "config.json").write_text(json.dumps({**config, "backend": recorded}))
    done = run_cli("train", "--run-dir", str(run_dir), "--resume", "--quiet", env={"KERAS_BACKEND": ""})
    assert done.returncode == 0, done.stderr
    assert json.load(open(run_dir / "metrics.json"))["backend"] == recorded


# Interrupted and resumed, a run is the uninterrupted one: the same validation loss and learning
# rate in every epoch. The stop requests are real signals (this process sends them to itself while
# an epoch's batches are being read), so the run stops mid-epoch, after a few of its batches: once
# in its first epoch (no epoch finished yet), once in its second (with a head warm-up, the first of
# the full phase), each signal in each place once.
RESUME_CASES = [("constant", 0, (signal.SIGINT, signal.SIGTERM)), ("cosine", 1, (signal.SIGTERM, signal.SIGINT))]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """80 images of 16 px: 4 training batches of 16 per epoch."""
    from kbench.data.synthetic import write_kaggle_dataset

    return write_kaggle_dataset(str(tmp_path_factory.mktemp("tiny")), n_train=80, n_test=2, image_size=16, seed=2)


def _tiny_config(data, run_dir, schedule="constant", head_epochs=0, **changes):
    warmup = 1 if schedule == "cosine" else 0
    options = dict(epochs=3, batch_size=16, image_size=16, lr=3e-3, val_split=0.2, seed=0)
    options.update(schedule=schedule, warmup_epochs=warmup, head_epochs=head_epochs, **changes)
    return TrainConfig(backbone="small_cnn", data=data["train"], run_dir=str(run_dir), **options)


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
    """(schedule, head_epochs) -> (history rows, metrics) of the run trained in one go."""
    from kbench.training.runs import Run

    runs = {}

    def get(schedule, head_epochs):
        if (schedule, head_epochs) not in runs:
            run_dir = tmp_path_factory.mktemp(f"whole-{schedule}-{head_epochs}")
            result = train(_tiny_config(tiny_data, run_dir, schedule, head_epochs), verbose=0)
            runs[schedule, head_epochs] = Run(str(run_dir)).history, result
        return runs[schedule, head_epochs]

    return get


def _interrupt_at(monkeypatch, signal_number, epoch, batch):
    """Send this process ``signal_number`` when training first reads ``batch`` of ``epoch`` (0-based;
    TensorFlow reads the first batch twice: once for its shapes)."""
    from kbench.training import train as train_module

    original, sent = train_module.epoch_batches, []

    def epoch_batches(loader, at_epoch, binary, multiple=1):
        if loader.shuffle and at_epoch == epoch:  # the training loader, not the validation one
            read = loader.batch

            def batch_then_signal(at, index):
                if index == batch and not sent:
                    sent.append(index)
                    os.kill(os.getpid(), signal_number)
                return read(at, index)

            monkeypatch.setattr(loader, "batch", batch_then_signal, raising=False)
        return original(loader, at_epoch, binary, multiple)

    monkeypatch.setattr(train_module, "epoch_batches", epoch_batches)


def _assert_same_history(resumed, whole):
    assert [row["epoch"] for row in resumed] == [row["epoch"] for row in whole]
    assert [row["phase"] for row in resumed] == [row["phase"] for row in whole]
    for name in ("val_loss", "lr", "loss"):
        assert [row[name] for row in resumed] == pytest.approx([row[name] for row in whole], rel=0, abs=1e-6), name


@pytest.mark.parametrize("schedule, head_epochs, signals", RESUME_CASES)
def test_interrupted_run_resumes_to_the_uninterrupted_history(
    schedule, head_epochs, signals, tiny_data, uninterrupted, tmp_path, monkeypatch
):
    from kbench.core.errors import TrainingInterrupted
    from kbench.training.config import resume_config
    from kbench.training.runs import Run

    run = Run(str(tmp_path / "cut"))
    for epoch, signal_number in enumerate(signals):
        with monkeypatch.context() as patch:
            _interrupt_at(patch, signal_number, epoch, batch=2)
            config = resume_config(run.path) if epoch else _tiny_config(tiny_data, run.path, schedule, head_epochs)
            with pytest.raises(TrainingInterrupted, match=f"interrupted in epoch {epoch + 1}/3") as stopped:
                train(config, resume=bool(epoch), verbose=0)
        assert stopped.value.signal_number == signal_number
        assert run.read_checkpoint()["epochs_done"] == epoch == len(run.history)  # the epoch's start
    resumed = train(resume_config(run.path), resume=True, verbose=0)
    whole_history, whole = uninterrupted(schedule, head_epochs)
    _assert_same_history(run.history, whole_history)
    assert resumed["val_log_loss"] == pytest.approx(whole["val_log_loss"], rel=0, abs=1e-6)
    switch = {head_epochs + 1} if head_epochs else set()
    assert whole["epochs_with_compilation"] == sorted({1} | switch)
    assert resumed["epochs_with_compilation"] == sorted({1, 2} | switch)  # each process's first epoch


def test_diverging_loss_stops_with_one_line(kaggle_data, tmp_path):
    done = run_cli(
        "train",
        "--backbone",
        "small_cnn",
        "--data",
        kaggle_data["train"],
        "--image-size",
        "24",
        "--epochs",
        "2",
        "--lr",
        "1e30",
        "--run-dir",
        str(tmp_path / "run"),
        "--quiet",
        "--backend",
        BACKEND,
    )
    assert done.returncode == 2, done.stderr
    assert "training diverged" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()  # no empty folder left behind


def test_an_overwrite_that_fails_leaves_the_finished_run_it_would_replace(trained_run, kaggle_data, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(trained_run[0], run_dir)
    before = {name: open(os.path.join(run_dir, name), "rb").read() for name in sorted(os.listdir(run_dir))}
    done = run_cli(
        "train",
        *("--backbone", "small_cnn", "--data", kaggle_data["train"], "--image-size", "24", "--epochs", "1"),
        *("--lr", "1e30", "--run-dir", run_dir, "--quiet", "--overwrite", "--backend", BACKEND),
    )
    assert done.returncode == 2 and "training diverged" in done.stderr, done.stderr
    assert {name: open(os.path.join(run_dir, name), "rb").read() for name in sorted(os.listdir(run_dir))} == before


def test_second_process_on_the_same_run_dir_exits_2_at_once(kaggle_data, tmp_path):
    run_dir = str(tmp_path / "run")
    command = [
        sys.executable,
        os.path.join(REPO, "cli.py"),
        "train",
        "--backbone",
        "small_cnn",
        "--data",
        kaggle_data["train"],
        "--image-size",
        "24",
        "--epochs",
        "40",
        "--run-dir",
        run_dir,
        "--quiet",
        "--backend",
        BACKEND,
    ]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not os.path.exists(os.path.join(run_dir, "config.json")) and time.time() < deadline:
            time.sleep(0.2)
        second = run_cli(
            "train",
            "--backbone",
            "small_cnn",
            "--data",
            kaggle_data["train"],
            "--run-dir",
            run_dir,
            "--backend",
            BACKEND,
        )
        assert second.returncode == 2 and "in use by another kbench process" in second.stderr, second.stderr
    finally:
        first.kill()
        first.wait()


def test_corrupt_checkpoint_is_one_line(kaggle_data, tmp_path, monkeypatch):
    from kbench.core.errors import TrainingInterrupted
    from kbench.training.runs import Run

    def stop(self, model, state):
        raise TrainingInterrupted("stopped", signal.SIGTERM)

    run_dir = tmp_path / "run"
    original = Run.save_checkpoint

    def save_then_stop(self, model, state):
        original(self, model, state)
        stop(self, model, state)

    monkeypatch.setattr(Run, "save_checkpoint", save_then_stop)
    with pytest.raises(TrainingInterrupted):
        train(
            TrainConfig(backbone="small_cnn", data=kaggle_data["train"], run_dir=str(run_dir), image_size=24, epochs=3),
            verbose=0,
        )
    monkeypatch.undo()
    (run_dir / "checkpoint.keras").write_bytes(b"not a zip")
    done = run_cli("train", "--run-dir", str(run_dir), "--resume", "--backend", BACKEND)
    assert done.returncode == 2 and "can't be loaded" in done.stderr and "Traceback" not in done.stderr
    (run_dir / "checkpoint.json").write_text("{broken")
    done = run_cli("train", "--run-dir", str(run_dir), "--resume", "--backend", BACKEND)
    assert done.returncode == 2 and "checkpoint.json is corrupt" in done.stderr and "Traceback" not in done.stderr


def test_resume_may_lengthen_a_run_but_not_shorten_it_below_what_it_trained(tiny_data, tmp_path, monkeypatch):
    from kbench.core.errors import TrainingInterrupted
    from kbench.training.runs import Run

    original = Run.save_checkpoint

    def stop_after_two(self, model, state):
        original(self, model, state)
        if state["epochs_done"] == 2:
            raise TrainingInterrupted("stopped", signal.SIGTERM)

    monkeypatch.setattr(Run, "save_checkpoint", stop_after_two)
    run_dir = str(tmp_path / "run")
    with pytest.raises(TrainingInterrupted):
        train(_tiny_config(tiny_data, run_dir), verbose=0)
    monkeypatch.undo()
    done = run_cli("train", "--run-dir", run_dir, "--resume", "--epochs", "1", "--backend", BACKEND)
    assert done.returncode == 2 and "--epochs 1 is fewer than the 2 epochs" in done.stderr, done.stderr
    from kbench.training.config import resume_config

    result = train(resume_config(run_dir, {"epochs": 4}), resume=True, verbose=0)  # a constant rate: it may
    assert result["epochs"] == result["epochs_trained"] == len(result["epoch_seconds"]) == 4


@pytest.mark.once  # the class count's path through train, export and ONNX Runtime is the backend's same
def test_three_classes_train_export_and_run_in_onnx_runtime_end_to_end(class_folders, tmp_path):
    """More than two classes through the whole path: a softmax over three, the classes recorded in
    order, and the ONNX file giving Keras' probabilities (rows of three that sum to one)."""
    import keras
    import onnxruntime

    run_dir = str(tmp_path / "three")
    done = run_cli("train", "--backbone", "small_cnn", "--data", class_folders, "--epochs", "1",
                   "--image-size", "24", "--weights", "none", "--val-split", "0.25", "--run-dir", run_dir,
                   "--backend", BACKEND)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert metrics["classes"] == ["ant", "bee", "cow"] and metrics["val_images"] == 6
    output = str(tmp_path / "three.onnx")
    done = run_cli("export", "onnx", run_dir, "-o", output, "--backend", BACKEND)
    assert done.returncode == 0, done.stderr[-2000:]
    pixels = np.random.default_rng(0).uniform(0, 255, (4, 24, 24, 3)).astype("float32")
    session = onnxruntime.InferenceSession(output, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: pixels})[0]
    expected = keras.ops.convert_to_numpy(keras.saving.load_model(os.path.join(run_dir, "model.keras"))(pixels))
    assert got.shape == (4, 3) and np.allclose(got.sum(axis=1), 1, atol=1e-5)
    assert np.max(np.abs(got - expected)) <= 1e-4


def test_training_ships_uint8_batches_and_dispatches_its_callbacks_without_a_sync_per_step(
    tiny_data, tmp_path, monkeypatch
):
    """The loader's batches go to the device as uint8 (the model casts them there). Under JAX Keras
    dispatches kbench's batch callbacks to its own threads (every callback async-safe: no host read of
    each step's loss on the training thread); TensorFlow's Keras has no such dispatch."""
    from keras.src.callbacks import callback_list

    from kbench.training import train as train_module

    dispatch, dtypes = [], []
    configure = callback_list.CallbackList._configure_async_dispatch

    def recorded(self, callbacks):
        configure(self, callbacks)
        dispatch.append(self._async_train)

    original = train_module.epoch_batches

    def batches(loader, epoch, binary, multiple=1):
        served = original(loader, epoch, binary, multiple)
        dtypes.append(served[0][0].dtype.name)
        return served

    monkeypatch.setattr(callback_list.CallbackList, "_configure_async_dispatch", recorded)
    monkeypatch.setattr(train_module, "epoch_batches", batches)
    result = train(_tiny_config(tiny_data, tmp_path / "run", epochs=1), verbose=1)
    assert result["val_log_loss"] is not None
    assert set(dtypes) == {"uint8"} and dispatch and set(dispatch) == {BACKEND == "jax"}


@pytest.mark.skipif(BACKEND != "jax", reason="Keras dispatches batch callbacks to its own threads under JAX only")
def test_a_stop_seen_on_keras_callback_threads_leaves_the_training_state_to_the_training_thread(
    tiny_data, tmp_path, monkeypatch
):
    """A stop request seen by the epoch clock on Keras' callback thread sets the model's stop flag
    without copying the training state into the model there (keras' ``Callback.model`` does, under
    JAX): that copy raced with the next step, which had been given the same buffers, and about one
    stopped run in four ended in "Buffer has been deleted or donated" (measured: 4 of 15 before, 0 of
    40 after)."""
    import threading

    from keras.src.backend.jax import trainer as jax_trainer

    from kbench.core.errors import TrainingInterrupted
    from kbench.training import epochs
    from kbench.training import train as train_module

    synced_on, clock_on, sync = [], [], jax_trainer.JAXTrainer.jax_state_sync
    callbacks = epochs.epoch_callbacks

    def recorded(self):
        synced_on.append(threading.current_thread() is threading.main_thread())
        return sync(self)

    def watched_callbacks(*args):
        clock, listed = callbacks(*args)
        batch_end = clock.on_train_batch_end

        def on_train_batch_end(batch, logs=None):
            clock_on.append(threading.current_thread() is threading.main_thread())
            return batch_end(batch, logs)

        clock.on_train_batch_end = on_train_batch_end
        return clock, listed

    monkeypatch.setattr(jax_trainer.JAXTrainer, "jax_state_sync", recorded)
    monkeypatch.setattr(train_module, "epoch_callbacks", watched_callbacks)
    _interrupt_at(monkeypatch, signal.SIGTERM, epoch=0, batch=1)
    with pytest.raises(TrainingInterrupted):
        train(_tiny_config(tiny_data, tmp_path / "run", epochs=1), verbose=0)
    assert False in clock_on  # the clock did run on Keras' threads, and saw the stop there
    assert synced_on and all(synced_on)
