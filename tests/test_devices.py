import csv
import json
import os

import pytest

from kbench.core import machine
from kbench.core.errors import KbenchError
from kbench.models.backbones import get_backbone
from kbench.training.devices import CPU_BF16_MEASURED, CPU_BF16_PAGE, count_devices, cpu_bf16_expectation

from conftest import BACKEND, CPU_ONLY, REPO, accelerator, run_cli


def test_device_counts():
    assert count_devices(None, 4) == 1 and count_devices("all", 4) == 4 and count_devices("2", 4) == 2
    with pytest.raises(KbenchError, match="only 1 device"):
        count_devices("2", 1)
    with pytest.raises(KbenchError, match="'all' or a positive number"):
        count_devices("two", 4)


def train_args(kaggle_data, run_dir, *extra, batch_size=16):
    return (
        "train",
        "--backbone",
        "small_cnn",
        "--data",
        kaggle_data["train"],
        "--image-size",
        "24",
        "--epochs",
        "3",
        "--batch-size",
        str(batch_size),
        "--lr",
        "2e-3",
        "--run-dir",
        run_dir,
        "--quiet",
        "--backend",
        BACKEND,
        *extra,
    )


def test_float16_is_refused_on_a_cpu(kaggle_data, tmp_path):
    run_dir = tmp_path / "run"
    done = run_cli(*train_args(kaggle_data, str(run_dir), "--mixed-precision", "float16"), env=CPU_ONLY)
    assert done.returncode == 2 and "--mixed-precision float16 needs a GPU or TPU" in done.stderr
    assert not run_dir.exists()


@pytest.mark.skipif(accelerator(), reason="trains on the CPU only where the backend sees no GPU or TPU")
def test_bfloat16_is_refused_on_a_cpu_without_native_bf16(kaggle_data, tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "has_native_bf16", lambda: False)
    run_dir = tmp_path / "run"
    done = run_cli(*train_args(kaggle_data, str(run_dir), "--mixed-precision", "bfloat16"))
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(errors) == 1, done.stderr
    assert "needs AMX-BF16 or AVX512-BF16, which this CPU lacks" in errors[0]
    assert not run_dir.exists()


@pytest.mark.skipif(accelerator(), reason="trains on the CPU only where the backend sees no GPU or TPU")
def test_bfloat16_trains_on_a_cpu_with_native_bf16_and_says_what_to_expect(kaggle_data, tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "has_native_bf16", lambda: True)
    run_dir = tmp_path / "run"
    done = run_cli(*train_args(kaggle_data, str(run_dir), "--mixed-precision"))
    assert done.returncode == 0, done.stderr
    notices = [line for line in done.stderr.splitlines() if "bfloat16 on a CPU" in line]
    assert notices == [f"kbench: INFO: {cpu_bf16_expectation('small_cnn', BACKEND)}"]
    assert f"under {BACKEND} (" in notices[0]  # measured under both backends
    metrics = json.load(open(run_dir / "metrics.json"))
    assert metrics["mixed_precision"] == "bfloat16" and metrics["devices"][0].lower().startswith("cpu")
    assert metrics["val_log_loss"] < 0.6  # it learns (log 2 = 0.69 is chance)


def test_cpu_bf16_expectation_names_the_family_its_measurement_and_the_page():
    resnet = cpu_bf16_expectation("resnet152", "tensorflow")
    assert "resnet family measured at 1.33x float32's training speed under tensorflow (faster; resnet50" in resnet
    assert "px, on a Xeon with AMX);" in resnet  # AVX512-BF16 without AMX (AMD EPYC) gains less
    assert "0.68x float32's training speed under tensorflow (slower" in cpu_bf16_expectation(
        "efficientnet_b3", "tensorflow"
    )
    elsewhere = cpu_bf16_expectation("resnet50", "jax")
    assert elsewhere.startswith("bfloat16 on a CPU: the resnet family is not measured under jax; 1.33x float32's")
    unmeasured = cpu_bf16_expectation("densenet121", "tensorflow")
    assert unmeasured == f"bfloat16 on a CPU: the densenet family is not measured on a CPU; see {CPU_BF16_PAGE}"
    assert os.path.exists(os.path.join(REPO, CPU_BF16_PAGE))
    for (family, backend), measured in CPU_BF16_MEASURED.items():  # each names a real backbone of its family
        spec = get_backbone(measured.backbone)
        assert (spec.module or spec.name) == family and backend in ("tensorflow", "jax")


@pytest.mark.skipif(not accelerator(), reason="mixed precision trains only on a GPU or TPU")
def test_mixed_precision_trains_on_a_gpu(kaggle_data, tmp_path):
    run_dir = tmp_path / "run"
    done = run_cli(*train_args(kaggle_data, str(run_dir), "--mixed-precision"))
    assert done.returncode == 0, done.stderr
    metrics = json.load(open(run_dir / "metrics.json"))
    assert metrics["mixed_precision"] == "bfloat16" and not metrics["devices"][0].lower().startswith("cpu")


@pytest.mark.skipif(BACKEND != "jax", reason="virtual host devices: XLA_FLAGS is JAX's")
def test_two_virtual_devices_follow_the_one_device_loss_curve(kaggle_data, tmp_path):
    environment = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}  # even beside a GPU
    curves = {}
    for devices in ("1", "2"):
        run_dir = str(tmp_path / f"d{devices}")
        done = run_cli(*train_args(kaggle_data, run_dir, "--devices", devices), env=environment)
        assert done.returncode == 0, done.stderr
        metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
        assert len(metrics["devices"]) == int(devices) and metrics["global_batch_size"] == 16
        curves[devices] = [float(row["loss"]) for row in csv.DictReader(open(os.path.join(run_dir, "history.csv")))]
    # Reduction order differs between one and two devices; measured: 2.8e-3 relative by epoch 3
    # (each epoch's batch order is the loader's own since fit stopped reshuffling it).
    assert curves["1"] == pytest.approx(curves["2"], rel=5e-3), curves
    odd = run_cli(*train_args(kaggle_data, str(tmp_path / "odd"), "--devices", "2", batch_size=15), env=environment)
    assert odd.returncode == 2 and "multiple of the 2 devices" in odd.stderr
