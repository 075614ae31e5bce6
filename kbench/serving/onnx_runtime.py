"""ONNX Runtime's two runtimes, ``onnxruntime-cpu`` (``OnnxRuntimeCPU``: its session settings are
``CpuSettings``, fixed or with spinning measured per model) and ``onnxruntime-cuda`` (``OnnxRuntimeCUDA``:
IO binding, timed host to host), and ``onnx_session``, how kbench opens any ONNX file. They have
``kbench.serving.runtimes.Runtime``'s interface without being its subclass (as OpenVINO's), so that
the registry there imports them and not the other way round.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections import Counter
from dataclasses import asdict, dataclass, replace

import numpy as np

from kbench.core import files, timing
from kbench.core.errors import KbenchError, Unavailable, first_line
from kbench.core.machine import device_name, onnxruntime_module, physical_cores
from kbench.core.timing import HOST_TO_HOST


def onnx_session(path: str, providers: list[str], options=None):
    """An ONNX Runtime session over ``path``; KbenchError in one line for a missing, empty or
    corrupt file (ONNX Runtime's own message is a page of C++ context)."""
    onnxruntime = onnxruntime_module()

    if not os.path.isfile(path):
        raise KbenchError(f"not found: {path}")
    if os.path.getsize(path) == 0:
        raise KbenchError(f"{path} is empty; export it again (kbench export onnx)")
    try:
        return onnxruntime.InferenceSession(path, options, providers=providers)
    except Exception as error:  # onnxruntime raises its own Fail / InvalidProtobuf / RuntimeException
        raise KbenchError(f"{path} is not a model ONNX Runtime can load: {first_line(error, 200)}") from None


@dataclass(frozen=True)
class CpuSettings:
    """ONNX Runtime's CPU session settings, each None for ONNX Runtime's own default: ``spinning``
    (intra- and inter-op threads spin between runs; on by default), ``denormal_as_zero`` (off) and
    ``nhwc`` (the NHWC layout transformer; on). ``measure_spinning``: spinning is chosen per model by
    timing both candidates (``OnnxRuntimeCPU.choose_spinning``); it leaves ``spinning`` unset.

    >>> CpuSettings(spinning=True, measure_spinning=True)
    Traceback (most recent call last):
    ...
    ValueError: spinning is either given or measured, not both
    """

    spinning: bool | None = None
    denormal_as_zero: bool | None = None
    nhwc: bool | None = None
    measure_spinning: bool = False

    def __post_init__(self):
        if self.measure_spinning and self.spinning is not None:
            raise ValueError("spinning is either given or measured, not both")

    def describe(self) -> list[str]:
        """The settings set, as the row's detail names them."""
        parts = []
        for name, value in (
            ("spinning", self.spinning),
            ("denormals as zero", self.denormal_as_zero),
            ("NHWC transformer", self.nhwc),
        ):
            if value is not None:
                parts.append(f"{name} {'on' if value else 'off'}")
        return parts


# The settings kbench's onnxruntime-cpu runs with, the same for every model so that rows compare like
# for like (benchmarks/README.md, "ONNX Runtime session options" and "kbench latency's spinning probe"):
# the quiet machine's fastest, spinning on with ONNX Runtime's own thread count (unless --threads is
# given; spinning off was 1.40x slower at batch 1 on an idle machine), denormals kept and the NHWC layout
# transformer on (neither measured to matter). On a busy machine spinning off is faster (0.53-0.55x:
# spinning threads steal the cores the work needs): MEASURED_CPU_SETTINGS, `kbench latency --tune`,
# measures both SPINNING_CANDIDATES per model instead. ONNX Runtime's own defaults: CpuSettings().
FIXED_CPU_SETTINGS = CpuSettings(spinning=True, denormal_as_zero=False, nhwc=True)
MEASURED_CPU_SETTINGS = CpuSettings(denormal_as_zero=False, nhwc=True, measure_spinning=True)


@dataclass(frozen=True)
class SpinningCandidate:
    spinning: bool
    threads: int | None = None  # None: the runtime's own --threads, else one per physical core; 0: ONNX Runtime's


# Each the fastest measured in its regime: an idle machine (ONNX Runtime's defaults; its own thread count
# beat an explicit one per physical core at batch 1 in all three runs), a shared one (spinning off).
SPINNING_CANDIDATES = {"spinning on": SpinningCandidate(True, threads=0), "spinning off": SpinningCandidate(False)}
# How the probe times them (batch 1, interleaved), and the tie: within that ratio it keeps spinning off
# (no faster measured, and kinder to the machine's other work).
SPINNING_PROBE = timing.Plan(block=3, min_rounds=4, max_rounds=8, budget_s=2.0)
SPINNING_TIE = 1.03


def cpu_settings_record() -> dict:
    """The CPU settings as plain values, as the study keys its saved timings by them (unchanged in form
    since the settings were dicts, so timings saved then are still reused)."""
    return {
        **{key: value for key, value in asdict(FIXED_CPU_SETTINGS).items() if key != "measure_spinning"},
        "spinning_candidates": {
            label: {key: value for key, value in asdict(candidate).items() if value is not None}
            for label, candidate in SPINNING_CANDIDATES.items()
        },
        "spinning_probe": {**asdict(SPINNING_PROBE), "tie": SPINNING_TIE},
    }


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


class OnnxRuntimeCPU:
    """An InferenceSession with full graph optimisation, ``threads`` intra-op threads (None: ONNX
    Runtime's own count where spinning is on, else one per physical core; 0: ONNX Runtime's choice) and
    ``settings`` (FIXED_CPU_SETTINGS unless given). Where the settings measure spinning, ``prepare``
    instead opens a session for each of SPINNING_CANDIDATES, times them interleaved at batch 1, keeps the
    faster and closes the other (``choose_spinning``). The row's detail names the settings, and the
    probe's timings where there was one."""

    name = "onnxruntime-cpu"
    needs = "onnx"
    device = "cpu"
    detail = ""
    provider = "CPUExecutionProvider"

    def __init__(self, threads: int | None = None, parallel: bool = False, settings: CpuSettings = FIXED_CPU_SETTINGS):
        self.threads, self.parallel, self.settings = threads, parallel, settings
        self.given_threads = threads  # --threads; the probe's candidates keep it
        self.fixed = settings == FIXED_CPU_SETTINGS  # kbench's fixed settings, as they are
        if threads is None and settings.spinning:  # as the "spinning on" candidate
            self.threads = SPINNING_CANDIDATES["spinning on"].threads
        self.probe = ""
        self.probe_medians: dict[str, float] = {}  # ms per candidate, unrounded (the detail rounds them)
        if parallel:
            self.name = self.name + "-parallel"

    def options(self, candidate: SpinningCandidate | None = None):
        """Session options from the settings, or with a probe candidate's spinning and threads. Where
        spinning is still to be measured and no candidate is given, it is left at ONNX Runtime's default."""
        onnxruntime = onnxruntime_module()
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads, spinning = self.threads, self.settings.spinning
        if candidate is not None:
            spinning = candidate.spinning
            threads = self.given_threads if self.given_threads is not None else candidate.threads
        options.intra_op_num_threads = physical_cores() if threads is None else threads
        if self.parallel:  # independent branches (ensemble members) run concurrently
            options.execution_mode = onnxruntime.ExecutionMode.ORT_PARALLEL
        if spinning is not None:
            spin = "1" if spinning else "0"
            options.add_session_config_entry("session.intra_op.allow_spinning", spin)
            options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        if self.settings.denormal_as_zero:
            options.add_session_config_entry("session.set_denormal_as_zero", "1")
        if self.settings.nhwc is False:
            options.add_session_config_entry("optimization.disable_specified_optimizers", "NhwcTransformer")
        return options

    def describe(self) -> str:
        threads = {None: f"{physical_cores()} (physical cores)", 0: "ONNX Runtime's default"}.get(
            self.threads, str(self.threads)
        )
        parts = [f"intra-op threads {threads}", *self.settings.describe()]
        if self.parallel:
            parts.append("parallel mode")
        if self.probe:
            return ", ".join(parts) + f" ({self.probe})"
        return ", ".join(parts) + (" (fixed; --tune measures spinning per model)" if self.fixed else "")

    def prepare(self, model, image_size):
        if self.settings.measure_spinning:
            self.session = self.choose_spinning(model, image_size)
        else:
            self.session = onnx_session(model, [self.provider], self.options())
        self.input_name = self.session.get_inputs()[0].name
        self.detail = self.describe()

    def _keep(self, candidate: SpinningCandidate) -> None:
        """The settings and threads from now on: the candidate's, measured no more."""
        self.settings = replace(self.settings, spinning=candidate.spinning, measure_spinning=False)
        self.threads = self.given_threads if self.given_threads is not None else candidate.threads

    def choose_spinning(self, path: str, image_size: tuple[int, int]):
        """Open a session per spinning candidate, time them interleaved, keep the faster one's session
        and settings (spinning off on a tie within SPINNING_TIE); the others are closed here.
        A file with a fixed batch above 1 is not probed (two sessions of a big model at a big batch may
        not fit in memory): spinning off, the detail says why. So is a file the probe can't run: its
        timed rows then meet the same error and report it."""
        sessions = {
            "spinning off": onnx_session(path, [self.provider], self.options(SPINNING_CANDIDATES["spinning off"]))
        }
        self._keep(SPINNING_CANDIDATES["spinning off"])
        try:
            feed = probe_feed(sessions["spinning off"], image_size)
            batch = next(iter(feed.values())).shape[0]
        except Exception as error:
            self.probe = f"spinning not measured: {type(error).__name__}"
            return sessions["spinning off"]
        if batch > 1:
            self.probe = f"spinning not measured: the file takes batches of {batch} only"
            return sessions["spinning off"]
        on = SPINNING_CANDIDATES["spinning on"]
        sessions = {"spinning on": onnx_session(path, [self.provider], self.options(on)), **sessions}
        try:
            calls = {label: (lambda s=current: s.run(None, feed)) for label, current in sessions.items()}
            medians = timing.time_plan(calls, SPINNING_PROBE)
        except Exception as error:  # the timed runs meet the same error and report it in their row
            self.probe = f"spinning not measured: {type(error).__name__}"
            return sessions["spinning off"]
        self.probe_medians = dict(medians)
        best = min(medians, key=medians.get)
        if medians["spinning off"] <= SPINNING_TIE * medians[best]:
            best = "spinning off"
        self._keep(SPINNING_CANDIDATES[best])
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


# The CPU threads only feed the GPU here: spinning off, one thread per physical core, unmeasured.
CUDA_CPU_SETTINGS = replace(FIXED_CPU_SETTINGS, spinning=False)
# ONNX Runtime's CUDA provider settings a row names (as the session reports them): the card, how
# convolution algorithms are chosen, the workspace they may use, TF32 (on by default, as JAX's and
# TensorFlow's: about 1e-3 relative), the layout and the memory arena's growth.
CUDA_SHOWN = (
    "device_id",
    "cudnn_conv_algo_search",
    "cudnn_conv_use_max_workspace",
    "use_tf32",
    "prefer_nhwc",
    "arena_extend_strategy",
)


class OnnxRuntimeCUDA(OnnxRuntimeCPU):
    """CUDAExecutionProvider with IO binding (its output buffers bound once), timed host to host as
    every row is (``HOST_TO_HOST``): the pixels' copy to the GPU and the outputs' copy back are inside
    each timing. The detail names the provider's settings and the nodes ONNX Runtime placed on the CPU
    (read from a profile of the first run)."""

    name = "onnxruntime-cuda"
    provider = "CUDAExecutionProvider"
    device = "gpu:0"

    def __init__(self, threads: int | None = None, settings: CpuSettings = CUDA_CPU_SETTINGS):
        super().__init__(threads, settings=settings)
        self.threads, self.fixed = threads, False

    def prepare(self, model, image_size):
        onnxruntime = onnxruntime_module()
        if self.provider not in onnxruntime.get_available_providers():
            raise Unavailable("this onnxruntime has no CUDA provider (`make install CUDA=1` installs onnxruntime-gpu)")
        missing = preload_cuda_libraries()
        with files.scratch_folder("ort-profile") as scratch:
            options = self.options()
            options.enable_profiling = True  # the first run's profile says where each node ran
            options.profile_file_prefix = os.path.join(scratch, "profile")
            try:
                self.session = onnx_session(model, [(self.provider, {"device_id": 0})], options)
            except Exception as error:
                raise Unavailable(f"CUDA session failed: {first_line(error)}") from None
            if self.session.get_providers()[0] != self.provider:
                raise Unavailable(
                    "CUDA provider could not be initialised (no GPU, or missing CUDA 12/cuDNN 9 libraries"
                    + (f": {missing})" if missing else ")")
                )
            self.input_name = self.session.get_inputs()[0].name
            self._bound = None
            try:
                self.run(next(iter(probe_feed(self.session, image_size).values())))
                placement = node_providers(self.session.end_profiling())
            except Exception as error:  # the timed runs meet the same error and report it in their row
                placement = {"unknown": [type(error).__name__]}
        self.device = device_name(f"gpu:{self.session.get_provider_options()[self.provider].get('device_id', 0)}")
        self.detail = cuda_detail(self.session.get_provider_options()[self.provider], placement, self.provider)

    def run(self, pixels):
        if self._bound is None or self._bound[0] is not pixels:
            binding = self.session.io_binding()
            self._bound = (pixels, binding)
            for output in self.session.get_outputs():
                binding.bind_output(output.name, "cpu")  # the outputs' copy back is timed (host to host)
        pixels, binding = self._bound
        binding.bind_cpu_input(self.input_name, pixels)  # copied to the GPU inside the run (host to host)
        self.session.run_with_iobinding(binding)
        return [value.numpy() for value in binding.get_outputs()]


def node_providers(profile_path: str) -> dict[str, list[str]]:
    """Provider -> the op types of the nodes it ran, from an ONNX Runtime profile (removed here)."""
    import json

    try:
        with open(profile_path) as handle:
            events = json.load(handle)
    finally:
        if profile_path and os.path.isfile(profile_path):
            os.remove(profile_path)
    placed: dict[str, dict[str, str]] = {}
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and "provider" in args:
            node = event["name"].removesuffix("_kernel_time")
            placed.setdefault(args["provider"], {})[node] = args.get("op_name", "?")
    return {provider: sorted(nodes.values()) for provider, nodes in placed.items()}


def cuda_detail(
    provider_options: dict, placement: dict[str, list[str]], provider: str = "CUDAExecutionProvider"
) -> str:
    """The onnxruntime-cuda row's detail: the timing policy, the provider's settings, the CPU's nodes.

    >>> cuda_detail({"device_id": "0", "use_tf32": "1", "other": "x"},
    ...     {"CUDAExecutionProvider": ["Conv", "Relu"], "CPUExecutionProvider": ["Shape"]}).split("; ")[1:]
    ['CUDA provider device_id 0, use_tf32 1', '1 of 3 nodes on the CPU: Shape']
    """
    shown = ", ".join(f"{key} {provider_options[key]}" for key in CUDA_SHOWN if key in provider_options)
    if "unknown" in placement:
        where = f"node placement unknown: {placement['unknown'][0]}"
    else:
        total = sum(len(ops) for ops in placement.values())
        elsewhere = Counter(op for name, ops in placement.items() if name != provider for op in ops)
        ops = ", ".join(op if count == 1 else f"{op} x{count}" for op, count in sorted(elsewhere.items()))
        where = f"{elsewhere.total()} of {total} nodes on the CPU" + (f": {ops}" if ops else "")
    return f"IO binding, {HOST_TO_HOST}; CUDA provider {shown}; {where}"


def preload_cuda_libraries() -> str:
    """Load the CUDA and cuDNN libraries of the ``nvidia-*`` wheels for onnxruntime-gpu, which the
    dynamic loader doesn't find by itself (ONNX Runtime >= 1.21; a no-op for the CPU package).
    ONNX Runtime prints its failures; they are kept out of stdout and the first is returned ("" if none)."""
    onnxruntime = onnxruntime_module()

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
