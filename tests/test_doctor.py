import json
import logging

import pytest

from kbench import doctor

from conftest import run_cli

pytestmark = pytest.mark.once  # backend-independent: `make test` runs it under TensorFlow only

H200 = "GPU 0: NVIDIA H200 (UUID: GPU-5d1c1e1e-0000-0000-0000-000000000000)\n"
CPU_ONLY = {"devices": [{"id": "cpu:0", "kind": "cpu"}]}
ON_GPU = {"devices": [{"id": "cpu:0"}, {"id": "gpu:0", "kind": "NVIDIA H200"}]}
ORT_CPU = {"packages": ["onnxruntime"], "providers": ["CPUExecutionProvider"]}
ORT_GPU = {
    "packages": ["onnxruntime-gpu"],
    "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "cuda": "ok",
}


def test_doctor_command_reports_what_each_library_sees():
    done = run_cli("doctor", "--format", "json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert {"versions", "gpus", "jax", "tensorflow", "onnxruntime", "warnings"} <= set(report)
    assert report["versions"]["keras"] and report["jax"]["version"] and report["tensorflow"]["version"]
    assert "cpu:0" in [device["id"] for device in report["jax"]["devices"]]
    assert "CPUExecutionProvider" in report["onnxruntime"]["providers"]
    for name, key in (("JAX", "jax"), ("TensorFlow", "tensorflow")):  # on any host: warned exactly when unseen
        unseen = bool(report["gpus"]) and not any(d["id"].startswith("gpu") for d in report[key]["devices"])
        assert any(f"but {name} sees only CPU" in warning for warning in report["warnings"]) == unseen
    text = doctor.format_doctor(report)
    assert text.startswith("versions: ") and "JAX sees: " in text and "ONNX Runtime (" in text


def test_warnings_name_the_gpu_and_the_fix():
    assert doctor.gpu_warnings(["NVIDIA H200"], jax=CPU_ONLY) == [
        "nvidia-smi lists NVIDIA H200 but JAX sees only CPU: run `make install CUDA=1`"
    ]
    assert doctor.gpu_warnings(["NVIDIA H200"], jax=ON_GPU, tensorflow=ON_GPU, onnxruntime=ORT_GPU) == []
    assert doctor.gpu_warnings([], jax=CPU_ONLY, tensorflow=CPU_ONLY, onnxruntime=ORT_CPU) == []  # a CPU machine
    [ort] = doctor.gpu_warnings(["NVIDIA H200"], jax=ON_GPU, onnxruntime=ORT_CPU)
    assert "ONNX Runtime has no CUDA provider" in ort and ort.endswith("run `make install CUDA=1`")
    [failed] = doctor.gpu_warnings(["NVIDIA H200"], onnxruntime={**ORT_GPU, "cuda": "failed: libcudnn.so.9 missing"})
    assert "CUDA provider did not start (failed: libcudnn.so.9 missing)" in failed
    [two] = doctor.gpu_warnings(["NVIDIA H200", "NVIDIA H200"], tensorflow=CPU_ONLY)
    assert two.startswith("nvidia-smi lists 2 GPUs (NVIDIA H200) but TensorFlow sees only CPU")
    [old] = doctor.gpu_warnings(["NVIDIA H200"], drivers=["470.82.01"])
    assert "driver 470.82.01 is older" in old
    assert "not installed" in doctor.gpu_warnings([], onnxruntime={"error": "not installed (No module named x)"})[0]
    assert doctor.gpu_warnings([], onnxruntime={"error": "ImportError: libstdc++"}) == [
        "ONNX Runtime did not start: ImportError: libstdc++"
    ]
    both = {**ORT_GPU, "packages": ["onnxruntime", "onnxruntime-gpu"]}
    assert "share one module" in doctor.gpu_warnings([], onnxruntime=both)[0]


def test_nvidia_smi_output_is_parsed(monkeypatch):
    answers = {
        "-L": H200 + "GPU 1: NVIDIA H200 (UUID: GPU-2)\n",
        "--query-gpu=name,memory.total,driver_version": "NVIDIA H200, 143771, 570.124.06\n",
    }
    monkeypatch.setattr(doctor, "_run", lambda command, timeout=10: answers[command[1]])
    assert doctor.list_gpus() == ["NVIDIA H200", "NVIDIA H200"]
    assert doctor.gpu_details() == [{"name": "NVIDIA H200", "memory_mib": 143771, "driver": "570.124.06"}]
    monkeypatch.setattr(doctor, "_run", lambda command, timeout=10: None)  # no nvidia-smi
    assert doctor.list_gpus() == [] and doctor.gpu_details() == []


@pytest.fixture
def probes_must_not_run(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("probed although no GPU is listed or the GPU is hidden")

    monkeypatch.setattr(doctor, "PROBES", {"jax": refuse, "tensorflow": refuse})
    monkeypatch.setattr(doctor, "probe_onnxruntime", refuse)


def test_gpu_warning_costs_one_nvidia_smi_call_without_a_gpu(monkeypatch, probes_must_not_run):
    calls = []
    monkeypatch.setattr(doctor, "_run", lambda command, timeout=10: calls.append(command))
    assert doctor.gpu_warning("jax") is None and calls == [["nvidia-smi", "-L"]]


@pytest.mark.parametrize(
    "hidden", [{"CUDA_VISIBLE_DEVICES": ""}, {"CUDA_VISIBLE_DEVICES": "-1"}, {"JAX_PLATFORMS": "cpu"}]
)
def test_no_warning_when_the_user_hid_the_gpu(monkeypatch, probes_must_not_run, hidden):
    monkeypatch.setattr(doctor, "_run", lambda command, timeout=10: H200)
    for name, value in hidden.items():
        monkeypatch.setenv(name, value)
    assert doctor.gpu_warning("jax") is None


@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_gpu_warning_with_a_gpu_listed_checks_the_backend_and_onnxruntime(monkeypatch, backend):
    monkeypatch.setattr(doctor, "_run", lambda command, timeout=10: H200)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    seen = {"jax": CPU_ONLY, "tensorflow": CPU_ONLY}
    monkeypatch.setattr(doctor, "PROBES", {name: (lambda name=name: seen[name]) for name in seen})
    monkeypatch.setattr(doctor, "probe_onnxruntime", lambda session=True: ORT_CPU)
    label = {"jax": "JAX", "tensorflow": "TensorFlow"}[backend]
    assert doctor.gpu_warning(backend) == (
        f"nvidia-smi lists NVIDIA H200 but {label} sees only CPU: run `make install CUDA=1`; nvidia-smi lists "
        "NVIDIA H200 but ONNX Runtime has no CUDA provider (the CPU package is installed): run `make install CUDA=1`"
    )
    seen[backend] = ON_GPU
    monkeypatch.setattr(doctor, "probe_onnxruntime", lambda session=True: ORT_GPU)
    assert doctor.gpu_warning(backend) is None


def test_the_warning_is_logged_once_per_process(monkeypatch):
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("kbench")
    logger.addHandler(handler)
    monkeypatch.setattr(doctor, "_warned", False)
    monkeypatch.setattr(doctor, "gpu_warning", lambda backend: "nvidia-smi lists NVIDIA H200 but JAX sees only CPU")
    try:
        for _ in range(3):
            doctor.warn_if_gpu_unseen("jax")
    finally:
        logger.removeHandler(handler)
    assert messages == ["nvidia-smi lists NVIDIA H200 but JAX sees only CPU"]


def test_a_probe_that_hangs_is_reported_not_waited_for():
    assert doctor.run_probes(("tensorflow",), timeout=0.05) == {"tensorflow": {"error": "no answer within 0.05 s"}}
