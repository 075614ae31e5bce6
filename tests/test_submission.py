import csv
import math
import os
import zipfile

import numpy as np
import pytest

from kbench.core.errors import KbenchError
from kbench.data.synthetic import encode_jpeg, make_image
from kbench.serving.submission import apply_temperature, fit_temperature, predict_test_set, score_submission

from conftest import BACKEND, run_cli


@pytest.fixture(scope="module")
def run(small_cnn_run):
    return small_cnn_run(epochs=6)


@pytest.fixture()
def test_folder(tmp_path):
    """ids 1..12 as files, out of order on disk, plus an unreadable file (id 13) and an empty one (14)."""
    folder = tmp_path / "test"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for image_id in (10, 2, 9, 1, 11, 3, 4, 5, 6, 7, 8, 12):
        (folder / f"{image_id}.jpg").write_bytes(encode_jpeg(make_image(image_id % 2, 40, rng)))
    (folder / "13.jpg").write_bytes(b"broken")
    (folder / "14.jpg").write_bytes(b"")
    return str(folder)


def read(path):
    return list(csv.DictReader(open(path)))


def test_submission_has_every_id_sorted_numerically(run, test_folder, tmp_path):
    result = predict_test_set(run, test_folder, str(tmp_path / "sub.csv"))
    rows = read(tmp_path / "sub.csv")
    assert list(rows[0]) == ["id", "label"]
    assert [row["id"] for row in rows] == [str(i) for i in range(1, 15)]  # 10 after 9
    assert all(0 <= float(row["label"]) <= 1 for row in rows)
    assert [row["label"] for row in rows[-2:]] == ["0.500000", "0.500000"]  # unreadable, empty: uniform
    assert result["skipped"] == 2 and result["predicted"] == 12 and result["images"] == 14


def test_flip_tta_and_clipping(run, test_folder, tmp_path):
    import keras

    predict_test_set(run, test_folder, str(tmp_path / "plain.csv"))
    predict_test_set(run, test_folder, str(tmp_path / "tta.csv"), tta="flip", clip=0.2)
    plain = np.array([float(r["label"]) for r in read(tmp_path / "plain.csv")])
    tta = np.array([float(r["label"]) for r in read(tmp_path / "tta.csv")])
    assert tta.min() >= 0.2 and tta.max() <= 0.8
    model = keras.saving.load_model(os.path.join(run, "model.keras"))

    from kbench.data.loader import decode_image, resize

    image = resize(decode_image(open(os.path.join(test_folder, "1.jpg"), "rb").read()), 32).astype("float32")
    both = np.asarray(model.predict_on_batch(np.stack([image, image[:, ::-1]])))[:, 0]
    assert tta[0] == pytest.approx(np.clip(both.mean(), 0.2, 0.8), abs=2e-6)
    assert plain[0] == pytest.approx(both[0], abs=2e-6)


@pytest.mark.once  # what it checks is the ONNX side; the JAX export route is test_export.py's
def test_onnx_and_keras_submissions_agree(run, test_folder, tmp_path):
    done = run_cli("export", "onnx", run, "-o", str(tmp_path / "model.onnx"), "--backend", BACKEND)
    assert done.returncode == 0, done.stderr
    predict_test_set(run, test_folder, str(tmp_path / "keras.csv"))
    predict_test_set(str(tmp_path / "model.onnx"), test_folder, str(tmp_path / "onnx.csv"))
    keras_rows, onnx_rows = read(tmp_path / "keras.csv"), read(tmp_path / "onnx.csv")
    assert [r["id"] for r in keras_rows] == [r["id"] for r in onnx_rows]
    assert np.allclose([float(r["label"]) for r in keras_rows], [float(r["label"]) for r in onnx_rows], atol=2e-5)


@pytest.mark.parametrize("runtime", ["openvino", "openvino-bf16"])
@pytest.mark.once  # what it checks is the ONNX side; the JAX export route is test_export.py's
def test_openvino_submissions_agree_with_keras_within_the_runtime_tolerance(
    run, runtime, test_folder, tmp_path, monkeypatch
):
    from kbench.core import machine
    from kbench.serving.openvino import TOLERANCES

    monkeypatch.chdir(tmp_path)  # the checked export goes to exports/run.onnx here
    if runtime == "openvino-bf16" and not machine.has_native_bf16():
        with pytest.raises(KbenchError, match="no native bf16"):
            predict_test_set(run, test_folder, str(tmp_path / "ov.csv"), runtime=runtime)
        return
    predict_test_set(run, test_folder, str(tmp_path / "keras.csv"))
    result = predict_test_set(run, test_folder, str(tmp_path / "ov.csv"), runtime=runtime)
    keras_rows, ov_rows = read(tmp_path / "keras.csv"), read(tmp_path / "ov.csv")
    assert result["predicted"] == 12 and [r["id"] for r in keras_rows] == [r["id"] for r in ov_rows]
    tolerance = TOLERANCES["bf16" if runtime.endswith("bf16") else "f32"]
    keras_labels = np.array([float(r["label"]) for r in keras_rows])
    assert np.abs(keras_labels - np.array([float(r["label"]) for r in ov_rows])).max() <= tolerance


def test_an_unknown_predict_runtime_is_refused(run, test_folder, tmp_path):
    with pytest.raises(KbenchError, match="unknown --runtime 'tensorrt'; choose from keras, onnxruntime, openvino"):
        predict_test_set(run, test_folder, str(tmp_path / "x.csv"), runtime="tensorrt")


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


@pytest.mark.parametrize(
    "header, rows, message",
    [
        (["id", "prob"], [(1, 0.5), (2, 0.5), (10, 0.5)], "no 'label' column"),
        (["id", "label"], [(1, 0.5), (2, 0.5)], "has 2 rows; the answers have 3"),
        (["id", "label"], [(1, 0.5), (1, 0.5), (10, 0.5)], "repeats ids: 1"),
        (["id", "label"], [(1, 0.5), (3, 0.5), (10, 0.5)], "lacks ids present in the answers: 2"),
        (["id", "label"], [(1, "nan"), (2, 0.5), (10, 0.5)], "id 1: label is NaN"),
        (["id", "label"], [(1, 1.5), (2, 0.5), (10, 0.5)], "outside [0, 1]"),
        (["id", "label"], [(1, "inf"), (2, 0.5), (10, 0.5)], "id 1: label inf is outside [0, 1]"),
        (["id", "label"], [(1, "-inf"), (2, 0.5), (10, 0.5)], "id 1: label -inf is outside [0, 1]"),
        (["id", "label"], [(1, 0.5), ("01", 0.5), (10, 0.5)], "repeats ids: 1 = 01"),
        (["id", "label"], [(1, "dog"), (2, 0.5), (10, 0.5)], "id 1: label 'dog' is not a number"),
        (["id", "label"], [(1, ""), (2, 0.5), (10, 0.5)], "id 1: label '' is not a number"),
    ],
)
def test_scorer_rejects_invalid_submissions(tmp_path, header, rows, message):
    answers = write_csv(tmp_path / "answers.csv", ["id", "label"], [(1, 1), (2, 0), (10, 1)])
    submission = write_csv(tmp_path / "s.csv", header, rows)
    with pytest.raises(KbenchError, match=message.replace("[", r"\[").replace("]", r"\]")):
        score_submission(submission, answers)
    done = run_cli("score", submission, "--answers", answers)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_predict_command_calibrates_on_the_validation_split(run, test_folder, tmp_path):
    done = run_cli(
        "predict", run, "--data", test_folder, "-o", str(tmp_path / "s.csv"), "--calibrate", "--backend", BACKEND
    )
    assert done.returncode == 0, done.stderr
    assert "calibration: temperature" in done.stdout and "validation log loss" in done.stdout
    assert "12 of 14 images predicted, 2 unreadable" in done.stdout
    assert len(read(tmp_path / "s.csv")) == 14


def write_text(path, text, encoding="utf-8"):
    with open(path, "w", newline="", encoding=encoding) as handle:
        handle.write(text)
    return str(path)


def test_scorer_accepts_what_the_grader_accepts(tmp_path):
    # a BOM on both files, ids written 01, whitespace around names and values, CRLF line ends
    answers = write_text(tmp_path / "answers.csv", "id, label\r\n01,1\r\n2 , 0\r\n10,1.0\r\n", "utf-8-sig")
    submission = write_text(tmp_path / "s.csv", "\ufeffid,label\n 10 , 0.6\n1,0.9\n002,0.2\n\n")
    result = score_submission(submission, answers)
    assert result["rows"] == 3
    assert result["log_loss"] == pytest.approx(-(math.log(0.9) + math.log(0.8) + math.log(0.6)) / 3)
    done = run_cli("score", submission, "--answers", answers)
    assert done.returncode == 0 and "accuracy 1.0000 (3 rows)" in done.stdout, done.stderr


def test_scorer_reads_ids_written_as_floats_as_pandas_does(tmp_path):
    # pandas writes an id column that held a NaN as 1.0, 2.0; a grader merging on id matches them to 1, 2
    answers = write_text(tmp_path / "answers.csv", "id,label\n1,1\n2,0\n")
    submission = write_text(tmp_path / "s.csv", "id,label\n1.0,0.9\n2.00,0.2\n")
    assert score_submission(submission, answers)["log_loss"] == pytest.approx(-(math.log(0.9) + math.log(0.8)) / 2)
    half = write_text(tmp_path / "half.csv", "id,label\n1.5,0.9\n2,0.2\n")
    with pytest.raises(KbenchError, match="submission lacks ids present in the answers: 1$"):
        score_submission(half, answers)


@pytest.mark.parametrize(
    "text, message",
    [
        ("id,label\n1,1\n2,0.7\n", r"answers .*: id 2: label '0.7' is not 0 or 1"),
        ("id,label\n1,1\n2,dog\n", r"answers .*: id 2: label 'dog' is not 0 or 1"),
        ("id,label\n1,1\n2,nan\n", r"answers .*: id 2: label 'nan' is not 0 or 1"),
        ("id,label\n1,1\n2,\n", r"answers .*: id 2: label '' is not 0 or 1"),
        ("id,label\n", r"answers .* has no rows"),
        ("", r"answers .* has no 'id' column \(columns: none\)"),
        ("id,prob\n1,1\n2,0\n", r"answers .* has no 'label' column \(columns: id, prob\)"),
        ("image,label\n1,1\n2,0\n", r"answers .* has no 'id' column \(columns: image, label\)"),
        ("id,label\n1,1\n01,0\n", r"answers .* repeats id 01"),
        ("id,label\n1,1\n,0\n", r"answers .*: a row has an empty id"),
        (b"id,label\n1,1\n2,0 \xe9t\xe9\n", r"answers .* is not UTF-8 text \(line 3\)"),
    ],
)
def test_scorer_refuses_malformed_answers(tmp_path, text, message):
    answers = tmp_path / "answers.csv"
    answers.write_bytes(text if isinstance(text, bytes) else text.encode())
    submission = write_csv(tmp_path / "s.csv", ["id", "label"], [(1, 0.6), (2, 0.4)])
    with pytest.raises(KbenchError, match=message):
        score_submission(submission, str(answers))


def test_scorer_refuses_a_submission_that_is_not_utf8_through_the_cli(tmp_path):
    answers = write_csv(tmp_path / "answers.csv", ["id", "label"], [(1, 1), (2, 0)])
    submission = tmp_path / "s.csv"
    submission.write_bytes("id,label\n1,0.6\n2,0.4 ½\n".encode("utf-16"))
    with pytest.raises(KbenchError, match=r"submission .* is not UTF-8 text \(line 1\)"):
        score_submission(str(submission), answers)
    done = run_cli("score", str(submission), "--answers", answers)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("kbench: error: submission ")
    bad_answers = write_text(tmp_path / "bad.csv", "id,label\n1,1\n2,0.7\n")
    done = run_cli(
        "score", write_csv(tmp_path / "ok.csv", ["id", "label"], [(1, 0.6), (2, 0.4)]), "--answers", bad_answers
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and lines == [f"kbench: error: answers {bad_answers}: id 2: label '0.7' is not 0 or 1"]


@pytest.mark.parametrize(
    "names, message",
    [
        (["1.jpg", "1.png", "2.jpg"], r"1.jpg and 1.png have the same id '1'"),
        (["007.jpg", "7.jpg", "8.jpg"], r"007.jpg and 7.jpg have the same id '7'"),
        (["test/7.jpg", "test/07.jpg"], r"test/07.jpg and test/7.jpg have the same id '7'"),
        (["a/2.jpg", "b/2.jpg", "b/3.jpg"], r"a/2.jpg and b/2.jpg have the same id '2'"),
        (
            ["cats/1.jpg", "cats/2.jpg", "dogs/3.jpg"],
            r"test images in 2 folders \(cats/, dogs/\); a test set is one folder",
        ),
        (["1.jpg", "extra/2.jpg"], r"test images in 2 folders \(\./, extra/\)"),
    ],
)
def test_clashing_ids_are_refused_before_the_model_is_loaded(tmp_path, names, message):
    data = tmp_path / "data"
    for name in names:
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_bytes(encode_jpeg(make_image(0, 16, np.random.default_rng(0))))
    output = tmp_path / "submission.csv"
    # the model doesn't exist: only a check made before loading it can give this message
    with pytest.raises(KbenchError, match=message):
        predict_test_set(str(tmp_path / "missing.keras"), str(data), str(output))
    assert not output.exists()


def test_predict_command_refuses_duplicate_ids_in_one_line(tmp_path):
    data = tmp_path / "test.zip"
    with zipfile.ZipFile(data, "w") as archive:
        for name in ("test/1.jpg", "test/2.jpg", "test/2.jpeg"):
            archive.writestr(name, encode_jpeg(make_image(0, 16, np.random.default_rng(0))))
    output = tmp_path / "submission.csv"
    done = run_cli("predict", str(tmp_path / "missing.keras"), "--data", str(data), "-o", str(output))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    # the last line (the CLI may print its progress label first): one line that names the clash
    assert done.stderr.strip().splitlines()[-1] == (
        f"kbench: error: {data}: test/2.jpeg and test/2.jpg have the same id '2'; a submission needs one row per id"
    )
    assert not output.exists() and sorted(os.listdir(tmp_path)) == ["test.zip"]


def test_a_zero_byte_test_image_gets_a_row_and_the_submission_scores(kaggle_data, tmp_path):
    """Kaggle's layout with one empty test image: every id is written, and `score` accepts the file."""
    from kbench.models.backbones import build_classifier, get_backbone

    model = build_classifier(get_backbone("small_cnn"), 2, 32, "none")
    model.save(str(tmp_path / "model.keras"))
    data = tmp_path / "test.zip"
    with zipfile.ZipFile(kaggle_data["test"]) as source, zipfile.ZipFile(data, "w") as archive:
        for name in source.namelist():
            archive.writestr(name, b"" if name == "test/7.jpg" else source.read(name))
    result = predict_test_set(str(tmp_path / "model.keras"), str(data), str(tmp_path / "s.csv"))
    rows = read(tmp_path / "s.csv")
    assert [row["id"] for row in rows] == [str(i) for i in range(1, 31)]
    assert rows[6]["label"] == "0.500000" and result["skipped"] == 1 and result["predicted"] == 29
    assert score_submission(str(tmp_path / "s.csv"), kaggle_data["answers"])["rows"] == 30


def test_predict_refuses_a_model_of_any_image_size_in_one_line(kaggle_data, tmp_path):
    import keras

    image = keras.Input((None, None, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(2, 3)(image))
    keras.Model(image, keras.layers.Dense(1, activation="sigmoid")(pooled), name="any_size").save(
        str(tmp_path / "any.keras")
    )
    output = tmp_path / "submission.csv"
    done = run_cli("predict", str(tmp_path / "any.keras"), "--data", kaggle_data["test"], "-o", str(output))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("kbench: error: model 'any_size' takes images of any size (None, None, None, 3)")
    assert not output.exists()
