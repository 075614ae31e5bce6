"""One small class per inference runtime, behind one interface: ``prepare`` (load, compile),
``run(pixels)`` (one batch, synchronised: it returns only when the result exists on the host or the
device has finished), and ``device`` / ``detail`` for the row.

A runtime that can't run here raises ``Unavailable`` with the reason; it never falls back quietly.
"""

from __future__ import annotations

import contextlib
import io
import os
import time

import numpy as np

from kbench.errors import KbenchError

RUNTIMES = ("keras-predict", "keras-compiled", "onnxruntime-cpu", "onnxruntime-cuda")


def onnx_session(path: str, providers: list[str], options=None):
    """An ONNX Runtime session over ``path``; KbenchError in one line for a missing, empty or
    corrupt file (ONNX Runtime's own message is a page of C++ context)."""
    import onnxruntime

    if not os.path.isfile(path):
        raise KbenchError(f"not found: {path}")
    if os.path.getsize(path) == 0:
        raise KbenchError(f"{path} is empty; export it again (kbench export onnx)")
    try:
        return onnxruntime.InferenceSession(path, options, providers=providers)
    except Exception as error:  # onnxruntime raises its own Fail / InvalidProtobuf / RuntimeException
        lines = [line for line in str(error).splitlines() if line.strip()]
        raise KbenchError(
            f"{path} is not a model ONNX Runtime can load: {lines[0][:200] if lines else error}"
        ) from None


class Unavailable(Exception):
    """This runtime can't serve the model on this machine; the message says why."""


class Runtime:
    name = ""
    needs = "keras"  # "keras" (a Keras model) or "onnx" (an ONNX file)
    device = "cpu"
    detail = ""

    def prepare(self, model, image_size: tuple[int, int]) -> None:
        raise NotImplementedError

    def run(self, pixels: np.ndarray):
        raise NotImplementedError


def keras_device() -> str:
    import keras

    devices = keras.distribution.list_devices()
    accelerators = [d for d in devices if not str(d).lower().startswith("cpu")]
    return str(accelerators[0] if accelerators else devices[0])


class KerasPredict(Runtime):
    """``model.predict`` on the batch, as the reference study timed it (its overhead included)."""

    name = "keras-predict"

    def prepare(self, model, image_size):
        self.model, self.device = model, keras_device()

    def run(self, pixels):
        return self.model.predict(pixels, verbose=0)


class KerasCompiled(Runtime):
    """The fastest way Keras serves the model on this backend: under JAX a ``jax.jit`` over
    ``stateless_call`` with the variables passed in; under TensorFlow a ``tf.function``, with or
    without XLA, whichever measures faster here on the first batch size prepared."""

    name = "keras-compiled"

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

            self._run = lambda pixels: forward(trainable, non_trainable, pixels).block_until_ready()
            self.detail = "jax.jit(stateless_call)"
            return
        import tensorflow as tf

        candidates = {
            "tf.function": tf.function(lambda x: model(x, training=False), jit_compile=False),
            "tf.function+XLA": tf.function(lambda x: model(x, training=False), jit_compile=True),
        }
        self._candidates = candidates
        self._run = None

    def choose(self, pixels) -> None:
        """TF: time each candidate on this input (after tracing) and keep the faster one."""
        timings = {}
        for label, function in self._candidates.items():
            function(pixels).numpy()  # trace and compile
            start = time.perf_counter()
            for _ in range(3):
                function(pixels).numpy()
            timings[label] = time.perf_counter() - start
        best = min(timings, key=timings.get)
        function = self._candidates[best]
        self._run = lambda x: function(x).numpy()
        others = ", ".join(f"{label} {1000 * s / 3:.1f} ms" for label, s in timings.items())
        self.detail = f"{best} (chosen by measuring: {others})"

    def run(self, pixels):
        if self._run is None:
            self.choose(pixels)
        return self._run(pixels)


# The session options that measured fastest for kbench's exported files on CPU (benchmarks/README.md,
# "ONNX Runtime session options"); OnnxRuntimeCPU uses them unless told otherwise (tuned=False).
TUNED_CPU_SETTINGS = {"spinning": False, "denormal_as_zero": False, "nhwc": True}


def physical_cores() -> int:
    """Physical CPU cores (hyper-threads counted once) from /proc/cpuinfo; ``os.cpu_count()`` elsewhere."""
    try:
        with open("/proc/cpuinfo") as handle:
            cores, physical = set(), "0"
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "physical id":
                    physical = value.strip()
                elif key.strip() == "core id":
                    cores.add((physical, value.strip()))
        return len(cores) or os.cpu_count() or 1
    except OSError:
        return os.cpu_count() or 1


class OnnxRuntimeCPU(Runtime):
    """An InferenceSession with full graph optimisation, ``threads`` intra-op threads (None: one per
    physical core; 0: ONNX Runtime's choice) and, unless ``tuned`` is False, the session options in
    TUNED_CPU_SETTINGS; ``spinning``, ``denormal_as_zero`` and ``nhwc`` (the NHWC layout transformer)
    override them one by one. The row's detail names the settings."""

    name = "onnxruntime-cpu"
    needs = "onnx"
    provider = "CPUExecutionProvider"

    def __init__(
        self,
        threads: int | None = None,
        parallel: bool = False,
        tuned: bool = True,
        spinning: bool | None = None,
        denormal_as_zero: bool | None = None,
        nhwc: bool | None = None,
    ):
        self.threads, self.parallel = threads, parallel
        chosen = dict(TUNED_CPU_SETTINGS) if tuned else {}
        given = {"spinning": spinning, "denormal_as_zero": denormal_as_zero, "nhwc": nhwc}
        chosen.update({key: value for key, value in given.items() if value is not None})
        self.settings = chosen
        if parallel:
            self.name = self.name + "-parallel"

    def options(self):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = physical_cores() if self.threads is None else self.threads
        if self.parallel:  # independent branches (ensemble members) run concurrently
            options.execution_mode = onnxruntime.ExecutionMode.ORT_PARALLEL
        if "spinning" in self.settings:
            spin = "1" if self.settings["spinning"] else "0"
            options.add_session_config_entry("session.intra_op.allow_spinning", spin)
            options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        if self.settings.get("denormal_as_zero"):
            options.add_session_config_entry("session.set_denormal_as_zero", "1")
        if self.settings.get("nhwc") is False:
            options.add_session_config_entry("optimization.disable_specified_optimizers", "NhwcTransformer")
        return options

    def describe(self) -> str:
        threads = {None: f"{physical_cores()} (physical cores)", 0: "ONNX Runtime's default"}.get(
            self.threads, str(self.threads)
        )
        parts = [f"intra-op threads {threads}"]
        if "spinning" in self.settings:
            parts.append("spinning " + ("on" if self.settings["spinning"] else "off"))
        if "denormal_as_zero" in self.settings:
            parts.append("denormals as zero " + ("on" if self.settings["denormal_as_zero"] else "off"))
        if "nhwc" in self.settings:
            parts.append("NHWC transformer " + ("on" if self.settings["nhwc"] else "off"))
        if self.parallel:
            parts.append("parallel mode")
        return ", ".join(parts)

    def prepare(self, model, image_size):
        self.session = onnx_session(model, [self.provider], self.options())
        self.input_name = self.session.get_inputs()[0].name
        self.detail = self.describe()

    def run(self, pixels):
        return self.session.run(None, {self.input_name: pixels})


class OnnxRuntimeCUDA(OnnxRuntimeCPU):
    """CUDAExecutionProvider with IO binding: the input is copied to the GPU before the timer starts
    and outputs stay there, so host-device copies aren't counted as compute."""

    name = "onnxruntime-cuda"
    provider = "CUDAExecutionProvider"
    device = "cuda"

    def prepare(self, model, image_size):
        import onnxruntime

        if self.provider not in onnxruntime.get_available_providers():
            raise Unavailable("this onnxruntime has no CUDA provider (`make install CUDA=1` installs onnxruntime-gpu)")
        missing = preload_cuda_libraries()
        try:
            self.session = onnx_session(model, [self.provider], self.options())
        except Exception as error:
            raise Unavailable(f"CUDA session failed: {str(error).splitlines()[0]}") from None
        if self.session.get_providers()[0] != self.provider:
            raise Unavailable(
                "CUDA provider could not be initialised (no GPU, or missing CUDA 12/cuDNN 9 libraries"
                + (f": {missing})" if missing else ")")
            )
        self.input_name = self.session.get_inputs()[0].name
        self.device = f"cuda:{os.environ.get('CUDA_VISIBLE_DEVICES', '0').split(',')[0]}"
        self.detail = "IO binding"
        self._bound = None

    def run(self, pixels):
        import onnxruntime

        if self._bound is None or self._bound[0] is not pixels:
            binding = self.session.io_binding()
            value = onnxruntime.OrtValue.ortvalue_from_numpy(pixels, "cuda", 0)
            binding.bind_ortvalue_input(self.input_name, value)
            for output in self.session.get_outputs():
                binding.bind_output(output.name, "cuda")
            self._bound = (pixels, binding, value)
        binding = self._bound[1]
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()


def preload_cuda_libraries() -> str:
    """Load the CUDA and cuDNN libraries of the ``nvidia-*`` wheels for onnxruntime-gpu, which the
    dynamic loader doesn't find by itself (ONNX Runtime >= 1.21; a no-op for the CPU package).
    ONNX Runtime prints its failures; they are kept out of stdout and the first is returned ("" if none)."""
    import onnxruntime

    if not hasattr(onnxruntime, "preload_dlls"):
        return ""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        try:
            onnxruntime.preload_dlls()
        except Exception as error:  # a missing folder: the session below says what that costs
            print(f"Failed to preload: {error}")
    failures = [line for line in printed.getvalue().splitlines() if line.startswith("Failed")]
    return failures[0] if failures else ""


def make_runtime(name: str, threads: int | None = None) -> Runtime:
    if name == "keras-predict":
        return KerasPredict()
    if name == "keras-compiled":
        return KerasCompiled()
    if name == "onnxruntime-cpu":
        return OnnxRuntimeCPU(threads)
    if name == "onnxruntime-cpu-parallel":
        return OnnxRuntimeCPU(threads, parallel=True)
    if name == "onnxruntime-cuda":
        return OnnxRuntimeCUDA(threads)
    raise ValueError(f"unknown runtime {name!r}; choose from {', '.join(RUNTIMES)}")
