"""OpenVINO's CPU plugin behind kbench's Runtime interface: ``openvino-cpu`` (float32) and
``openvino-cpu-bf16`` (bfloat16 inference precision, offered only where the CPU computes bf16 natively).
Both read kbench's ONNX file, the one export every ONNX runtime serves.

OpenVINO's CPU plugin infers in bf16 by default on a CPU with AMX or AVX512-BF16, so the float32 runtime
sets its precision explicitly: no row is ever a quiet change of precision. Each runtime states the
tolerance its outputs are checked against (``tolerance``; ``kbench.serving.latency`` checks every row against
Keras, ``kbench.serving.submission`` against ONNX Runtime on the checked export).
"""

from __future__ import annotations

import os
import sys

import numpy as np

from kbench.core.errors import KbenchError, Unavailable, first_line
from kbench.core.machine import cpu, has_native_bf16, physical_cores

# Fixed, named settings (measured once on a 2-core Xeon with AMX, benchmarks/docs/openvino.md): the
# LATENCY hint (one stream, all threads on one request: kbench times one synchronous request at a time,
# where THROUGHPUT's several streams leave cores idle), threads not pinned to cores (pinned, EfficientNet-B0
# ran 1.44x slower on the shared machine: a pinned thread waits for its core) and one inference thread per
# physical core, as onnxruntime-cpu. The model is compiled for each batch size's static shape on its first
# call (a dynamic-batch compile measured slower), so the first call of a new batch size is a warm-up.
SETTINGS = {"PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": "NO"}
# Largest |OpenVINO - Keras| relative to the output's scale (kbench.core.metrics.relative_difference) a row
# may show: float32 as the ONNX export's own check; bf16 keeps 8 bits of mantissa, and on random-weight
# probabilities measured 2.2e-3 (ResNet-50), 4.4e-3 (EfficientNet-B0) and 1.9e-2 (MobileNetV2, batch 32):
# 5e-2 leaves MobileNetV2 a margin (benchmarks/docs/openvino.md).
TOLERANCES = {"f32": 1e-4, "bf16": 5e-2}


def import_openvino():
    """``openvino`` without its telemetry. ``import openvino`` imports its model converter (ovc), whose
    import sends a usage event to Google Analytics unless ~/intel/openvino_telemetry says no (measured
    here with strace: a DNS query on import, and ~/intel/openvino_ga_cid written). kbench uses only the
    runtime, so the converter's import is refused for the duration (openvino catches the ImportError) and
    left importable afterwards for code that asks for it by name."""
    if "openvino" in sys.modules:
        return sys.modules["openvino"]
    blocked = "openvino.tools.ovc"
    had = sys.modules.get(blocked, ...)
    sys.modules[blocked] = None  # a None entry makes `from openvino.tools.ovc import ...` an ImportError
    try:
        import openvino
    except ImportError as error:
        raise Unavailable(f"openvino is not installed ({first_line(error)}); `make install` installs it") from None
    finally:
        if had is ...:
            sys.modules.pop(blocked, None)
        else:
            sys.modules[blocked] = had
    return openvino


def bf16_unavailable() -> str:
    """Why bf16 can't run natively here ("" where it can)."""
    if has_native_bf16():
        return ""
    return f"this CPU ({cpu().model or 'unknown'}) has no native bf16 (AMX-BF16 or AVX512-BF16); bf16 would be emulated"


class OpenVinoCPU:
    """OpenVINO's CPU plugin in float32 (``kbench.serving.runtimes.Runtime``'s interface; not its subclass, which
    would make runtimes and this module import each other): SETTINGS, ``threads`` inference threads (None: one per
    physical core), one compiled model and infer request per batch size. ``run`` returns the outputs
    as numpy arrays that stay valid until the next call at that batch size."""

    name = "openvino-cpu"
    needs = "onnx"
    device = "cpu"
    detail = ""
    library = "openvino"
    precision = "f32"

    def __init__(self, threads: int | None = None):
        self.threads = threads
        self.tolerance = TOLERANCES[self.precision]
        self._requests: dict[tuple, object] = {}

    def config(self) -> dict:
        threads = physical_cores() if self.threads is None else self.threads
        return {**SETTINGS, "INFERENCE_PRECISION_HINT": self.precision, "INFERENCE_NUM_THREADS": str(threads)}

    def describe(self) -> str:
        threads = f"{physical_cores()} (physical cores)" if self.threads is None else str(self.threads)
        return (
            f"{self.precision} inference precision, performance hint {SETTINGS['PERFORMANCE_HINT']}, "
            f"inference threads {threads}, not pinned, compiled per batch size"
        )

    def prepare(self, model: str, image_size: tuple[int, int]) -> None:
        openvino = import_openvino()
        if not os.path.isfile(model):
            raise KbenchError(f"not found: {model}")
        self.core = openvino.Core()
        try:
            self.model = self.core.read_model(model)
        except Exception as error:  # OpenVINO's frontends raise their own RuntimeError with a page of context
            if foreign := _onnxruntime_operators(model):
                raise Unavailable(
                    f"the graph uses ONNX Runtime's own operators ({', '.join(foreign)}), which OpenVINO doesn't read"
                ) from None
            raise KbenchError(f"{model} is not a model OpenVINO can read: {first_line(error, 200)}") from None
        if len(self.model.inputs) != 1:
            raise Unavailable(f"the model has {len(self.model.inputs)} inputs; kbench serves one image input")
        self._requests.clear()
        self.detail = self.describe()
        try:  # compiled here, so that a graph this plugin can't compile is an unavailable row, not a crash
            self.request((1, *image_size, 3))
        except Exception as error:
            raise Unavailable(f"OpenVINO can't compile it in {self.precision}: {first_line(error, 200)}") from None

    def request(self, shape: tuple):
        """The infer request compiled for input ``shape`` (compiled on first use)."""
        if shape not in self._requests:
            model = self.model.clone()
            if model.inputs[0].get_partial_shape().is_dynamic:
                model.reshape({0: list(shape)})
            compiled = self.core.compile_model(model, "CPU", self.config())
            self._requests[shape] = compiled.create_infer_request()
        return self._requests[shape]

    def logits(self, pixels: np.ndarray) -> np.ndarray | None:
        """The head's logits on ``pixels`` under this runtime's settings (the input of the graph's final
        Sigmoid or Softmax, made one more output of a copy compiled for the check), or None where the
        graph ends otherwise. Parity on probabilities alone misses an error a saturated sigmoid hides."""
        model = self.model.clone()
        final = model.outputs[0].get_node().input_value(0).get_node()
        if final.get_type_name() not in ("Sigmoid", "Softmax", "SoftMax"):
            return None
        model.add_outputs([final.input_value(0)])
        if model.inputs[0].get_partial_shape().is_dynamic:
            model.reshape({0: list(pixels.shape)})
        compiled = self.core.compile_model(model, "CPU", self.config())
        return np.array(compiled(pixels)[compiled.outputs[-1]], dtype=np.float32)

    def run(self, pixels: np.ndarray) -> list[np.ndarray]:
        request = self.request(tuple(pixels.shape))
        results = request.infer({0: pixels}, share_inputs=True, share_outputs=True)
        return list(results.values())


def _onnxruntime_operators(path: str) -> list[str]:
    """The operators of ONNX Runtime's own domain (com.microsoft: QOperator int8's QLinearAdd, ...)."""
    try:
        import onnx

        graph = onnx.load(path, load_external_data=False).graph
    except Exception:
        return []
    return sorted({node.op_type for node in graph.node if node.domain == "com.microsoft"})


class OpenVinoCPUBf16(OpenVinoCPU):
    """OpenVINO's CPU plugin in bfloat16 inference precision, where the CPU has it natively (else the
    runtime is Unavailable with the reason, never a quiet float32 run)."""

    name = "openvino-cpu-bf16"
    precision = "bf16"

    def prepare(self, model: str, image_size: tuple[int, int]) -> None:
        why = bf16_unavailable()
        if why:
            raise Unavailable(why)
        super().prepare(model, image_size)
