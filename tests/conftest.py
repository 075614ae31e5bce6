"""Shared fixtures: generated images in both layouts (folders and zips); no downloads. What holds only
on some hosts (a GPU, ONNX Runtime's CUDA provider) is asked here, so that tests assert it only there."""

import functools
import os
import subprocess
import sys

import pytest

# Set before any backend starts, and inherited by the CLI subprocesses. On a GPU host several
# processes share the GPU (this one and each `run_cli`), so none may take most of its memory up
# front; and float32 results are compared across backends and ONNX Runtime to 1e-5..1e-4, which
# TF32 matmuls and convolutions (JAX's and TensorFlow's default on Ampere and newer GPUs) would miss.
for _name, _value in {
    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    "TF_FORCE_GPU_ALLOW_GROWTH": "true",
    "JAX_DEFAULT_MATMUL_PRECISION": "highest",
    "NVIDIA_TF32_OVERRIDE": "0",
}.items():
    os.environ.setdefault(_name, _value)

from kbench.core.backend import use_backend  # noqa: E402
from kbench.data.synthetic import write_class_folders, write_kaggle_dataset  # noqa: E402
from kbench.models.backbones import REGISTRY  # noqa: E402

BACKEND = use_backend()  # the suite runs once per backend: KERAS_BACKEND=jax / tensorflow

# keras.applications module -> its first registered model: the one model per family the gate builds
FAMILIES = {}
for _spec in REGISTRY.values():
    if _spec.module:
        FAMILIES.setdefault(_spec.module, _spec.name)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Forces a run onto the CPU whatever the host has (JAX and TensorFlow alike).
CPU_ONLY = {"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "-1"}


@functools.cache
def accelerator() -> bool:
    """Whether this backend trains on a GPU or TPU on this host."""
    import keras

    return not str(keras.distribution.list_devices()[0]).lower().startswith("cpu")


@functools.cache
def onnxruntime_cuda() -> bool:
    """Whether ONNX Runtime really runs on CUDA here (onnxruntime-gpu lists the provider even without a GPU)."""
    from kbench.cli.doctor import probe_onnxruntime

    return probe_onnxruntime().get("cuda") == "ok"


@pytest.fixture(scope="session")
def kaggle_data(tmp_path_factory):
    """train.zip (learnable, 240 images at 32 px), test.zip and answers.csv."""
    return write_kaggle_dataset(str(tmp_path_factory.mktemp("kaggle")), n_train=240, n_test=30, image_size=32, seed=1)


@pytest.fixture(scope="session")
def class_folders(tmp_path_factory):
    """Three classes of PNGs in one folder per class."""
    return write_class_folders(
        str(tmp_path_factory.mktemp("folders")), per_class=8, image_size=24, classes=("ant", "bee", "cow")
    )


@pytest.fixture(scope="session")
def small_cnn_run(kaggle_data, tmp_path_factory):
    """The one way tests get a trained small_cnn run on ``kaggle_data``: ``small_cnn_run(epochs=6)``
    trains once per set of options in a test process and returns the run folder (defaults: 2 epochs at
    32 px, lr 2e-3, batch 24, a 20 % validation split, seed 0). Read it; copy it to change it."""
    from kbench.training.config import TrainConfig
    from kbench.training.train import train

    made = {}

    def make(**options) -> str:
        settings = {"epochs": 2, "image_size": 32, "lr": 2e-3, "batch_size": 24, "val_split": 0.2, "seed": 0}
        settings.update(options)
        key = tuple(sorted(settings.items()))
        if key not in made:
            run_dir = str(tmp_path_factory.mktemp("small_cnn") / "run")
            train(TrainConfig(backbone="small_cnn", data=kaggle_data["train"], run_dir=run_dir, **settings), verbose=0)
            made[key] = run_dir
        return made[key]

    return make


def run_process(*args, env=None, timeout=300, cwd=None):
    """Run `python cli.py ARGS` in a fresh process; returns the CompletedProcess. For what is about
    processes: signals, stderr written by C++ libraries, environment variables read at start-up, locks
    held by another process, Ray and `kbench launch`."""
    environment = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "cli.py"), *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
        cwd=cwd,
    )


def run_cli(*args, env=None, timeout=300, cwd=None, process=False):
    """Run `kbench ARGS` in this process with click's CliRunner (a fresh Python process per call costs
    seconds of imports); returns an object with returncode, stdout and stderr like run_process's.

    What a command changes in the process is put back afterwards: the environment, the working folder,
    sys.argv, signal handlers, the stop requests, and keras' dtype policy. With ``env`` (read by libraries
    at start-up) or ``process=True`` it runs in a real process instead."""
    if env is not None or process:
        return run_process(*args, env=env, timeout=timeout, cwd=cwd)
    import signal

    import keras
    from click.testing import CliRunner

    from kbench.cli.main import cli
    from kbench.core.errors import STOP_REQUESTS

    saved_environment, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
    saved_signals = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        if cwd is not None:
            os.chdir(cwd)
        sys.argv = ["kbench", *map(str, args)]
        result = CliRunner().invoke(cli, [str(arg) for arg in args], prog_name="kbench")
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_environment)
        for number, handler in saved_signals.items():
            signal.signal(number, handler)
        STOP_REQUESTS.clear()
        keras.config.set_dtype_policy("float32")
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        stderr += "".join(traceback.format_exception(result.exception))  # what a process would print
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, stderr)


# The smallest study: one small_cnn entry, one epoch (test_studyconfig.py, test_study_resume.py, test_study.py).
MINIMAL_STUDY = """
[study]
data = "{data}"
[train]
epochs = 1
image_size = 24
weights = "none"
[[backbones]]
backbone = "small_cnn"
"""


def write_study(tmp_path, text, **paths) -> str:
    """``text`` formatted with ``paths``, written to tmp_path/study.toml; returns its path."""
    path = tmp_path / "study.toml"
    path.write_text(text.format(**paths))
    return str(path)
