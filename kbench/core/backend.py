"""Choosing the Keras backend. Keras fixes its backend on first import, so this runs before it.

The default depends on the machine: JAX where a GPU is seen, TensorFlow on a CPU-only machine,
because XLA's CPU backend trains these convolutional backbones several times slower than TensorFlow
(benchmarks/README.md, "Training on the CPU"). ``--backend`` and ``KERAS_BACKEND`` always win.
"""

from __future__ import annotations

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
    return chosen


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
