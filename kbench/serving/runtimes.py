"""One small class per inference runtime, behind one interface: ``prepare`` (load, compile),
``run(pixels)`` (one batch, synchronised: it returns only when the result exists on the host or the
device has finished), and ``device`` / ``detail`` for the row.

A runtime that can't run here raises ``Unavailable`` with the reason; it never falls back quietly.
Here: the interface, the two Keras runtimes and ``make_runtime``; ONNX Runtime's are in
``kbench.serving.onnx_runtime``, OpenVINO's in ``kbench.serving.openvino``. Every row is timed host to
host (``kbench.core.timing.HOST_TO_HOST``).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from kbench.core import timing
from kbench.core.machine import device_name
from kbench.core.timing import timed_on
from kbench.serving.onnx_runtime import FIXED_CPU_SETTINGS, MEASURED_CPU_SETTINGS, OnnxRuntimeCPU, OnnxRuntimeCUDA
from kbench.serving.openvino import OpenVinoCPU, OpenVinoCPUBf16

RUNTIMES = (
    "keras-predict",
    "keras-compiled",
    "onnxruntime-cpu",
    "openvino-cpu",
    "openvino-cpu-bf16",
    "onnxruntime-cuda",
)


class Runtime(Protocol):
    """What every runtime has: the Keras runtimes here subclass it; ONNX Runtime's and OpenVINO's
    only match it (their modules don't import this one, which imports them)."""

    name: str = ""
    needs: str = "keras"  # "keras" (a Keras model) or "onnx" (an ONNX file)
    device: str = "cpu"
    detail: str = ""

    def prepare(self, model, image_size: tuple[int, int]) -> None: ...

    def run(self, pixels: np.ndarray): ...


def keras_device() -> str:
    import keras

    devices = keras.distribution.list_devices()
    accelerators = [d for d in devices if not str(d).lower().startswith("cpu")]
    return device_name(accelerators[0] if accelerators else devices[0])


class KerasPredict(Runtime):
    """``model.predict`` on the batch, as the reference study timed it (its overhead included)."""

    name = "keras-predict"

    def prepare(self, model, image_size):
        self.model, self.device = model, keras_device()
        self.detail = timed_on(self.device, "model.predict, its overhead included")

    def run(self, pixels):
        return self.model.predict(pixels, verbose=0)


class KerasCompiled(Runtime):
    """The fastest way Keras serves the model on this backend: under JAX a ``jax.jit`` over
    ``stateless_call`` with the variables passed in; under TensorFlow a ``tf.function`` without XLA
    (XLA measured slower on CPUs for every backbone: benchmarks/README.md), or with ``tune`` with or
    without XLA, whichever measures faster here on the first batch size prepared."""

    name = "keras-compiled"

    def __init__(self, tune: bool = False):
        self.tune = tune

    def prepare(self, model, image_size):
        import keras

        self.device = keras_device()
        if keras.backend.backend() == "jax":
            import jax
            import jax.numpy as jnp

            # Copies: keras' own predict donates the variables' buffers, which would invalidate ours.
            trainable = [jnp.array(v.value) for v in model.trainable_variables]
            non_trainable = [jnp.array(v.value) for v in model.non_trainable_variables]

            @jax.jit
            def forward(trainable, non_trainable, pixels):
                return model.stateless_call(trainable, non_trainable, pixels, training=False)[0]

            # host to host, as every row: the pixels' copy in and the output's copy out are timed
            self._run = lambda pixels: np.asarray(forward(trainable, non_trainable, pixels))
            self.detail = timed_on(self.device, "jax.jit(stateless_call)")
            return
        import tensorflow as tf

        candidates = {
            "tf.function": tf.function(lambda x: model(x, training=False), jit_compile=False),
            "tf.function+XLA": tf.function(lambda x: model(x, training=False), jit_compile=True),
        }
        self._candidates = candidates
        self._run = None
        if not self.tune:
            function = candidates["tf.function"]
            self._run = lambda x: function(x).numpy()
            self.detail = timed_on(self.device, "tf.function without XLA (fixed; --tune also measures tf.function+XLA)")

    def choose(self, pixels) -> None:
        """TF: time each candidate on this input (after tracing) and keep the faster one."""
        timings = {}
        for label, function in self._candidates.items():  # the warm-up call traces and compiles
            timings[label] = timing.stats(timing.time_calls(lambda f=function: f(pixels).numpy(), 3, 1))["mean_ms"]
        best = min(timings, key=timings.get)
        function = self._candidates[best]
        self._run = lambda x: function(x).numpy()
        others = ", ".join(f"{label} {ms:.1f} ms" for label, ms in timings.items())
        self.detail = timed_on(self.device, f"{best} (chosen by measuring: {others})")

    def run(self, pixels):
        if self._run is None:
            self.choose(pixels)
        return self._run(pixels)


def make_runtime(name: str, threads: int | None = None, tune: bool = False) -> Runtime:
    """The runtime ``name`` with its fixed settings, or with ``tune`` choosing some per model by
    measuring (onnxruntime-cpu's spinning, keras-compiled's XLA under TensorFlow)."""
    if name == "keras-predict":
        return KerasPredict()
    if name == "keras-compiled":
        return KerasCompiled(tune)
    settings = MEASURED_CPU_SETTINGS if tune else FIXED_CPU_SETTINGS
    if name == "onnxruntime-cpu":
        return OnnxRuntimeCPU(threads, settings=settings)
    if name == "onnxruntime-cpu-parallel":
        return OnnxRuntimeCPU(threads, parallel=True, settings=settings)
    if name == "onnxruntime-cuda":
        return OnnxRuntimeCUDA(threads)
    if name == "openvino-cpu":
        return OpenVinoCPU(threads)
    if name == "openvino-cpu-bf16":
        return OpenVinoCPUBf16(threads)
    raise ValueError(f"unknown runtime {name!r}; choose from {', '.join(RUNTIMES)}")
