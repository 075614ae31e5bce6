"""Choosing the Keras backend. Keras fixes its backend on first import, so this runs before it."""

from __future__ import annotations

import os
import sys

from kbench.errors import KbenchError

BACKENDS = ("jax", "tensorflow")
DEFAULT_BACKEND = "jax"


def use_backend(name: str | None = None) -> str:
    """Select the Keras backend for this process and return its name.

    ``name`` falls back to ``KERAS_BACKEND``, then to JAX. Once keras is imported the backend can't
    change, so asking for another one then is an error rather than a silent mismatch.
    """
    name = (name or os.environ.get("KERAS_BACKEND") or DEFAULT_BACKEND).lower()
    if name not in BACKENDS:
        raise KbenchError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    if "keras" in sys.modules:
        import keras

        current = keras.backend.backend()
        if current != name:
            raise KbenchError(
                f"keras is already loaded with the {current} backend in this process; "
                f"run a new process to use {name}"
            )
    os.environ["KERAS_BACKEND"] = name
    # TensorFlow's C++ start-up chatter (oneDNN, missing CUDA) hides kbench's own output.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return name
