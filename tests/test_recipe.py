"""The fine-tuning recipe does what its options say: head epochs, frozen batch norm, the schedule,
early stopping, and resuming across the switch from the head phase to the full one."""

import csv
import json
import math
import os

import numpy as np
import pytest

from kbench.core.errors import KbenchError, TrainingInterrupted
from kbench.models.backbones import HEAD_LAYER, build_classifier, get_backbone
from kbench.training.config import TrainConfig, resume_config
from kbench.training.recipe import scheduled_lr
from kbench.training.runs import Run
from kbench.training.train import train


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A small_cnn classifier saved as .keras: the "pretrained" weights, with batch-norm statistics
    far from their initial 0 and 1 so that any update shows."""
    import keras

    model = build_classifier(get_backbone("small_cnn"), 2, 24)
    rng = np.random.default_rng(3)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.uniform(-1, 1, layer.moving_mean.shape).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2, layer.moving_variance.shape).astype("float32"))
    path = str(tmp_path_factory.mktemp("pretrained") / "small_cnn.keras")
    model.save(path)
    return path, {layer.name: [np.array(w) for w in layer.get_weights()] for layer in model.layers}


def _config(kaggle_data, run_dir, **changes):
    options = dict(
        backbone="small_cnn",
        data=kaggle_data["train"],
        run_dir=str(run_dir),
        epochs=3,
        batch_size=24,
        image_size=24,
        lr=3e-3,
        val_split=0.2,
        seed=0,
    )
    return TrainConfig(**{**options, **changes})


def _history(run_dir):
    return list(csv.DictReader(open(os.path.join(run_dir, "history.csv"))))


def _layer_weights(model):
    return {layer.name: [np.array(w) for w in layer.get_weights()] for layer in model.layers}


@pytest.fixture(scope="module")
def phased_runs(kaggle_data, pretrained, tmp_path_factory):
    """The same recipe run twice: whole, and interrupted after its head epoch then resumed."""
    weights, _ = pretrained
    root = tmp_path_factory.mktemp("phased")
    recipe = dict(weights=weights, head_epochs=1, schedule="cosine", warmup_epochs=1)
    whole = train(_config(kaggle_data, root / "whole", **recipe), verbose=0)

    save, at_interrupt = Run.save_checkpoint, {}

    def stop_after_first_epoch(self, model, state):
        save(self, model, state)
        if state["epochs_done"] == 1:
            at_interrupt.update(weights=_layer_weights(model), state=json.loads(json.dumps(state)))
            raise TrainingInterrupted("x", 15)

    Run.save_checkpoint = stop_after_first_epoch
    try:
        with pytest.raises(TrainingInterrupted):
            train(_config(kaggle_data, root / "cut", **recipe), verbose=0)
    finally:
        Run.save_checkpoint = save
    resumed = train(resume_config(str(root / "cut")), resume=True, verbose=0)
    return root, whole, resumed, at_interrupt


def test_backbone_weights_do_not_move_during_head_epochs(phased_runs, pretrained):
    _, original = pretrained
    _, _, _, at_interrupt = phased_runs
    assert at_interrupt["state"]["phase"] == "head"
    for name, weights in original.items():
        for before, after in zip(weights, at_interrupt["weights"][name]):
            if name == HEAD_LAYER:
                assert not np.allclose(before, after), "the head should have trained"
            else:
                assert np.array_equal(before, after), name


def test_frozen_batch_norm_keeps_the_pretrained_statistics(phased_runs, pretrained):
    import keras

    _, original = pretrained
    root, whole, _, _ = phased_runs
    model = keras.saving.load_model(os.path.join(root / "whole", "model.keras"), compile=False, safe_mode=True)
    trained = _layer_weights(model)
    batch_norms = [layer.name for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert batch_norms
    for name in batch_norms:  # gamma, beta, moving mean and variance: all as loaded
        for before, after in zip(original[name], trained[name]):
            assert np.array_equal(before, after), name
    assert not np.allclose(original["conv0"][0], trained["conv0"][0])  # while the convolutions fine-tuned
    assert whole["recipe"]["bn_frozen"] is True and whole["recipe"]["head_epochs"] == 1


def test_learning_rate_in_history_follows_the_schedule(phased_runs, kaggle_data):
    root, whole, _, _ = phased_runs
    rows = _history(root / "whole")
    steps = math.ceil(whole["train_images"] / 24)
    config = _config(kaggle_data, root, schedule="cosine", warmup_epochs=1)
    expected = [scheduled_lr(config, epoch * steps, steps) for epoch in (1, 2, 3)]  # each epoch's end
    assert [float(row["lr"]) for row in rows] == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert expected[0] == pytest.approx(3e-3) and expected[-1] == pytest.approx(0, abs=1e-12)
    assert [row["phase"] for row in rows] == ["head", "full", "full"]


def test_run_interrupted_in_the_head_phase_resumes_into_the_full_phase(phased_runs):
    root, whole, resumed, _ = phased_runs
    rows = [_history(root / name) for name in ("whole", "cut")]
    assert [row["phase"] for row in rows[1]] == ["head", "full", "full"]
    assert [row["val_loss"] for row in rows[0]] == [row["val_loss"] for row in rows[1]]
    assert [row["lr"] for row in rows[0]] == [row["lr"] for row in rows[1]]
    assert resumed["val_log_loss"] == whole["val_log_loss"]
    assert whole["epochs_with_compilation"] == [1, 2]  # recompiled at the switch


def test_early_stopping_keeps_the_best_epoch(kaggle_data, tmp_path):
    # a rate too high for a steady descent: the validation loss rises after its best epoch
    config = _config(kaggle_data, tmp_path / "run", epochs=8, lr=0.05, early_stopping=2)
    result = train(config, verbose=0)
    rows = _history(tmp_path / "run")
    losses = [float(row["val_loss"]) for row in rows]
    best = int(np.argmin(losses)) + 1
    assert result["best_epoch"] == best and result["model_epoch"] == best
    assert best < len(rows), "the run should have gone past its best epoch"
    assert len(rows) == min(8, best + 2) == result["epochs_trained"]
    assert result["val_log_loss"] == pytest.approx(min(losses), abs=2e-4)
    saved = json.load(open(tmp_path / "run" / "metrics.json"))
    assert saved["best_epoch"] == best and saved["recipe"]["early_stopping"] == 2
    assert sorted(os.listdir(tmp_path / "run")) == [
        "config.json",
        "curves.png",
        "history.csv",
        "metrics.json",
        "model.keras",
        "split.json",
    ]


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(head_epochs=3), "--head-epochs 3 leaves none of the 3 epochs"),
        (dict(warmup_epochs=3), "--warmup-epochs 3 must be fewer than --epochs 3"),
        (dict(early_stopping=-1), "--early-stopping must be a whole number >= 0"),
        (dict(early_stopping=2, val_split=0.0), "--early-stopping needs a validation split"),
        (dict(weight_decay=-0.1), "--weight-decay must be in [0, 1)"),
        (dict(label_smoothing=0.5), "--label-smoothing must be in [0, 0.5)"),
        (dict(schedule="step"), "--schedule must be one of constant, cosine"),
    ],
)
def test_impossible_recipes_are_refused(changes, message, kaggle_data, tmp_path):
    with pytest.raises(KbenchError, match=message.replace("[", r"\[").replace(")", r"\)")):
        _config(kaggle_data, tmp_path, **changes).check()


def test_resume_cannot_stretch_a_schedule(kaggle_data, tmp_path):
    config = _config(kaggle_data, tmp_path, schedule="cosine").resolved()
    (tmp_path / "config.json").write_text(json.dumps(config.record()))
    with pytest.raises(KbenchError, match="laid out over its 3 epochs"):
        resume_config(str(tmp_path), {"epochs": 5})


def test_a_scheduled_model_loads_without_kbench(phased_runs):
    import subprocess
    import sys

    root, _, _, _ = phased_runs
    script = "import sys, keras; keras.saving.load_model(sys.argv[1], safe_mode=True); print('ok')"
    done = subprocess.run(
        [sys.executable, "-c", script, str(root / "whole" / "model.keras")], capture_output=True, text=True, cwd="/"
    )
    assert done.stdout.strip() == "ok", done.stderr[-1000:]


def test_the_modern_study_carries_the_recipe():
    from kbench.study.config import load_config

    config = load_config("modern", data=__file__)
    member = config.backbones[0]
    assert member.name == "efficientnet_b0"
    assert (member.train.head_epochs, member.train.schedule, member.train.early_stopping) == (1, "cosine", 3)


def test_label_smoothing_records_the_true_log_loss(kaggle_data, tmp_path):
    result = train(
        _config(kaggle_data, tmp_path / "run", epochs=2, label_smoothing=0.1, weight_decay=0.01, early_stopping=1),
        verbose=0,
    )
    rows = _history(tmp_path / "run")
    assert "val_log_loss" in rows[0]  # beside the smoothed val_loss, which early stopping doesn't watch
    best = int(np.argmin([float(row["val_log_loss"]) for row in rows])) + 1
    assert result["best_epoch"] == best
    assert result["recipe"]["optimizer"] == "adamw" and result["recipe"]["label_smoothing"] == 0.1


@pytest.mark.parametrize("schedule, warmup_epochs", [("constant", 1), ("cosine", 0), ("cosine", 2)])
def test_the_keras_schedule_is_the_formula_scheduled_lr_computes(schedule, warmup_epochs, kaggle_data, tmp_path):
    """One formula: the optimizer's schedule (keras ops, float32) and scheduled_lr (numpy) agree at every
    step, from any epoch a phase starts at, and the schedule reloads under its registered name."""
    import keras

    from kbench.training.recipe import schedule_class

    config = _config(kaggle_data, tmp_path, epochs=4, schedule=schedule, warmup_epochs=warmup_epochs)
    steps = 7
    schedule_fn = schedule_class()(config.lr, warmup_epochs * steps, 4 * steps, schedule == "cosine", 2 * steps)
    serialised = keras.saving.serialize_keras_object(schedule_fn)
    assert serialised["registered_name"] == "kbench>WarmupSchedule"  # what existing checkpoints name
    reloaded = keras.saving.deserialize_keras_object(serialised, safe_mode=True)
    for step in range(2 * steps):  # optimizer steps of a phase that began with epoch 3
        expected = scheduled_lr(config, 2 * steps + step, steps)
        for schedule_of in (schedule_fn, reloaded):
            assert float(keras.ops.convert_to_numpy(schedule_of(step))) == pytest.approx(expected, rel=1e-6, abs=1e-8)
