"""``kbench doctor``: what kbench can use here. The facts of the machine (versions, the GPUs
``nvidia-smi`` lists) come from kbench.core.machine; this module probes what JAX, TensorFlow and ONNX
Runtime each see, and gives a warning with the fix for every GPU that one of them leaves unused.

Keras fixes its backend once per process, so ``diagnose`` asks each library in a subprocess of its
own (with a timeout: a broken driver can hang CUDA's start). ``gpu_warning`` is the cheap form that
the CLI prints before ``train``, ``latency`` and ``bench`` (kbench.cli.options): it looks further only
when ``nvidia-smi`` lists a GPU. The CLI side only: library code never imports this module.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time

from kbench.core import machine
from kbench.core.errors import KbenchError, first_line
from kbench.core.machine import ONNXRUNTIME_FIX, onnxruntime_packages

FIX = "run `make install CUDA=1`"
# JAX's documented minimum for its CUDA 12 wheels; TensorFlow 2.21 and onnxruntime-gpu 1.26 are
# CUDA 12 builds too (see pyproject.toml).
MIN_DRIVER = (525, 60, 13)
PROBE_SECONDS = 120
# TensorFlow's CUDA 12 build carries only PTX for Hopper (compute capability 9.x); a driver older than
# R555 can't compile that PTX, so TensorFlow fails or falls back on such a card.
HOPPER_TF_DRIVER = 555


def probe_jax() -> dict:
    """JAX's version and devices ("gpu:0" ...); with only a CPU, why JAX has no GPU."""
    import jax

    devices = jax.devices()
    result = {
        "version": jax.__version__,
        "devices": [{"id": f"{d.platform}:{d.id}", "kind": d.device_kind} for d in devices],
    }
    if all(d.platform == "cpu" for d in devices):
        try:
            jax.devices("gpu")
        except RuntimeError as error:
            result["note"] = first_line(error)
    return result


def probe_tensorflow() -> dict:
    """TensorFlow's version, physical devices ("gpu:0" ...) and the CUDA it was built for."""
    import tensorflow as tf

    devices = []
    for device in tf.config.list_physical_devices():
        entry = {"id": f"{device.device_type.lower()}:{device.name.rsplit(':', 1)[-1]}"}
        if device.device_type == "GPU":
            entry["kind"] = tf.config.experimental.get_device_details(device).get("device_name", "")
        devices.append(entry)
    build = tf.sysconfig.get_build_info()
    return {"version": tf.__version__, "devices": devices, "cuda_build": build.get("cuda_version")}


def probe_onnxruntime(session: bool = True) -> dict:
    """ONNX Runtime's version and providers; with ``session``, whether a CUDA session really starts
    (onnxruntime-gpu lists the CUDA provider even where its libraries or the GPU are missing)."""
    import onnxruntime

    providers = onnxruntime.get_available_providers()
    result = {"version": onnxruntime.__version__, "packages": onnxruntime_packages(), "providers": providers}
    if session and "CUDAExecutionProvider" in providers:
        result["cuda"] = cuda_session_status()
    return result


def cuda_session_status() -> str:
    """ "ok" if ONNX Runtime runs a one-node graph on its CUDA provider, else "failed: why"."""
    import onnxruntime
    from onnx import TensorProto, helper

    from kbench.serving.onnx_runtime import preload_cuda_libraries

    missing = preload_cuda_libraries()
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    try:
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own pybind types
        return f"failed: {first_line(error)}"
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return "failed: the CUDA provider fell back to the CPU" + (f" ({missing})" if missing else "")
    return "ok"


PROBES = {"jax": probe_jax, "tensorflow": probe_tensorflow, "onnxruntime": probe_onnxruntime}


def _probe_command(name: str) -> list[str]:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = (
        f"import sys; sys.path.insert(0, {root!r}); from kbench.cli.doctor import _print_probe; _print_probe({name!r})"
    )
    return [sys.executable, "-c", code]


def _print_probe(name: str) -> None:
    """Subprocess entry: one probe's result as one JSON line on stdout."""
    with contextlib.redirect_stdout(io.StringIO()):  # libraries' own chatter stays out of the JSON
        try:
            result = PROBES[name]()
        except ImportError as error:
            result = {"error": f"not installed ({error})"}
        except Exception as error:
            result = {"error": first_line(error, named=True)}
    print(json.dumps(result))


def run_probes(names=tuple(PROBES), timeout: float = PROBE_SECONDS) -> dict:
    """Each probe in its own subprocess, all at once; a probe that fails or hangs gets {"error": ...}."""
    environment = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "TF_CPP_MIN_LOG_LEVEL": "2"}
    running = {
        name: subprocess.Popen(
            _probe_command(name), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment
        )
        for name in names
    }
    results, deadline = {}, time.monotonic() + timeout
    for name, process in running.items():
        try:
            stdout, stderr = process.communicate(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            results[name] = {"error": f"no answer within {timeout:g} s"}
            continue
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        if process.returncode == 0 and lines:
            results[name] = json.loads(lines[-1])
        else:
            last = [line for line in stderr.splitlines() if line.strip()]
            why = first_line(last[-1]) if last else "no message"
            results[name] = {"error": f"exit code {process.returncode}: {why}"}
    return results


def _sees_gpu(probe: dict) -> bool:
    return any(not device["id"].startswith("cpu") for device in probe.get("devices", []))


def _driver_too_old(driver: str) -> bool:
    try:
        return tuple(int(part) for part in driver.split(".")) < MIN_DRIVER
    except ValueError:
        return False


def gpus_hidden(backend: str | None = None) -> bool:
    """The user chose the CPU on purpose: CUDA_VISIBLE_DEVICES empty or -1, or (JAX) JAX_PLATFORMS
    without cuda/gpu."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return True
    platforms = os.environ.get("JAX_PLATFORMS", "").lower()
    return backend == "jax" and bool(platforms) and "cuda" not in platforms and "gpu" not in platforms


def gpu_warnings(
    gpus: list[str],
    jax: dict | None = None,
    tensorflow: dict | None = None,
    onnxruntime: dict | None = None,
    drivers: list[str] = (),
    compute_capabilities: list[str] = (),
) -> list[str]:
    """One warning with its fix for each problem: a GPU that ``nvidia-smi`` lists (``gpus``: names)
    and a backend or ONNX Runtime doesn't see, an old driver, ONNX Runtime missing or installed
    twice. Probe results as ``probe_jax`` etc. return them; None: not asked.

    >>> gpu_warnings(["NVIDIA H200"], jax={"devices": [{"id": "cpu:0"}]})
    ['nvidia-smi lists NVIDIA H200 but JAX sees only CPU: run `make install CUDA=1`']
    """
    warnings = []
    packages = (onnxruntime or {}).get("packages", [])
    if onnxruntime is not None and onnxruntime.get("error", "").startswith("not installed"):
        warnings.append(f"ONNX Runtime is not installed: {ONNXRUNTIME_FIX.split(', then ', 1)[1]}")
    elif onnxruntime is not None and "error" in onnxruntime:
        warnings.append(f"ONNX Runtime did not start: {onnxruntime['error']}")
    if len(packages) > 1:
        warnings.append(f"both onnxruntime and onnxruntime-gpu are installed and share one module: {ONNXRUNTIME_FIX}")
    if not gpus:
        return warnings
    listed = gpus[0] if len(set(gpus)) == 1 and len(gpus) == 1 else f"{len(gpus)} GPUs ({', '.join(sorted(set(gpus)))})"
    old = [driver for driver in drivers if _driver_too_old(driver)]
    if old:
        warnings.append(
            f"the NVIDIA driver {old[0]} is older than the CUDA 12 builds need "
            f"({'.'.join(map(str, MIN_DRIVER))} or newer): update the driver"
        )
    hopper = [c for c in compute_capabilities if c.startswith("9.")]
    too_old = [d for d in drivers if d.split(".")[0].isdigit() and int(d.split(".")[0]) < HOPPER_TF_DRIVER]
    if tensorflow is not None and "error" not in tensorflow and hopper and too_old:
        warnings.append(
            f"TensorFlow's CUDA 12 build has only PTX for compute capability {hopper[0]} and the driver "
            f"{too_old[0]} is older than R{HOPPER_TF_DRIVER}: update the driver, or use --backend jax"
        )
    for name, probe in (("JAX", jax), ("TensorFlow", tensorflow)):
        if probe is None:
            continue
        if "error" in probe:
            warnings.append(f"nvidia-smi lists {listed} but {name} did not start: {probe['error']}")
        elif not _sees_gpu(probe):
            note = f" ({probe['note']})" if probe.get("note") else ""
            warnings.append(f"nvidia-smi lists {listed} but {name} sees only CPU{note}: {FIX}")
    if onnxruntime is not None and "error" not in onnxruntime:
        if "CUDAExecutionProvider" not in onnxruntime.get("providers", []):
            warnings.append(
                f"nvidia-smi lists {listed} but ONNX Runtime has no CUDA provider (the CPU package is installed): {FIX}"
            )
        elif onnxruntime.get("cuda", "ok") != "ok":
            warnings.append(
                f"nvidia-smi lists {listed} but ONNX Runtime's CUDA provider did not start "
                f"({onnxruntime['cuda']}): {FIX} (CUDA 12 and cuDNN 9 libraries)"
            )
    return warnings


def diagnose(timeout: float = PROBE_SECONDS) -> dict:
    """Everything ``kbench doctor`` reports, as one JSON-ready dict: versions, gpus (nvidia-smi),
    jax / tensorflow / onnxruntime (what each sees, probed in subprocesses) and warnings."""
    from kbench.core.backend import choose_backend

    choose_backend()  # KERAS_BACKEND=bogus: refused in one line as every command does, before probing
    gpus = machine.gpu_details()
    probes = run_probes(timeout=timeout)
    hidden = gpus_hidden()
    capabilities = (machine._run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"]) or "").split()
    warnings = gpu_warnings(
        [] if hidden else [gpu["name"] for gpu in gpus],
        drivers=[g["driver"] for g in gpus],
        compute_capabilities=[] if hidden else capabilities,
        **probes,
    )
    return {
        "versions": machine.versions(),
        "gpus": gpus,
        **probes,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "warnings": warnings,
    }


def format_doctor(report: dict) -> str:
    """``diagnose``'s report as lines of text."""
    found = report["versions"]
    lines = ["versions: " + ", ".join(f"{name} {version}" for name, version in found.items())]
    gpus = report["gpus"]
    lines.append(
        "GPUs (nvidia-smi): "
        + ("; ".join(f"{g['name']}, {g['memory_mib']} MiB, driver {g['driver']}" for g in gpus) if gpus else "none")
    )
    for key, label in (("jax", "JAX"), ("tensorflow", "TensorFlow")):
        probe = report.get(key, {})
        if "error" in probe:
            lines.append(f"{label}: {probe['error']}")
            continue
        devices = ", ".join(
            d["id"] + (f" ({d['kind']})" if d.get("kind") and d["kind"] != "cpu" else "")
            for d in probe.get("devices", [])
        )
        extra = f" (built for CUDA {probe['cuda_build']})" if probe.get("cuda_build") else ""
        extra += f"; {probe['note']}" if probe.get("note") and gpus else ""  # why no GPU, where one is listed
        lines.append(f"{label} sees: {devices}{extra}")
    runtime = report.get("onnxruntime", {})
    if "error" in runtime:
        lines.append(f"ONNX Runtime: {runtime['error']}")
    else:
        cuda = f"; CUDA session: {runtime['cuda']}" if "cuda" in runtime else ""
        lines.append(
            f"ONNX Runtime ({', '.join(runtime.get('packages', [])) or '?'}) providers: "
            f"{', '.join(runtime.get('providers', []))}{cuda}"
        )
    if report.get("cuda_visible_devices") is not None:
        lines.append(f"CUDA_VISIBLE_DEVICES={report['cuda_visible_devices']}")
    lines += [f"warning: {warning}" for warning in report["warnings"]] or ["no warnings"]
    return "\n".join(lines)


def gpu_warning(backend: str) -> str | None:
    """The warning for this process's backend and ONNX Runtime, or None: checked in-process and only
    when ``nvidia-smi`` lists a GPU (and the user hasn't hidden it), so a CPU machine pays the one
    ``nvidia-smi`` call kbench.core.machine makes a process."""
    gpus = machine.list_gpus()
    if not gpus or gpus_hidden(backend):
        return None
    from kbench.training.distributed import cluster_from_environment

    try:
        clustered = cluster_from_environment() is not None
    except KbenchError:  # half set: the training command says what is wrong; JAX stays untouched here
        clustered = True
    seen = {}
    # On a cluster jax.distributed.initialize() must come before JAX's first device query.
    if not (backend == "jax" and clustered):
        try:
            seen[backend] = PROBES[backend]()
        except Exception as error:
            seen[backend] = {"error": first_line(error, named=True)}
    try:
        seen["onnxruntime"] = probe_onnxruntime(session=False)
    except ImportError as error:
        seen["onnxruntime"] = {"error": str(error)}
    return "; ".join(gpu_warnings(gpus, **seen)) or None
