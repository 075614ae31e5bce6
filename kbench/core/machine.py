"""What this machine is, asked in one place: the CPU (model, instruction-set features, physical
cores), the GPUs ``nvidia-smi`` lists (asked once a process) and the versions of the libraries
kbench uses. ``facts`` is the block a latency table or a study's report is printed under.

Nothing here imports JAX, TensorFlow or ONNX Runtime: what each of those *sees* is ``kbench
doctor``'s question (kbench.cli.doctor probes them in subprocesses).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
import platform
import subprocess
from dataclasses import dataclass

from kbench.core.errors import KbenchError, first_line

# The /proc/cpuinfo flags that decide which precisions a CPU computes natively: bf16 needs AVX512_BF16
# or AMX-BF16 (OpenVINO's documented condition; elsewhere bf16 is emulated, slower than float32), int8
# dot products VNNI (AVX-512 or AVX) or AMX-INT8.
FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
# "python" is the interpreter's own version; the others are distributions (absent ones left out).
PACKAGES = (
    "python",
    "kbench",
    "keras",
    "jax",
    "jaxlib",
    "jax-cuda12-plugin",
    "jax-cuda13-plugin",
    "tensorflow",
    "onnx",
    "tf2onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "openvino",
    "numpy",
)
FACT_PACKAGES = ("keras", "jax", "tensorflow", "onnxruntime", "onnxruntime-gpu", "openvino")  # beside each timing
GPU_QUERY = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"]


@dataclass(frozen=True)
class Cpu:
    """The CPU as /proc/cpuinfo describes it (on other systems: ``platform``'s name, no flags)."""

    model: str
    flags: frozenset[str]
    physical_cores: int

    @property
    def features(self) -> list[str]:
        """The precision-deciding flags it has, in ``FEATURES`` order: ["avx2", "avx512f", ...]."""
        return [name for name in FEATURES if name in self.flags]

    @property
    def native_bf16(self) -> bool:
        return bool(BF16_FLAGS & self.flags)

    @property
    def native_int8(self) -> bool:
        return bool(INT8_FLAGS & self.flags)


def parse_cpuinfo(text: str) -> Cpu:
    """A ``Cpu`` from the text of /proc/cpuinfo: the first processor's model name and flags
    ("Features" on ARM), and the physical cores (distinct physical id / core id pairs; hyper-threads
    counted once; ``os.cpu_count()`` where the text doesn't say).

    >>> parse_cpuinfo("model name : Xeon\\nflags : fpu avx2 amx_bf16\\n").native_bf16
    True
    """
    model, flags, cores, physical = "", None, set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name" and not model:
            model = value
        elif key in ("flags", "Features") and flags is None:
            flags = frozenset(value.split())
        elif key == "physical id":
            physical = value
        elif key == "core id":
            cores.add((physical, value))
    return Cpu(
        model=model or platform.processor() or platform.machine(),
        flags=flags or frozenset(),
        physical_cores=len(cores) or os.cpu_count() or 1,
    )


@functools.cache
def cpu() -> Cpu:
    """This machine's CPU (read once a process)."""
    try:
        with open("/proc/cpuinfo") as handle:
            return parse_cpuinfo(handle.read())
    except OSError:
        return parse_cpuinfo("")


def physical_cores() -> int:
    """Physical CPU cores (hyper-threads counted once) from /proc/cpuinfo; ``os.cpu_count()`` elsewhere."""
    return cpu().physical_cores


def has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512_BF16 or AMX-BF16), rather than emulating it."""
    return cpu().native_bf16


def _run(command: list[str], timeout: float = 10) -> str | None:
    """stdout of ``command``, or None when it is missing, fails or hangs."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


@functools.cache
def _nvidia_smi() -> str:
    # Once a process: a CPU machine pays one failed call, whoever asks (the backend's default, the
    # unseen-GPU warning, doctor, the latency table).
    return _run(GPU_QUERY) or ""


def gpu_details() -> list[dict]:
    """Name, memory (MiB) and driver of each GPU ``nvidia-smi`` lists; [] without nvidia-smi or a GPU.

    >>> gpu_details()  # on an H200 machine  # doctest: +SKIP
    [{'name': 'NVIDIA H200', 'memory_mib': 143771, 'driver': '570.124.06'}]
    """
    gpus = []
    for line in _nvidia_smi().splitlines():
        parts = [part.strip() for part in line.rsplit(",", 2)]  # a comma in a name stays in the name
        if len(parts) == 3 and parts[0]:
            memory = int(parts[1]) if parts[1].isdigit() else parts[1]
            gpus.append({"name": parts[0], "memory_mib": memory, "driver": parts[2]})
    return gpus


def list_gpus() -> list[str]:
    """The names of the GPUs ``nvidia-smi`` lists, one per GPU ("NVIDIA H200", ...); [] without one."""
    return [gpu["name"] for gpu in gpu_details()]


def gpu_found() -> bool:
    """Whether ``nvidia-smi`` lists a GPU. Cheap: no JAX or TensorFlow import."""
    return bool(gpu_details())


def versions(packages: tuple[str, ...] = PACKAGES) -> dict:
    """Installed versions of ``packages`` (absent ones left out); "python" is the interpreter's."""
    found = {}
    for package in packages:
        if package == "python":
            found[package] = platform.python_version()
            continue
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[package] = importlib.metadata.version(package)
    return found


def facts(threads: int | None = None) -> dict:
    """What timings were measured on: CPU model, cores, GPU, library versions, thread settings."""
    names = list_gpus()
    return {
        "cpu": cpu().model,
        "cores": os.cpu_count(),
        "gpu": names[0] if names else "none",
        "versions": versions(FACT_PACKAGES),
        "threads": threads or "ONNX Runtime's own count (one per physical core where spinning is off)",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
    }


# ONNX Runtime's two packages install one module folder, `onnxruntime`: exactly one may be installed.
# kbench's extras hold one each (`kbench[cpu]`, `kbench[cuda]`); these say how to get back to one.
ONNXRUNTIME_PACKAGES = ("onnxruntime", "onnxruntime-gpu")
ONNXRUNTIME_FIX = (
    "pip uninstall -y onnxruntime onnxruntime-gpu, then pip install 'kbench[cpu]' (or 'kbench[cuda]' on a "
    "GPU machine), or run `make install`"
)


def onnxruntime_packages() -> list[str]:
    """Which of ONNX Runtime's packages are installed (they share the module ``onnxruntime``)."""
    import importlib.metadata

    installed = []
    for package in ONNXRUNTIME_PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            importlib.metadata.version(package)
            installed.append(package)
    return installed


def onnxruntime_module():
    """The ``onnxruntime`` module, or KbenchError in one line that says the fix: where neither package
    is installed, where both are (each install overwrote the other's files in the one folder, and
    removing one breaks the other), or where the module can't be imported (a folder left half-removed)."""
    packages = onnxruntime_packages()
    if len(packages) > 1:
        raise KbenchError(f"both onnxruntime and onnxruntime-gpu are installed in one module folder: {ONNXRUNTIME_FIX}")
    try:
        import onnxruntime
    except ImportError as error:
        if not packages:
            raise KbenchError(f"ONNX Runtime is not installed: {ONNXRUNTIME_FIX.split(', then ', 1)[1]}") from None
        raise KbenchError(f"ONNX Runtime can't be imported ({first_line(error, 120)}): {ONNXRUNTIME_FIX}") from None
    return onnxruntime


def device_name(device: str) -> str:
    """One name per card, whichever library names it: ``gpu:N`` for the N-th GPU this process sees
    (JAX's ``cuda:0`` / ``gpu:0``, TensorFlow's ``/device:GPU:0``, ONNX Runtime's device_id), ``cpu``
    for the host.

    >>> [device_name(d) for d in ("cuda:1", "/job:localhost/replica:0/task:0/device:GPU:0", "cpu:0", "CPU")]
    ['gpu:1', 'gpu:0', 'cpu', 'cpu']
    """
    text = str(device).lower().rsplit("device:", 1)[-1].strip("/")
    kind, _, index = text.partition(":")
    if kind in ("gpu", "cuda"):
        return f"gpu:{int(index or 0)}"
    return "cpu" if kind == "cpu" else text
