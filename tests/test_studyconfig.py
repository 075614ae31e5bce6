import os

import pytest

from kbench.core.errors import KbenchError
from kbench.study.config import STUDIES_DIR, load_config, packaged_config

from conftest import BACKEND, MINIMAL_STUDY, run_cli, write_study

pytestmark = pytest.mark.once  # backend-independent: `make test` runs it under TensorFlow only


@pytest.mark.parametrize(
    "edit, message",
    [
        (("epochs = 1", "epoch = 1"), "[train]: unknown key 'epoch'; did you mean 'epochs'?"),
        (("epochs = 1", "batch_sise = 8"), "unknown key 'batch_sise'; did you mean 'batch_size'?"),
        (("[train]", "[trian]"), "unknown key 'trian'; did you mean 'train'?"),
        (("epochs = 1", 'epochs = "ten"'), "[train]: epochs = 'ten' is not a valid int"),
        (("epochs = 1", "lr = -1.0"), "--lr must be a positive number"),
        (('backbone = "small_cnn"', 'backbone = "resnet9"'), "unknown backbone 'resnet9'"),
        (('data = "{data}"', 'data = "missing.zip"'), "training data not found"),
        (("[[backbones]]", "[latency]\nrunz = 3\n[[backbones]]"), "[latency]: unknown key 'runz'"),
        (
            ("[[backbones]]", '[[ensembles]]\nname = "e"\nmembers = ["small_cnn", "x"]\n[[backbones]]'),
            "names unknown members x",
        ),
    ],
)
def test_study_config_is_strict_and_checked_at_load(edit, message, kaggle_data, tmp_path):
    path = write_study(tmp_path, MINIMAL_STUDY.replace(*edit), data=kaggle_data["train"])
    with pytest.raises(KbenchError) as error:
        load_config(path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_bad_config_is_one_line_and_exit_2_before_anything_is_written(kaggle_data, tmp_path):
    path = write_study(tmp_path, MINIMAL_STUDY.replace("epochs = 1", "epoch = 1"), data=kaggle_data["train"])
    done = run_cli("bench", "--config", path, "--out", str(tmp_path / "out"), "--backend", BACKEND)
    assert done.returncode == 2, done.stderr
    assert "unknown key 'epoch'; did you mean 'epochs'?" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
    done = run_cli("bench", "--config", str(tmp_path / "nope.toml"), "--backend", BACKEND)
    assert done.returncode == 2 and "config not found" in done.stderr


def test_missing_test_data_is_found_at_load(kaggle_data, tmp_path):
    path = write_study(tmp_path, MINIMAL_STUDY, data=kaggle_data["train"])
    with pytest.raises(KbenchError, match=r"test data not found: .* \(pass --test-data PATH, or --test-data '' to"):
        load_config(path, test_data=str(tmp_path / "test.zip"))


def test_impossible_devices_are_found_before_training(kaggle_data, tmp_path):
    path = write_study(tmp_path, MINIMAL_STUDY, data=kaggle_data["train"])
    out = str(tmp_path / "out")
    done = run_cli("bench", "--config", path, "--devices", "64", "--out", out, "--backend", BACKEND)
    assert done.returncode == 2 and "--devices 64: only" in done.stderr
    assert not os.path.exists(os.path.join(out, "runs"))


def test_the_shipped_seed_study_needs_data_and_loads_by_name():
    with pytest.raises(KbenchError, match="no training data"):
        load_config("seed")
    config = load_config("seed", data=__file__)
    assert [m.name for m in config.backbones][:3] == ["mobilenet_v2", "inception_v3", "xception"]
    assert config.test_data == "" and config.backbones[0].train.lr == 1e-4


@pytest.mark.parametrize("name", ["seed", "demo", "modern"])
def test_every_shipped_study_loads_by_name(name):
    config = load_config(name, data=__file__, test_data="", answers="")
    assert config.path == packaged_config(name) and config.backbones
    assert os.path.dirname(config.path) == STUDIES_DIR


def test_an_unknown_study_name_lists_the_shipped_ones():
    with pytest.raises(KbenchError, match="config not found: sed .*demo, modern, seed"):
        load_config("sed")
