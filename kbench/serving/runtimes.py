"""One small class per inference runtime, behind one interface: ``prepare`` (load, compile),
``run(pixels)`` (one batch, synchronised: it returns only when the result exists on the host or the
device has finished), and ``device`` / ``detail`` for the row.

A runtime that can't run here raises ``Unavailable`` with the reason; it never falls back quietly.
"""

from __future__ import annotations

import contextlib
import io
import os

import numpy as np

from kbench.core import timing
from kbench.core.errors import KbenchError, Unavailable, first_line
from kbench.core.machine import physical_cores
from kbench.serving.openvino import OpenVinoCPU, OpenVinoCPUBf16

RUNTIMES = (
    "keras-predict",
    "keras-compiled",
    "onnxruntime-cpu",
    "openvino-cpu",
    "openvino-cpu-bf16",
    "onnxruntime-cuda",
)


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
        raise KbenchError(f"{path} is not a model ONNX Runtime can load: {first_line(error, 200)}") from None


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
        if not self.tune:
            function = candidates["tf.function"]
            self._run = lambda x: function(x).numpy()
            self.detail = "tf.function without XLA (fixed; --tune also measures tf.function+XLA)"

    def choose(self, pixels) -> None:
        """TF: time each candidate on this input (after tracing) and keep the faster one."""
        timings = {}
        for label, function in self._candidates.items():  # the warm-up call traces and compiles
            timings[label] = timing.stats(timing.time_calls(lambda f=function: f(pixels).numpy(), 3, 1))["mean_ms"]
        best = min(timings, key=timings.get)
        function = self._candidates[best]
        self._run = lambda x: function(x).numpy()
        others = ", ".join(f"{label} {ms:.1f} ms" for label, ms in timings.items())
        self.detail = f"{best} (chosen by measuring: {others})"

    def run(self, pixels):
        if self._run is None:
            self.choose(pixels)
        return self._run(pixels)


# The session options kbench's onnxruntime-cpu runs with, the same for every model so that rows compare
# like for like (benchmarks/README.md, "ONNX Runtime session options" and "kbench latency's spinning
# probe"): the quiet machine's fastest, spinning on with ONNX Runtime's own thread count (unless
# --threads is given; spinning off was 1.40x slower at batch 1 on an idle machine), denormals kept and the
# NHWC layout transformer on (neither measured to matter). On a busy machine spinning off is faster
# (0.53-0.55x: spinning threads steal the cores the work needs): OnnxRuntimeCPU(tune=True), `kbench
# latency --tune`, measures both SPINNING_CANDIDATES per model instead. ONNX Runtime's own defaults with
# OnnxRuntimeCPU(tuned=False); one setting at a time with spinning=..., denormal_as_zero=..., nhwc=...
FIXED_CPU_SETTINGS = {"denormal_as_zero": False, "nhwc": True, "spinning": True}
# Each the fastest measured in its regime: an idle machine (ONNX Runtime's defaults; its own thread count
# beat an explicit one per physical core at batch 1 in all three runs), a shared one (spinning off).
# ``threads`` None here means "the runtime's own --threads, else one per physical core".
SPINNING_CANDIDATES = {"spinning on": {"spinning": True, "threads": 0}, "spinning off": {"spinning": False}}
# How the probe measures (``kbench.core.timing.interleaved``: timed runs a block, pairs of rounds, seconds),
# and the tie: within that ratio it keeps spinning off (no faster measured, and kinder to the machine's
# other work).
SPINNING_PROBE = {"block": 3, "min_rounds": 4, "max_rounds": 8, "budget_s": 2.0, "tie": 1.03}


def probe_feed(session, image_size: tuple[int, int]) -> dict:
    """Random pixels for ``session``'s first input: its fixed dimensions, and for unknown ones the batch
    1, ``image_size`` for the height and width of a 4-D input and 3 for its channels; 1 elsewhere."""
    first = session.get_inputs()[0]
    shape = list(first.shape)
    if len(shape) == 4:
        defaults = [1, *image_size, 3]
    else:
        defaults = [1] * len(shape)
    shape = [d if isinstance(d, int) and d > 0 else default for d, default in zip(shape, defaults)]
    pixels = np.random.default_rng(0).uniform(0, 255, shape).astype(np.float32)
    return {first.name: pixels}


class OnnxRuntimeCPU(Runtime):
    """An InferenceSession with full graph optimisation, ``threads`` intra-op threads (None: ONNX
    Runtime's own count where kbench turns spinning on, else one per physical core; 0: ONNX Runtime's
    choice) and, unless ``tuned`` is False, the session options in FIXED_CPU_SETTINGS; ``spinning``,
    ``denormal_as_zero`` and ``nhwc`` (the NHWC layout transformer) override them one by one. With
    ``tune`` (and spinning not given), ``prepare`` instead opens a session for each of
    SPINNING_CANDIDATES (spinning on with ONNX Runtime's own thread count unless ``threads`` is given,
    spinning off), times them interleaved at batch 1, keeps the faster and closes the other
    (``choose_spinning``). The row's detail names the settings, and the probe's timings where there was
    one."""

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
        tune: bool = False,
    ):
        self.threads, self.parallel = threads, parallel
        chosen = dict(FIXED_CPU_SETTINGS) if tuned else {}
        if tuned and tune:
            chosen["spinning"] = "measured"
        given = {"spinning": spinning, "denormal_as_zero": denormal_as_zero, "nhwc": nhwc}
        chosen.update({key: value for key, value in given.items() if value is not None})
        self.settings = chosen
        self.fixed = tuned and chosen == FIXED_CPU_SETTINGS  # kbench's fixed settings, as they are
        if threads is None and chosen.get("spinning") is True:  # as the "spinning on" candidate
            self.threads = SPINNING_CANDIDATES["spinning on"]["threads"]
        self.probe = ""
        self.probe_medians: dict[str, float] = {}  # ms per candidate, unrounded (the detail rounds them)
        if parallel:
            self.name = self.name + "-parallel"

    @property
    def measures_spinning(self) -> bool:
        """Whether ``prepare`` chooses spinning (and with it the thread count) by measuring."""
        return self.settings.get("spinning") == "measured"

    def options(self, spinning: bool | None = None, threads: int | None = None):
        """Session options from the settings; ``spinning`` / ``threads`` override them (the probe's
        candidates). Where spinning is still to be measured and not given, it is left at ONNX Runtime's
        default."""
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = self.threads if threads is None else threads
        options.intra_op_num_threads = physical_cores() if threads is None else threads
        if self.parallel:  # independent branches (ensemble members) run concurrently
            options.execution_mode = onnxruntime.ExecutionMode.ORT_PARALLEL
        if spinning is None and self.settings.get("spinning") in (True, False):
            spinning = self.settings["spinning"]
        if spinning is not None:
            spin = "1" if spinning else "0"
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
        if self.settings.get("spinning") in (True, False):
            parts.append("spinning " + ("on" if self.settings["spinning"] else "off"))
        if "denormal_as_zero" in self.settings:
            parts.append("denormals as zero " + ("on" if self.settings["denormal_as_zero"] else "off"))
        if "nhwc" in self.settings:
            parts.append("NHWC transformer " + ("on" if self.settings["nhwc"] else "off"))
        if self.parallel:
            parts.append("parallel mode")
        if self.probe:
            return ", ".join(parts) + f" ({self.probe})"
        return ", ".join(parts) + (" (fixed; --tune measures spinning per model)" if self.fixed else "")

    def prepare(self, model, image_size):
        if self.measures_spinning:
            self.session = self.choose_spinning(model, image_size)
        else:
            self.session = onnx_session(model, [self.provider], self.options())
        self.input_name = self.session.get_inputs()[0].name
        self.detail = self.describe()

    def choose_spinning(self, path: str, image_size: tuple[int, int]):
        """Open a session per spinning candidate, time them interleaved, keep the faster one's session
        and settings (spinning off on a tie within SPINNING_PROBE["tie"]); the others are closed here.
        A file with a fixed batch above 1 is not probed (two sessions of a big model at a big batch may
        not fit in memory): spinning off, the detail says why. So is a file the probe can't run: its
        timed rows then meet the same error and report it."""
        candidates = {}
        for label, candidate in SPINNING_CANDIDATES.items():
            threads = self.threads if self.threads is not None else candidate.get("threads")
            candidates[label] = (candidate["spinning"], threads)
        self.settings["spinning"], self.threads = candidates["spinning off"]
        kept = onnx_session(path, [self.provider], self.options(*candidates["spinning off"]))
        try:
            feed = probe_feed(kept, image_size)
            batch = next(iter(feed.values())).shape[0]
        except Exception as error:
            self.probe = f"spinning not measured: {type(error).__name__}"
            return kept
        if batch > 1:
            self.probe = f"spinning not measured: the file takes batches of {batch} only"
            return kept
        sessions = {"spinning on": onnx_session(path, [self.provider], self.options(*candidates["spinning on"]))}
        sessions["spinning off"] = kept
        try:
            calls = {label: (lambda s=current: s.run(None, feed)) for label, current in sessions.items()}
            medians = timing.medians(
                timing.interleaved(
                    calls,
                    SPINNING_PROBE["max_rounds"],
                    SPINNING_PROBE["block"],
                    min_rounds=SPINNING_PROBE["min_rounds"],
                    budget_s=SPINNING_PROBE["budget_s"],
                )
            )
        except Exception as error:  # the timed runs meet the same error and report it in their row
            self.probe = f"spinning not measured: {type(error).__name__}"
            return kept
        self.probe_medians = dict(medians)
        best = min(medians, key=medians.get)
        if medians["spinning off"] <= SPINNING_PROBE["tie"] * medians[best]:
            best = "spinning off"
        self.settings["spinning"], self.threads = candidates[best]
        # two decimals, or three significant figures under 1 ms (a tiny model's 0.01 ms would round to a tie)
        timings = ", ".join(
            f"{label} {value:.2f} ms" if value >= 1 else f"{label} {value:.3g} ms" for label, value in medians.items()
        )
        self.probe = f"chosen by measuring at batch {batch}: {timings}"
        kept = sessions.pop(best)
        sessions.clear()
        return kept

    def run(self, pixels):
        return self.session.run(None, {self.input_name: pixels})


class OnnxRuntimeCUDA(OnnxRuntimeCPU):
    """CUDAExecutionProvider with IO binding: the input is copied to the GPU before the timer starts
    and outputs stay there, so host-device copies aren't counted as compute."""

    name = "onnxruntime-cuda"
    provider = "CUDAExecutionProvider"
    device = "cuda"

    def __init__(self, threads: int | None = None, *args, **kwargs):
        super().__init__(threads, *args, **kwargs)
        if kwargs.get("spinning") is None and "spinning" in self.settings:
            # the CPU threads only feed the GPU here: spinning off, one thread per physical core, unmeasured
            self.settings["spinning"], self.threads, self.fixed = False, threads, False

    def prepare(self, model, image_size):
        import onnxruntime

        if self.provider not in onnxruntime.get_available_providers():
            raise Unavailable("this onnxruntime has no CUDA provider (`make install CUDA=1` installs onnxruntime-gpu)")
        missing = preload_cuda_libraries()
        try:
            self.session = onnx_session(model, [self.provider], self.options())
        except Exception as error:
            raise Unavailable(f"CUDA session failed: {first_line(error)}") from None
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


def make_runtime(name: str, threads: int | None = None, tune: bool = False) -> Runtime:
    """The runtime ``name`` with its fixed settings, or with ``tune`` choosing some per model by
    measuring (onnxruntime-cpu's spinning, keras-compiled's XLA under TensorFlow)."""
    if name == "keras-predict":
        return KerasPredict()
    if name == "keras-compiled":
        return KerasCompiled(tune)
    if name == "onnxruntime-cpu":
        return OnnxRuntimeCPU(threads, tune=tune)
    if name == "onnxruntime-cpu-parallel":
        return OnnxRuntimeCPU(threads, parallel=True, tune=tune)
    if name == "onnxruntime-cuda":
        return OnnxRuntimeCUDA(threads)
    if name == "openvino-cpu":
        return OpenVinoCPU(threads)
    if name == "openvino-cpu-bf16":
        return OpenVinoCPUBf16(threads)
    raise ValueError(f"unknown runtime {name!r}; choose from {', '.join(RUNTIMES)}")
