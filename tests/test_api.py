"""The public Python API (kbench.__all__), as a notebook user drives it: train, open, ensemble,
export, time, predict and score; and what it refuses, in one line (KbenchError)."""

import csv
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import kbench
from kbench import KbenchError

from conftest import BACKEND, REPO

OTHER_BACKEND = "jax" if BACKEND == "tensorflow" else "tensorflow"

SMALL = dict(epochs=2, batch_size=16, image_size=16, lr=3e-3, val_split=0.25, weights="none", quiet=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from kbench.data.synthetic import write_kaggle_dataset

    return write_kaggle_dataset(str(tmp_path_factory.mktemp("api-data")), n_train=64, n_test=6, image_size=16, seed=4)


@pytest.fixture(scope="module")
def two_runs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("api-runs")
    first = kbench.train("small_cnn", tiny["train"], str(root / "a"), **SMALL)
    second = kbench.train(backbone="small_cnn", data=tiny["train"], run_dir=root / "b", **{**SMALL, "lr": 2e-3})
    return first, second


@pytest.mark.once
def test_import_kbench_loads_no_framework_and_lists_its_api():
    code = (
        "import sys, kbench; heavy = [m for m in ('keras', 'tensorflow', 'jax', 'click') if m in sys.modules]; "
        "print(heavy); print(sorted(n for n in kbench.__all__ if not hasattr(kbench, n)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.stdout.split("\n")[:2] == ["[]", "[]"], done.stderr
    for name in kbench.__all__:
        if callable(getattr(kbench, name)):
            assert getattr(kbench, name).__doc__, f"kbench.{name} has no docstring"


def test_train_open_ensemble_export_time_predict_score(two_runs, tiny, tmp_path):
    first, second = two_runs
    assert isinstance(first, kbench.Run) and first.kind == "backbone"
    assert repr(first).startswith(f"Run({first.path!r}: backbone small_cnn, val_log_loss=")
    assert [row["epoch"] for row in first.history] == [1, 2] and first.config["epochs"] == 2
    assert 0 < first.metrics["val_log_loss"] < 5
    assert kbench.Run(first.path).metrics == first.metrics
    model = first.load_model()
    assert model.output_shape == (None, 1)

    ens = kbench.ensemble(members=[first, second.path], run_dir=str(tmp_path / "ens"), method="mean", quiet=True)
    assert ens.kind == "ensemble" and ens.metrics["members"]
    exported = kbench.export_onnx(ens, str(tmp_path / "ens.onnx"))
    assert os.path.isfile(exported.path) and exported.parity < 1e-4 and not exported.reused
    assert kbench.export_onnx(ens, str(tmp_path / "ens.onnx")).reused  # the same model: reused
    mine = kbench.export_onnx(model, str(tmp_path / "mine.onnx"))  # an in-memory keras.Model
    assert mine.parity < 1e-4

    rows = kbench.latency(
        [first, exported.path, model], runtimes=["keras-compiled", "onnxruntime-cpu"], batch_sizes=[1], runs=2, warmup=0
    )
    timed = {(row["model"], row["runtime"]): row for row in rows}
    assert len(rows) == 6 and timed["ens.onnx", "keras-compiled"]["status"].startswith("unavailable")
    assert [key for key, row in timed.items() if row["status"] != "ok"] == [("ens.onnx", "keras-compiled")]
    assert all(isinstance(row, dict) and row["p50_ms"] > 0 for row in rows if row["status"] == "ok")
    assert {row["batch_size"] for row in rows} == {1} and not rows.interrupted

    submission = str(tmp_path / "submission.csv")
    result = kbench.predict(ens, data=tiny["test"], output=submission, tta="flip")
    assert result["predicted"] == result["images"] == 6 and len(list(csv.reader(open(submission)))) == 7
    scores = kbench.score(submission, answers=tiny["answers"])
    assert set(scores) >= {"log_loss", "accuracy", "rows"} and scores["rows"] == 6


def test_what_a_notebook_user_gets_wrong_is_one_line(two_runs, tiny, tmp_path):
    import keras

    first, _ = two_runs
    with pytest.raises(KbenchError, match=f"already loaded with the {BACKEND} backend"):
        kbench.use_backend(OTHER_BACKEND)
    gone = shutil.copytree(first.path, tmp_path / "gone")
    run = kbench.Run(gone)
    shutil.rmtree(gone)
    with pytest.raises(KbenchError, match="not a finished kbench run"):
        _ = run.metrics
    with pytest.raises(KbenchError, match="did you mean epochs"):
        kbench.train("small_cnn", tiny["train"], str(tmp_path / "typo"), epoch=3)
    assert not os.path.exists(tmp_path / "typo")
    with pytest.raises(KbenchError, match="unknown backbone"):
        kbench.build_model("efficientnet_b9", weights="none")
    image, extra = keras.Input((16, 16, 3)), keras.Input((4,))
    joined = keras.layers.Concatenate()([keras.layers.GlobalAveragePooling2D()(image), extra])
    two_inputs = keras.Model([image, extra], keras.layers.Dense(1)(joined), name="two_inputs")
    with pytest.raises(KbenchError, match="'two_inputs' has 2 inputs; kbench takes models with one image input"):
        kbench.latency(two_inputs, runtimes="keras-compiled", batch_sizes=1)
    # an ensemble of runs trained on two data sets
    from kbench.data.synthetic import write_kaggle_dataset

    other = write_kaggle_dataset(str(tmp_path / "other"), n_train=64, n_test=2, image_size=16, seed=9)
    elsewhere = kbench.train("small_cnn", other["train"], str(tmp_path / "elsewhere"), **{**SMALL, "epochs": 1})
    with pytest.raises(KbenchError, match="trained on different data"):
        kbench.ensemble([first, elsewhere], str(tmp_path / "mixed"))


def test_a_model_of_any_image_size_is_refused_saying_to_fix_one(tmp_path):
    import keras

    image = keras.Input((None, None, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(2, 3)(image))
    any_size = keras.Model(image, keras.layers.Dense(1, activation="sigmoid")(pooled), name="any_size")
    fix = r"'any_size' takes images of any size \(None, None, None, 3\).*keras.Input\(shape=\(224, 224, 3\)\)"
    with pytest.raises(KbenchError, match=fix):
        kbench.export_onnx(any_size, str(tmp_path / "any.onnx"))
    with pytest.raises(KbenchError, match=fix):
        kbench.latency([any_size], runtimes="keras-compiled", batch_sizes=1)
    assert os.listdir(tmp_path) == []


def test_the_same_model_twice_is_timed_once_or_refused(two_runs, tmp_path):
    from conftest import run_cli

    first, _ = two_runs
    model_file = os.path.join(first.path, "model.keras")
    for models, message in [
        ([first.path, first.path + os.sep], f"{first.path}{os.sep} is given twice (as {first.path})"),
        ([model_file, first], f"{first.path} is given twice (as {model_file})"),
        (["small_cnn", "small_cnn"], "small_cnn is given twice;"),
        ([], "models must be a model or a non-empty list"),
        ([3], "expected a run folder, a model file or a kbench.Run; got int"),
    ]:
        with pytest.raises(KbenchError, match=re.escape(message)):
            kbench.latency(models, runtimes="keras-compiled", batch_sizes=1, runs=1, warmup=0)
    done = run_cli("latency", first.path, model_file, "--runtime", "keras-compiled", "--batch-size", "1")
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].endswith("drop the repeat"), done.stderr


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda t, d: kbench.train("small_cnn", 5, t / "r"), "data must be a path (str or os.PathLike); got int"),
        (lambda t, d: kbench.train(3, d, t / "r"), "backbone must be a name"),
        (lambda t, d: kbench.train("small_cnn", d, 7), "run_dir must be a path"),
        (lambda t, d: kbench.train("small_cnn", d, t / "r", epochs="2"), "epochs must be int; got '2' (str)"),
        (lambda t, d: kbench.train("small_cnn", d, t / "r", epochs=2.5), "epochs must be int; got 2.5"),
        (lambda t, d: kbench.train("small_cnn", d, t / "r", augment="no"), "augment must be bool; got 'no'"),
        (lambda t, d: kbench.train("small_cnn", d, t / "r", lr="1e-3"), "lr must be float; got '1e-3'"),
        (lambda t, d: kbench.train("small_cnn", d, t / "r", devices=64), "--devices 64: only"),  # an int is N
        (lambda t, d: kbench.Run(None), "Run's path must be a path"),
        (lambda t, d: kbench.ensemble([t / "a", t / "b"], None), "run_dir must be a path"),
        (lambda t, d: kbench.export_onnx(t / "a", 5), "output must be a path"),
        (lambda t, d: kbench.export_onnx(t / "a", calibration_data=d), "calibration_data (--calibration-data) is for"),
        (lambda t, d: kbench.latency("small_cnn", batch_sizes="1,x"), "expected ints"),
        (lambda t, d: kbench.latency("small_cnn", runs="3"), "--runs must be a positive whole number; got '3'"),
        (lambda t, d: kbench.latency("small_cnn", output=t / "l", output_format="xml"), "output_format must be one of"),
        (lambda t, d: kbench.predict(t / "a", 5), "data must be a path"),
        (lambda t, d: kbench.predict(t / "a", d, t / "s.csv", clip="0.1"), "clip must be float"),
        (lambda t, d: kbench.predict(t / "a", d, t / "s.csv", batch_size=0), "--batch-size must be a positive whole"),
        (lambda t, d: kbench.score(5, d), "submission must be a path"),
        (lambda t, d: kbench.bench(5), "config must be a path"),
        (
            lambda t, d: kbench.build_model("small_cnn", weights="none", image_size="32"),
            "image_size must be a positive",
        ),
        (lambda t, d: kbench.list_backbones(5), "pattern must be a string"),
        (lambda t, d: kbench.demo(t / "demo", images="30"), "--images must be a whole number of at least 20"),
    ],
)
def test_wrong_types_are_refused_in_one_line_before_any_work(call, message, tiny, tmp_path):
    with pytest.raises(KbenchError, match=re.escape(message)):
        call(tmp_path, tiny["train"])
    assert os.listdir(tmp_path) == []


def test_a_keyboard_interrupt_mid_epoch_resumes_exactly(tiny, tmp_path, monkeypatch):
    """Ctrl-C in a notebook cell (SIGINT) stops training at once; resume=True finishes the run with the
    uninterrupted run's history."""
    from kbench.core.errors import TrainingInterrupted
    from kbench.training import train as train_module

    options = {**SMALL, "epochs": 2}
    whole = kbench.train("small_cnn", tiny["train"], str(tmp_path / "whole"), **options)
    original, sent = train_module.epoch_batches, []

    def epoch_batches(loader, at_epoch, binary, multiple=1):
        if loader.shuffle and at_epoch == 1 and not sent:
            read = loader.batch

            def batch_then_interrupt(at, index):
                if index == 1 and not sent:
                    sent.append(index)
                    os.kill(os.getpid(), signal.SIGINT)
                return read(at, index)

            monkeypatch.setattr(loader, "batch", batch_then_interrupt, raising=False)
        return original(loader, at_epoch, binary, multiple)

    monkeypatch.setattr(train_module, "epoch_batches", epoch_batches)
    cut = str(tmp_path / "cut")
    with pytest.raises((TrainingInterrupted, KeyboardInterrupt)):
        kbench.train("small_cnn", tiny["train"], cut, **options)
    resumed = kbench.train(run_dir=cut, resume=True, quiet=True)
    assert [row["epoch"] for row in resumed.history] == [1, 2]
    assert [row["val_loss"] for row in resumed.history] == pytest.approx(
        [row["val_loss"] for row in whole.history], abs=1e-6
    )


@pytest.mark.once
def test_the_cli_goes_through_the_api(monkeypatch, tmp_path):
    """`kbench score` is kbench.score (one code path): the command prints what the function returns."""
    from click.testing import CliRunner

    from kbench.cli.main import cli

    called = {}

    def score(submission, answers):
        called.update(submission=submission, answers=answers)
        return {"log_loss": 0.25, "accuracy": 0.75, "rows": 4}

    monkeypatch.setattr(kbench, "score", score)
    done = CliRunner().invoke(cli, ["score", "s.csv", "--answers", "a.csv"])
    assert done.exit_code == 0 and called == {"submission": "s.csv", "answers": "a.csv"}
    assert "0.25" in done.output


def test_build_model_takes_pixels_and_has_the_study_head():
    model = kbench.build_model("small_cnn", num_classes=3, weights="none", image_size=24)
    assert model.input_shape == (None, 24, 24, 3) and model.output_shape == (None, 3)
    assert model.get_layer("probability") is not None
    probabilities = np.asarray(model.predict(np.full((2, 24, 24, 3), 128, "float32"), verbose=0))
    assert probabilities.sum(axis=1) == pytest.approx([1.0, 1.0], abs=1e-5)
