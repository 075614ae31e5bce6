import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import BACKEND, REPO, run_cli
from kbench.backbones import build_classifier, get_backbone
from kbench.errors import KbenchError
from kbench.train import TrainConfig, train

OTHER_BACKEND = {"jax": "tensorflow", "tensorflow": "jax"}[BACKEND]


@pytest.fixture(scope="module")
def trained_run(kaggle_data, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("run") / "small_cnn")
    config = TrainConfig(backbone="small_cnn", data=kaggle_data["train"], run_dir=run_dir, epochs=10,
                         batch_size=24, image_size=32, lr=2e-3, val_split=0.2, seed=0)
    return run_dir, train(config, verbose=0)


def test_small_cnn_learns_the_generated_set(trained_run):
    _, result = trained_run
    # 48 held-out images; chance is 0.5 accuracy and 0.693 log loss
    assert result["val_accuracy"] >= 0.8, result
    assert result["val_log_loss"] < 0.55, result


def test_run_folder_records_everything(trained_run, kaggle_data):
    run_dir, result = trained_run
    assert sorted(os.listdir(run_dir)) == ["config.json", "history.csv", "metrics.json", "model.keras", "split.json"]
    saved = json.load(open(os.path.join(run_dir, "metrics.json")))
    for key in ("backbone", "backend", "devices", "image_size", "batch_size", "epochs", "params", "epoch_seconds",
                "train_images_per_second", "val_log_loss", "val_accuracy"):
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
    for a, b in zip(trained.get_weights(), copy.get_weights()):
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
    done = subprocess.run([sys.executable, "-c", script, os.path.join(run_dir, "model.keras"),
                           str(tmp_path / "pixels.npy"), str(tmp_path / "there.npy")],
                          env={**os.environ, "KERAS_BACKEND": OTHER_BACKEND}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == OTHER_BACKEND
    assert np.allclose(np.load(tmp_path / "there.npy"), here, atol=1e-5)


def test_sigterm_saves_a_checkpoint_and_resume_finishes(kaggle_data, tmp_path):
    run_dir = str(tmp_path / "run")
    command = [sys.executable, os.path.join(REPO, "cli.py"), "train", "--backbone", "small_cnn", "--data",
               kaggle_data["train"], "--image-size", "24", "--epochs", "40", "--batch-size", "16", "--lr", "3e-3",
               "--run-dir", run_dir, "--quiet", "--backend", BACKEND]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not os.path.exists(os.path.join(run_dir, "checkpoint.json")) and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    assert os.path.exists(os.path.join(run_dir, "checkpoint.keras"))
    done_before = json.load(open(os.path.join(run_dir, "checkpoint.json")))["epochs_done"]
    assert 1 <= done_before < 40

    resumed = run_cli("train", "--run-dir", run_dir, "--resume", "--epochs", str(done_before + 2), "--quiet",
                      "--backend", BACKEND)
    assert resumed.returncode == 0, resumed.stderr
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert metrics["epochs"] == done_before + 2 and len(metrics["epoch_seconds"]) == done_before + 2
    assert not os.path.exists(os.path.join(run_dir, "checkpoint.keras"))
    assert "val log loss" in resumed.stdout


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
    from kbench.synthetic import encode_jpeg, make_image

    (single / "dog.1.jpg").write_bytes(encode_jpeg(make_image(1, 16, np.random.default_rng(0))))
    args = [str(single) if a == "SINGLE" else a for a in args]
    done = run_cli("train", *args, "--run-dir", str(tmp_path / "run"), "--backend", BACKEND)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 or done.stderr.count("kbench: error") == 1
    assert not (tmp_path / "run").exists()  # nothing built, nothing written
