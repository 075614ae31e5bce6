"""The set-up's choices: which builds `make install` installs (CPU or CUDA), and the package extras."""

import os
import shutil
import subprocess
import tomllib

import pytest

from conftest import REPO

pytestmark = [  # backend-independent: `make test` runs it under TensorFlow only
    pytest.mark.once,
    pytest.mark.skipif(shutil.which("make") is None, reason="needs make"),
]


@pytest.fixture
def checkout(tmp_path):
    """The set-up files in a folder of their own, and a bin/ to put a fake nvidia-smi in."""
    for name in ("Makefile", "pyproject.toml", "constraints.txt"):
        shutil.copy(os.path.join(REPO, name), tmp_path / name)
    (tmp_path / "bin").mkdir()
    return tmp_path


def make_install(checkout, *args, nvidia_smi=None):
    """The commands `make install ARGS` would run (make -n), with nvidia-smi printing ``nvidia_smi``
    (None: failing as where there is no driver; a real one later on the PATH is never reached)."""
    fake = checkout / "bin" / "nvidia-smi"
    fake.write_text("#!/bin/sh\n" + (f"printf '%s' '{nvidia_smi}'\n" if nvidia_smi is not None else "exit 9\n"))
    fake.chmod(0o755)
    environment = {key: value for key, value in os.environ.items() if key != "CUDA"}
    environment["PATH"] = f"{checkout / 'bin'}:/usr/bin:/bin"
    return subprocess.run(
        ["make", "-n", "install", *args], cwd=checkout, capture_output=True, text=True, env=environment
    )


def test_cuda_1_installs_the_cuda_set_and_removes_the_cpu_onnxruntime(checkout):
    done = make_install(checkout, "CUDA=1")
    assert done.returncode == 0, done.stderr
    assert "-e '.[test,ray,cuda]'" in done.stdout and "'.[test,ray,cpu]'" not in done.stdout
    assert "pip show --quiet onnxruntime 2>" in done.stdout  # the CPU package there: both go, onnxruntime-gpu comes
    assert "uninstall --quiet --yes onnxruntime onnxruntime-gpu" in done.stdout
    lines = done.stdout.splitlines()
    installs = [line for line in lines if "pip install" in line and "upgrade pip" not in line]
    # the cuda extra brings onnxruntime-gpu alone: nothing to swap after the install
    assert len(installs) == 1 and "-e '.[test,ray,cuda]'" in installs[0]
    assert "touch .venv/.installed-cuda" in done.stdout


def test_cuda_0_installs_the_cpu_set_and_removes_the_cuda_set(checkout):
    done = make_install(checkout, "CUDA=0", nvidia_smi="GPU 0: NVIDIA H200 (UUID: GPU-1)\n")
    assert done.returncode == 0, done.stderr
    assert "-e '.[test,ray,cpu]'" in done.stdout and "'.[test,ray,cuda]'" not in done.stdout
    assert "pip show --quiet onnxruntime-gpu 2>" in done.stdout
    assert "jax-cuda12-plugin jax-cuda12-pjrt" in done.stdout and "nvidia-" in done.stdout
    assert "touch .venv/.installed-cpu" in done.stdout


@pytest.mark.parametrize(
    "listed, flavour", [("GPU 0: NVIDIA H200 (UUID: GPU-1)\n", "cuda"), ("", "cpu"), (None, "cpu")]
)
def test_the_choice_follows_nvidia_smi(checkout, listed, flavour):
    done = make_install(checkout, nvidia_smi=listed)
    assert done.returncode == 0, done.stderr
    assert f"-e '.[test,ray,{flavour}]'" in done.stdout


def test_switching_sets_reinstalls_and_the_same_set_does_not(checkout):
    os.makedirs(checkout / ".venv")
    (checkout / ".venv" / ".installed-cpu").touch()  # newer than the set-up files
    assert "pip install" not in make_install(checkout, "CUDA=0").stdout
    assert "-e '.[test,ray,cuda]'" in make_install(checkout, "CUDA=1").stdout


def test_a_bad_choice_is_refused(checkout):
    done = make_install(checkout, "CUDA=yes")
    assert done.returncode != 0 and "CUDA must be 1 (the CUDA builds) or 0 (the CPU builds)" in done.stderr


def test_the_extras_hold_one_onnxruntime_each_and_constraints_pin_them():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as handle:
        project = tomllib.load(handle)["project"]
    names = {
        extra: [
            requirement.split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip() for requirement in requirements
        ]
        for extra, requirements in project["optional-dependencies"].items()
    }
    base = [requirement.split(">")[0].split("[")[0] for requirement in project["dependencies"]]
    # the two ONNX Runtimes share one module folder: the extra chooses one, none is in the base set
    # (`pip install 'kbench[cuda]'` would otherwise install both)
    assert not {"onnxruntime", "onnxruntime-gpu", "jax2onnx"} & set(base)
    assert "onnxruntime" in names["cpu"] and "onnxruntime-gpu" not in names["cpu"]
    assert "onnxruntime-gpu" in names["cuda"] and "onnxruntime" not in names["cuda"]
    for extra in ("test", "ray"):
        assert not {"onnxruntime", "onnxruntime-gpu"} & set(names[extra])
    with open(os.path.join(REPO, "constraints.txt")) as handle:
        pinned = dict(line.strip().split("==") for line in handle if "==" in line and not line.startswith("#"))
    for package in (
        "onnxruntime",
        "onnxruntime-gpu",
        "jax-cuda12-plugin",
        "jax",
        "jaxlib",
        "tensorflow",
        "sympy",
        "openvino",
    ):
        assert package in pinned, package
    assert "jax2onnx" not in pinned
    assert pinned["jax-cuda12-plugin"] == pinned["jax"] == pinned["jaxlib"]
    assert int(pinned["onnxruntime-gpu"].split(".")[1]) < 27  # the CUDA 12 builds (1.27 on are CUDA 13)
