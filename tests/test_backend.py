"""Which backend kbench picks, and the one line that says why. The GPU check is monkeypatched, so
these hold on any host; none of them changes the backend of the running suite."""

import os
import subprocess
import sys

import pytest

from kbench.core import backend, machine
from kbench.core.errors import KbenchError

from conftest import BACKEND, REPO


@pytest.fixture
def fresh(monkeypatch):
    """No KERAS_BACKEND, no default chosen yet in this process; restored afterwards."""
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    monkeypatch.setattr(backend, "_default_choice", {})
    return monkeypatch


def test_no_gpu_means_tensorflow(fresh):
    fresh.setattr(backend, "gpu_found", lambda: False)
    name, reason = backend.choose_backend()
    assert name == "tensorflow"
    assert reason.startswith("no GPU found") and "slower" in reason and "--backend jax" in reason


def test_a_gpu_means_jax(fresh):
    fresh.setattr(backend, "gpu_found", lambda: True)
    name, reason = backend.choose_backend()
    assert name == "jax" and reason.startswith("a GPU was found") and "--backend tensorflow" in reason


@pytest.mark.parametrize("gpu", [False, True])
def test_an_explicit_name_or_keras_backend_wins(fresh, gpu):
    fresh.setattr(backend, "gpu_found", lambda: gpu)
    assert backend.choose_backend("JAX") == ("jax", "asked for")
    assert backend.choose_backend("tensorflow") == ("tensorflow", "asked for")
    other = "tensorflow" if gpu else "jax"  # the one the machine wouldn't pick
    fresh.setenv("KERAS_BACKEND", other)
    assert backend.choose_backend() == (other, "KERAS_BACKEND is set")
    mine = "jax" if other == "tensorflow" else "tensorflow"
    assert backend.choose_backend(mine) == (mine, "asked for")  # the argument beats KERAS_BACKEND


def test_unknown_backend_is_refused(fresh):
    with pytest.raises(KbenchError, match="unknown backend 'torch'; choose one of: jax, tensorflow"):
        backend.choose_backend("torch")
    fresh.setenv("KERAS_BACKEND", "theano")
    with pytest.raises(KbenchError, match="unknown backend 'theano' in KERAS_BACKEND; choose one of"):
        backend.choose_backend()


def test_the_notice_comes_once_and_only_for_a_default(fresh):
    # The running suite's keras has BACKEND loaded, so only that backend can be selected here.
    fresh.setattr(backend, "gpu_found", lambda: BACKEND == "jax")
    notice = backend.default_notice()
    assert notice == f"backend {BACKEND} ({backend.default_backend()[1]})"
    assert os.environ["KERAS_BACKEND"] == BACKEND
    # What use_backend set as the default is still the default, not the user's KERAS_BACKEND ...
    assert backend.choose_backend()[1] == backend.default_backend()[1]
    # ... and the CLI passes the selected name on: still no notice the second time.
    assert backend.default_notice(BACKEND) is None


def test_no_notice_when_the_user_chose(fresh):
    fresh.setattr(backend, "gpu_found", lambda: BACKEND == "jax")
    assert backend.default_notice(BACKEND) is None
    fresh.setenv("KERAS_BACKEND", BACKEND)
    assert backend.default_notice() is None


def test_gpu_check_reads_nvidia_smi(monkeypatch, tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81559, 570.124.06'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    machine._nvidia_smi.cache_clear()  # asked once a process: each case below starts afresh
    try:
        assert backend.gpu_found() is True
        fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
        machine._nvidia_smi.cache_clear()
        assert backend.gpu_found() is False
        monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
        machine._nvidia_smi.cache_clear()
        assert backend.gpu_found() is False
    finally:
        machine._nvidia_smi.cache_clear()


def test_kbench_train_says_once_which_backend_it_picked(kaggle_data, tmp_path):
    """End to end, no monkeypatching: a fresh `kbench train` with neither --backend nor KERAS_BACKEND."""
    environment = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "cli.py"),
            "train",
            "--backbone",
            "small_cnn",
            "--data",
            kaggle_data["train"],
            "--image-size",
            "16",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--run-dir",
            str(tmp_path / "run"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    expected = "jax" if backend.gpu_found() else "tensorflow"
    notices = [line for line in done.stderr.splitlines() if line.startswith("kbench: INFO: backend ")]
    assert notices == [f"kbench: INFO: backend {expected} ({backend.default_backend()[1]})"]
    assert done.stdout.startswith(f"small_cnn ({expected}):")
