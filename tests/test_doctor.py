import json
import logging

import pytest
from click.testing import CliRunner

from kbench.cli import doctor, options
from kbench.cli.main import cli
from kbench.core import machine

from conftest import BACKEND, run_cli

pytestmark = pytest.mark.once  # backend-independent: `make test` runs it under TensorFlow only

H200 = "NVIDIA H200, 143771, 570.124.06\n"  # nvidia-smi's answer to kbench.core.machine.GPU_QUERY
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


@pytest.fixture
def nvidia_smi(monkeypatch):
    """nvidia-smi answering ``answer[0]`` (None: missing), calls counted; kbench.core.machine's
    once-a-process answer emptied before and after, so no fake GPU leaks into other tests."""
    calls, answer = [], [None]
    monkeypatch.setattr(machine, "_run", lambda command, timeout=10: calls.append(command) or answer[0])
    machine._nvidia_smi.cache_clear()
    yield answer, calls
    machine._nvidia_smi.cache_clear()


@pytest.fixture
def probes_must_not_run(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("probed although no GPU is listed or the GPU is hidden")

    monkeypatch.setattr(doctor, "PROBES", {"jax": refuse, "tensorflow": refuse})
    monkeypatch.setattr(doctor, "probe_onnxruntime", refuse)


def test_gpu_warning_costs_one_nvidia_smi_call_without_a_gpu(nvidia_smi, probes_must_not_run):
    _, calls = nvidia_smi
    assert doctor.gpu_warning("jax") is None and doctor.gpu_warning("tensorflow") is None
    assert calls == [machine.GPU_QUERY]


@pytest.mark.parametrize(
    "hidden", [{"CUDA_VISIBLE_DEVICES": ""}, {"CUDA_VISIBLE_DEVICES": "-1"}, {"JAX_PLATFORMS": "cpu"}]
)
def test_no_warning_when_the_user_hid_the_gpu(monkeypatch, nvidia_smi, probes_must_not_run, hidden):
    nvidia_smi[0][0] = H200
    for name, value in hidden.items():
        monkeypatch.setenv(name, value)
    assert doctor.gpu_warning("jax") is None


@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_gpu_warning_with_a_gpu_listed_checks_the_backend_and_onnxruntime(monkeypatch, nvidia_smi, backend):
    nvidia_smi[0][0] = H200
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


@pytest.fixture
def kbench_log():
    """The messages logged on the "kbench" logger at WARNING or above during the test."""
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("kbench")
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


def test_the_warning_is_logged_once_per_process(monkeypatch, kbench_log):
    monkeypatch.setattr(options, "_gpu_warned", False)
    monkeypatch.setattr(
        doctor, "gpu_warning", lambda backend: f"nvidia-smi lists NVIDIA H200 but {backend} sees only CPU"
    )
    for _ in range(3):
        options.warn_if_gpu_unseen("jax")
    assert kbench_log == ["nvidia-smi lists NVIDIA H200 but jax sees only CPU"]


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--backbone", "small_cnn", "--data", "{tmp}/missing", "--run-dir", "{tmp}/run"],
        ["latency", "{tmp}/missing.onnx"],
        ["bench", "--config", "demo", "--data", "{tmp}", "--test-data", "", "--out", "{tmp}/study"],  # no images
    ],
)
def test_the_cli_warns_before_the_commands_work(args, monkeypatch, tmp_path, kbench_log):
    """The CLI prints the unseen-GPU warning (library code never imports doctor): here before each
    command refuses its data or model, found missing by the work itself."""
    monkeypatch.setattr(options, "_gpu_warned", False)
    monkeypatch.setattr(options, "set_up_process", lambda *flags: None)  # pytest's own signals and stderr
    monkeypatch.setattr(doctor, "gpu_warning", lambda backend: f"unseen by {backend}")
    done = CliRunner().invoke(cli, [arg.format(tmp=tmp_path) for arg in args] + ["--backend", BACKEND])
    assert done.exit_code == 2, done.output
    assert kbench_log == [f"unseen by {BACKEND}"] and "kbench: error: " in done.output


def test_doctor_refuses_an_unknown_keras_backend_in_one_line(monkeypatch):
    """As every other command does (#29): not a TensorFlow import error, "no warnings" and exit 0."""
    monkeypatch.setattr(options, "set_up_process", lambda *flags: None)
    monkeypatch.setattr(doctor, "run_probes", lambda **kwargs: pytest.fail("probed with KERAS_BACKEND=bogus"))
    done = CliRunner().invoke(cli, ["doctor"], env={"KERAS_BACKEND": "bogus"})
    assert done.exit_code == 2
    assert done.output == "kbench: error: unknown backend 'bogus' in KERAS_BACKEND; choose one of: jax, tensorflow\n"


def test_a_probe_that_hangs_is_reported_not_waited_for():
    assert doctor.run_probes(("tensorflow",), timeout=0.05) == {"tensorflow": {"error": "no answer within 0.05 s"}}


def test_tensorflow_on_hopper_with_a_driver_older_than_r555_is_warned():
    from kbench.cli.doctor import gpu_warnings

    seen = {"devices": [{"id": "gpu:0"}]}
    old = gpu_warnings(["NVIDIA H100"], tensorflow=seen, drivers=["550.54.15"], compute_capabilities=["9.0"])
    assert old == [
        "TensorFlow's CUDA 12 build has only PTX for compute capability 9.0 and the driver 550.54.15 is "
        "older than R555: update the driver, or use --backend jax"
    ]
    assert gpu_warnings(["NVIDIA H100"], tensorflow=seen, drivers=["570.124.06"], compute_capabilities=["9.0"]) == []
    assert gpu_warnings(["NVIDIA A100"], tensorflow=seen, drivers=["550.54.15"], compute_capabilities=["8.0"]) == []
    assert gpu_warnings(["NVIDIA H100"], jax=seen, drivers=["550.54.15"], compute_capabilities=["9.0"]) == []
