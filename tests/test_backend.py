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


def test_one_gpu_memory_policy_is_set_with_the_backend_and_the_user_wins():
    script = (
        "import os, sys; from kbench.core.backend import use_backend; use_backend('jax');"
        "print(os.environ['TF_FORCE_GPU_ALLOW_GROWTH'], os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'],"
        "os.environ.get('JAX_COMPILATION_CACHE_DIR', '-'), 'keras' in sys.modules)"
    )
    environment = {k: v for k, v in os.environ.items() if k not in (*backend.MEMORY_POLICY, backend.COMPILATION_CACHE)}
    environment.update(PYTHONPATH=REPO, PATH="/nowhere")  # no nvidia-smi: no compilation cache set
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment)
    assert done.stdout.split() == ["true", "false", "-", "False"], done.stderr
    chosen = {"XLA_PYTHON_CLIENT_PREALLOCATE": "true"}
    policy = backend.set_memory_policy(chosen, gpu=True)
    assert policy["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true" and policy["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
    assert policy["JAX_COMPILATION_CACHE_DIR"].endswith(os.path.join("kbench", "jax"))


@pytest.fixture
def tf32_default():
    """This backend's default (TF32 allowed) for the test, whatever conftest set for the suite."""
    if BACKEND == "jax":
        import jax

        before = jax.config.jax_default_matmul_precision
        jax.config.update("jax_default_matmul_precision", None)
        yield
        jax.config.update("jax_default_matmul_precision", before)
    else:
        yield


def test_full_float32_turns_tf32_off_and_back(tf32_default):
    outside = backend.reference_precision()
    with backend.full_float32():
        inside = backend.reference_precision()
    assert inside == ("highest" if BACKEND == "jax" else "tf32 off")
    assert outside != inside and backend.reference_precision() == outside


def _recording(model, seen):
    predict = model.predict_on_batch

    def recorded(pixels):
        seen.append(backend.reference_precision())
        return predict(pixels)

    model.predict_on_batch = recorded
    return model


def test_every_reference_a_check_compares_with_is_computed_at_full_float32(tf32_default, tmp_path):
    """The export's parity check, OpenVINO's reference (latency.Reference) and settle's sensitivity."""
    import keras
    import numpy as np
    from onnx import TensorProto, helper

    from kbench.export.onnx import check_parity
    from kbench.models.settle import float32_sensitivity
    from kbench.serving.latency import ModelSource, Reference

    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["y"], axes=[1, 2], keepdims=0)],
        "mean",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8, 8, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
    )
    onnx_bytes = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8).SerializeToString()
    seen = []
    assert check_parity(_recording(model, seen), onnx_bytes, [1, 3]) < 1e-5
    assert float32_sensitivity(model) < 1e-4
    path = str(tmp_path / "mean.keras")
    model.save(path)
    reference = Reference(ModelSource("mean", path, None, (8, 8), given=path))
    _recording(reference.keras_model(), seen)
    reference(np.zeros((1, 8, 8, 3), np.float32))
    assert len(seen) == 5 and set(seen) == {"highest" if BACKEND == "jax" else "tf32 off"}
