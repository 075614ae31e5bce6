import json
import os
import re

import numpy as np
import pytest

from kbench.core.errors import KbenchError
from kbench.export.onnx import export_onnx
from kbench.training.config import TrainConfig
from kbench.training.ensemble import EnsembleConfig, train_ensemble
from kbench.training.train import train

from conftest import BACKEND, run_cli


@pytest.fixture(scope="module")
def members(small_cnn_run, tmp_path_factory):
    """Two small_cnn runs at different input sizes (32 and 24 px) on the same data and split, in
    folders of their own names (an ensemble names its members by folder)."""
    import shutil

    root = tmp_path_factory.mktemp("members")
    return [str(shutil.copytree(small_cnn_run(epochs=5, image_size=size), root / f"cnn{size}")) for size in (32, 24)]


def test_stacked_ensemble_trains_on_cached_features_and_reloads(members, tmp_path):
    import keras

    run_dir = str(tmp_path / "stack")
    result = train_ensemble(EnsembleConfig(members, run_dir, epochs=15, tta_passes=1), verbose=0)
    assert sorted(os.listdir(os.path.join(run_dir, "features"))) == [
        "cnn24-train-0.npz",
        "cnn24-train-1.npz",
        "cnn32-train-0.npz",
        "cnn32-train-1.npz",
    ]
    assert result["val_accuracy"] >= 0.75 and result["image_size"] == 32
    assert [m["backbone"] for m in result["members"]] == ["small_cnn", "small_cnn"]
    assert result["feature_seconds"] > 0 and result["head_seconds"] > 0
    saved = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert saved["val_log_loss"] == pytest.approx(result["val_log_loss"])

    model = keras.saving.load_model(os.path.join(run_dir, "model.keras"), safe_mode=True)
    assert len(model.inputs) == 1 and model.input_shape == (None, 32, 32, 3)
    assert [w.path.split("/")[0] for w in model.trainable_weights] == ["head_dense_32"] * 2 + ["head_dense_8"] * 2 + [
        "probability"
    ] * 2
    pixels = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    first = keras.saving.load_model(os.path.join(members[0], "model.keras"))
    assert not np.allclose(model.predict_on_batch(pixels), first.predict_on_batch(pixels))  # not just a member

    exported = export_onnx(run_dir, str(tmp_path / "stack.onnx"))
    assert exported["max_relative_difference"] <= 1e-4


def test_mean_ensemble_averages_member_probabilities(members, tmp_path):
    import keras

    run_dir = str(tmp_path / "mean")
    result = train_ensemble(EnsembleConfig(members, run_dir, method="mean"), verbose=0)
    assert result["head_seconds"] == 0 and not os.path.exists(os.path.join(run_dir, "features"))
    model = keras.saving.load_model(os.path.join(run_dir, "model.keras"), safe_mode=True)
    pixels = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    big = keras.saving.load_model(os.path.join(members[0], "model.keras"))
    small = keras.saving.load_model(os.path.join(members[1], "model.keras"))
    resized = np.asarray(keras.layers.Resizing(24, 24)(pixels))
    expected = (np.asarray(big.predict_on_batch(pixels)) + np.asarray(small.predict_on_batch(resized))) / 2
    assert np.allclose(model.predict_on_batch(pixels), expected, atol=1e-5)
    assert export_onnx(run_dir, str(tmp_path / "mean.onnx"))["max_relative_difference"] <= 1e-4


def test_mismatched_members_are_refused(members, kaggle_data, tmp_path):
    other = str(tmp_path / "other_split")
    train(
        TrainConfig(
            backbone="small_cnn",
            data=kaggle_data["train"],
            run_dir=other,
            epochs=1,
            image_size=24,
            val_split=0.2,
            seed=5,
        ),
        verbose=0,
    )
    with pytest.raises(KbenchError, match="different split"):
        train_ensemble(EnsembleConfig([members[0], other], str(tmp_path / "e")), verbose=0)
    # #36.1: the members' images replaced by others under the same names: refused, nothing written
    from kbench.data.synthetic import write_kaggle_dataset

    repainted = write_kaggle_dataset(str(tmp_path / "repainted"), n_train=240, n_test=2, image_size=32, seed=7)
    with pytest.raises(KbenchError, match="changed since the members were trained"):
        train_ensemble(EnsembleConfig(members, str(tmp_path / "e3"), data=repainted["train"]), verbose=0)
    assert not os.path.exists(tmp_path / "e3" / "config.json")
    done = run_cli(
        "ensemble",
        "--members",
        f"{members[0]},{tmp_path}/nothing",
        "--run-dir",
        str(tmp_path / "e2"),
        "--backend",
        BACKEND,
    )
    assert done.returncode == 2 and "not a finished kbench run" in done.stderr


def test_an_ensemble_is_no_member_and_a_refusal_leaves_no_folder(members, tmp_path):
    first = str(tmp_path / "first")
    train_ensemble(EnsembleConfig(members, first, method="mean"), verbose=0)
    done = run_cli(
        "ensemble", "--members", f"{members[0]},{first}", "--run-dir", str(tmp_path / "nested"), "--backend", BACKEND
    )
    assert done.returncode == 2 and "is an ensemble; members must be training runs" in done.stderr
    assert not (tmp_path / "nested").exists()
    # the ensemble's folder inside a member's, or a member's inside the ensemble's: refused, nothing written
    inside = os.path.join(members[0], "ensemble")
    refusal = f"{inside} is inside {members[0]}; give the ensemble and each member folders of their own"
    with pytest.raises(KbenchError, match=re.escape(refusal)):
        train_ensemble(EnsembleConfig(members, inside, method="mean"), verbose=0)
    outer = os.path.dirname(members[1])
    with pytest.raises(KbenchError, match=re.escape(f"{members[0]} is inside {outer}; give")):
        train_ensemble(EnsembleConfig(members, outer, method="mean"), verbose=0)
    assert not os.path.exists(inside) and not os.path.exists(os.path.join(outer, "config.json"))
