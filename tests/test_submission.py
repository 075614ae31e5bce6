import csv
import math
import os

import numpy as np
import pytest

from conftest import BACKEND, run_cli
from kbench.errors import KbenchError
from kbench.submission import apply_temperature, fit_temperature, predict_test_set, score_submission
from kbench.synthetic import encode_jpeg, make_image
from kbench.train import TrainConfig, train


@pytest.fixture(scope="module")
def run(kaggle_data, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("sub") / "run")
    train(TrainConfig(backbone="small_cnn", data=kaggle_data["train"], run_dir=run_dir, epochs=6, image_size=32,
                      lr=2e-3, batch_size=24, val_split=0.2), verbose=0)
    return run_dir


@pytest.fixture()
def test_folder(tmp_path):
    """ids 1..12 as files, out of order on disk, plus one unreadable file (id 13)."""
    folder = tmp_path / "test"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for image_id in (10, 2, 9, 1, 11, 3, 4, 5, 6, 7, 8, 12):
        (folder / f"{image_id}.jpg").write_bytes(encode_jpeg(make_image(image_id % 2, 40, rng)))
    (folder / "13.jpg").write_bytes(b"broken")
    return str(folder)


def read(path):
    return list(csv.DictReader(open(path)))


def test_submission_has_every_id_sorted_numerically(run, test_folder, tmp_path):
    result = predict_test_set(run, test_folder, str(tmp_path / "sub.csv"))
    rows = read(tmp_path / "sub.csv")
    assert list(rows[0]) == ["id", "label"]
    assert [row["id"] for row in rows] == [str(i) for i in range(1, 14)]  # 10 after 9
    assert all(0 <= float(row["label"]) <= 1 for row in rows)
    assert rows[-1]["label"] == "0.500000" and result["skipped"] == 1 and result["predicted"] == 12


def test_flip_tta_and_clipping(run, test_folder, tmp_path):
    import keras

    predict_test_set(run, test_folder, str(tmp_path / "plain.csv"))
    predict_test_set(run, test_folder, str(tmp_path / "tta.csv"), tta="flip", clip=0.2)
    plain = np.array([float(r["label"]) for r in read(tmp_path / "plain.csv")])
    tta = np.array([float(r["label"]) for r in read(tmp_path / "tta.csv")])
    assert tta.min() >= 0.2 and tta.max() <= 0.8
    model = keras.saving.load_model(os.path.join(run, "model.keras"))

    from kbench.data import decode_image, resize

    image = resize(decode_image(open(os.path.join(test_folder, "1.jpg"), "rb").read()), 32).astype("float32")
    both = np.asarray(model.predict_on_batch(np.stack([image, image[:, ::-1]])))[:, 0]
    assert tta[0] == pytest.approx(np.clip(both.mean(), 0.2, 0.8), abs=2e-6)
    assert plain[0] == pytest.approx(both[0], abs=2e-6)


def test_onnx_and_keras_submissions_agree(run, test_folder, tmp_path):
    done = run_cli("export", "onnx", run, "-o", str(tmp_path / "model.onnx"), "--backend", BACKEND)
    assert done.returncode == 0, done.stderr
    predict_test_set(run, test_folder, str(tmp_path / "keras.csv"))
    predict_test_set(str(tmp_path / "model.onnx"), test_folder, str(tmp_path / "onnx.csv"))
    keras_rows, onnx_rows = read(tmp_path / "keras.csv"), read(tmp_path / "onnx.csv")
    assert [r["id"] for r in keras_rows] == [r["id"] for r in onnx_rows]
    assert np.allclose([float(r["label"]) for r in keras_rows], [float(r["label"]) for r in onnx_rows], atol=2e-5)


def test_temperature_fit_improves_overconfident_predictions():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    honest = np.where(labels == 1, 0.7, 0.3)
    flipped = rng.random(400) < 0.3
    honest = np.where(flipped, 1 - honest, honest)  # 70% right at 0.7 confidence: calibrated
    overconfident = apply_temperature(honest[:, None], 0.25)
    temperature = fit_temperature(overconfident, labels)
    # the optimum makes the stated confidence equal the sample's accuracy
    accuracy = 1 - flipped.mean()
    logit = lambda p: math.log(p / (1 - p))
    assert temperature == pytest.approx(4 * logit(0.7) / logit(accuracy), rel=1e-3)
    assert temperature > 2


def write_csv(path, header, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def test_scorer_matches_hand_computed_log_loss(tmp_path):
    answers = write_csv(tmp_path / "answers.csv", ["id", "label"], [(1, 1), (2, 0), (10, 1)])
    submission = write_csv(tmp_path / "s.csv", ["id", "label"], [(10, 0.6), (1, 0.9), (2, 0.2)])
    result = score_submission(submission, answers)
    assert result["log_loss"] == pytest.approx(-(math.log(0.9) + math.log(0.8) + math.log(0.6)) / 3)
    assert result["accuracy"] == 1.0


@pytest.mark.parametrize("header, rows, message", [
    (["id", "prob"], [(1, 0.5), (2, 0.5), (10, 0.5)], "no 'label' column"),
    (["id", "label"], [(1, 0.5), (2, 0.5)], "has 2 rows; the answers have 3"),
    (["id", "label"], [(1, 0.5), (1, 0.5), (10, 0.5)], "repeats ids: 1"),
    (["id", "label"], [(1, 0.5), (3, 0.5), (10, 0.5)], "lacks ids present in the answers: 2"),
    (["id", "label"], [(1, "nan"), (2, 0.5), (10, 0.5)], "id 1: label is NaN"),
    (["id", "label"], [(1, 1.5), (2, 0.5), (10, 0.5)], "outside [0, 1]"),
])
def test_scorer_rejects_invalid_submissions(tmp_path, header, rows, message):
    answers = write_csv(tmp_path / "answers.csv", ["id", "label"], [(1, 1), (2, 0), (10, 1)])
    submission = write_csv(tmp_path / "s.csv", header, rows)
    with pytest.raises(KbenchError, match=message.replace("[", r"\[").replace("]", r"\]")):
        score_submission(submission, answers)
    done = run_cli("score", submission, "--answers", answers)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_predict_command_calibrates_on_the_validation_split(run, test_folder, tmp_path):
    done = run_cli("predict", run, "--data", test_folder, "-o", str(tmp_path / "s.csv"), "--calibrate",
                   "--backend", BACKEND)
    assert done.returncode == 0, done.stderr
    assert "calibration: temperature" in done.stdout and "validation log loss" in done.stdout
    assert "12 of 13 images predicted, 1 unreadable" in done.stdout
    assert len(read(tmp_path / "s.csv")) == 13
