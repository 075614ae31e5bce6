"""Choosing the Keras backend. Keras fixes its backend on first import, so this runs before it.

The default depends on the machine: JAX where a GPU is seen, TensorFlow on a CPU-only machine,
because XLA's CPU backend trains these convolutional backbones several times slower than TensorFlow
(benchmarks/README.md, "Training on the CPU"). ``--backend`` and ``KERAS_BACKEND`` always win.
"""

from __future__ import annotations

import contextlib
import os
import sys

from kbench.core.errors import KbenchError
from kbench.core.machine import gpu_found  # nvidia-smi, asked once a process

BACKENDS = ("jax", "tensorflow")
GPU_BACKEND, CPU_BACKEND = "jax", "tensorflow"
# Measured in benchmarks/cpu_backends.py: JAX's training step / TensorFlow's on MobileNetV2,
# EfficientNet-B0 and ResNet50 at 96 and 224 px (2-core AMD EPYC, jaxlib 0.10.2).
CPU_SLOWDOWN = "2-20x"

# The backend use_backend() picked by default in this process (not asked for), and whether
# default_notice() has reported it yet.
_default_choice: dict = {}


def default_backend() -> tuple[str, str]:
    """This machine's default backend and why, ignoring ``KERAS_BACKEND``.

    >>> default_backend()  # on a machine without a GPU  # doctest: +SKIP
    ('tensorflow', 'no GPU found; JAX trains 2-20x slower than TensorFlow on CPUs; --backend jax to override')
    """
    if gpu_found():
        return GPU_BACKEND, "a GPU was found; --backend tensorflow to override"
    return CPU_BACKEND, (
        f"no GPU found; JAX trains {CPU_SLOWDOWN} slower than TensorFlow on CPUs; --backend jax to override"
    )


def choose_backend(name: str | None = None) -> tuple[str, str]:
    """The backend to use and why: ``name`` if given, else ``KERAS_BACKEND``, else the machine's default.

    Selects nothing (``use_backend`` does). An unknown name raises KbenchError.

    >>> choose_backend("jax")
    ('jax', 'asked for')
    """
    chosen, reason, _ = _choose(name)
    return chosen, reason


def _choose(name: str | None) -> tuple[str, str, bool]:
    environment = named_backend()
    if name:
        chosen, reason, by_default = name.lower(), "asked for", False
    elif environment:
        chosen, reason, by_default = environment, "KERAS_BACKEND is set", False
    else:  # nothing set, or only what use_backend() itself set as this process's default
        chosen, reason = default_backend()
        by_default = True
    if chosen not in BACKENDS:
        where = "" if name else " in KERAS_BACKEND"  # where the user can't tell where it came from
        raise KbenchError(f"unknown backend {chosen!r}{where}; choose one of: {', '.join(BACKENDS)}")
    return chosen, reason, by_default


def named_backend() -> str | None:
    """The backend ``KERAS_BACKEND`` names, when the user set it: None when it is unset or holds the
    default ``use_backend()`` chose (and wrote there) for this process."""
    environment = (os.environ.get("KERAS_BACKEND") or "").lower()
    return environment if environment and environment != _default_choice.get("name") else None


def use_backend(name: str | None = None) -> str:
    """Select the Keras backend for this process and return its name.

    ``name`` falls back to ``KERAS_BACKEND``, then to the machine's default (``default_backend``).
    Once keras is imported the backend can't change, so asking for another one then is an error
    rather than a silent mismatch.
    """
    chosen, reason, by_default = _choose(name)
    if "keras" in sys.modules:
        import keras

        current = keras.backend.backend()
        if current != chosen:
            raise KbenchError(
                f"keras is already loaded with the {current} backend in this process; run a new process to use {chosen}"
            )
    if by_default:
        _default_choice.setdefault("name", chosen)
        _default_choice.setdefault("reason", reason)
    os.environ["KERAS_BACKEND"] = chosen
    # TensorFlow's C++ start-up chatter (oneDNN, missing CUDA) hides kbench's own output.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    set_memory_policy()
    return chosen


# One GPU memory policy for every kbench process, set before any backend loads (use_backend runs
# before keras is imported; these are read when JAX or TensorFlow start). A kbench process shares
# its card: Keras rows then ONNX Runtime CUDA rows (latency, bench), a JAX process beside its
# TensorFlow conversion child (export), a Ray driver beside its tasks. Left alone, TensorFlow maps
# nearly all memory of every GPU it sees and JAX takes 75 % up front. What the user set wins.
MEMORY_POLICY = {"TF_FORCE_GPU_ALLOW_GROWTH": "true", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
COMPILATION_CACHE = "JAX_COMPILATION_CACHE_DIR"


def set_memory_policy(environ=None, gpu: bool | None = None) -> dict:
    """Set ``MEMORY_POLICY`` (and, where a GPU is listed, a JAX compilation cache folder shared by
    kbench's processes, so that each rank and each study member doesn't compile the same step again)
    in ``environ`` wherever the user hasn't; returns the variables as they now are.

    >>> set_memory_policy({}, gpu=False)
    {'TF_FORCE_GPU_ALLOW_GROWTH': 'true', 'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'}
    """
    environ = os.environ if environ is None else environ
    for name, value in MEMORY_POLICY.items():
        environ.setdefault(name, value)
    names = list(MEMORY_POLICY)
    if gpu_found() if gpu is None else gpu:
        cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kbench", "jax")
        environ.setdefault(COMPILATION_CACHE, cache)
        names.append(COMPILATION_CACHE)
    return {name: environ[name] for name in names}


@contextlib.contextmanager
def full_float32():
    """Within: this process's backend computes float32 matmuls and convolutions at full float32.

    On Ampere and newer GPUs JAX and TensorFlow use TF32 (a 10-bit mantissa) by default, about 1e-3
    relative, where kbench's checks compare Keras with float32 ONNX Runtime at 1e-4: every reference
    a check compares against (the export's parity, OpenVINO's rows, settle's sensitivity) is computed
    inside this. JAX's setting is part of its compilation key (a function compiled outside is
    compiled again inside); TensorFlow's is read by each kernel as it runs. A CPU computes float32
    anyway, so on it nothing changes but the flag."""
    backend = os.environ.get("KERAS_BACKEND")
    if "keras" in sys.modules:
        import keras

        backend = keras.backend.backend()
    if backend == "jax":
        import jax

        with jax.default_matmul_precision("highest"):
            yield
        return
    import tensorflow as tf

    before = tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_tensor_float_32_execution(False)
    try:
        yield
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(before)


def reference_precision() -> str:
    """What ``full_float32`` sets, as this process's backend has it now: "highest" (JAX) or
    "tf32 off" (TensorFlow) inside it; for tests and ``kbench doctor``."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return str(jax.config.jax_default_matmul_precision)
    import tensorflow as tf

    return "tf32 on" if tf.config.experimental.tensor_float_32_execution_enabled() else "tf32 off"


def default_notice(name: str | None = None) -> str | None:
    """Select the backend as ``use_backend(name)`` does and, when this process's backend is the
    machine's default rather than one the user asked for, return one line saying which and why; the
    first time only. Otherwise None. (The CLI selects the backend before a command runs and passes
    the result on, so a ``name`` equal to the default chosen earlier still counts as the default.)

    >>> default_notice()  # on a machine without a GPU, KERAS_BACKEND unset  # doctest: +SKIP
    'backend tensorflow (no GPU found; JAX trains 2-20x slower than TensorFlow on CPUs; --backend jax to override)'
    """
    chosen = use_backend(name)
    if _default_choice.get("name") != chosen or _default_choice.get("told"):
        return None
    _default_choice["told"] = True
    return f"backend {chosen} ({_default_choice['reason']})"
