"""The timing loop over models x runtimes x batch sizes; flat rows out.

Method (``kbench.core.timing``, after timm's benchmark harness and nanoGPT's bench.py): warm-up runs outside
the timings, every run timed on its own with the device synchronised inside the timed region, inputs of
real image pixels at the model's size, statistics over the individual timings.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np

from kbench.core import files, timing
from kbench.core.config import check_bounds, option, positive
from kbench.core.errors import KbenchError, Unavailable, first_line
from kbench.core.machine import facts, onnxruntime_module
from kbench.core.metrics import relative_difference
from kbench.core.tables import distinct_names, latency_text
from kbench.data.synthetic import sample_pixels
from kbench.serving.onnx_runtime import onnx_session
from kbench.serving.runtimes import RUNTIMES, make_runtime


@dataclass
class LatencyConfig:
    models: list[str]
    runtimes: list[str] = option(list(RUNTIMES), "Comma-separated runtimes to time.", flag="runtime")
    batch_sizes: list[int] = option([1, 8, 32], "Comma-separated batch sizes.", flag="batch_size")
    runs: int = option(100, "Timed runs per row, each timed on its own.")
    warmup: int = option(10, "Untimed runs first.", minimum=0)
    threads: int | None = option(None, "ONNX Runtime intra-op threads.", shown_default="ONNX Runtime's own count")
    weights: str = option("none", "For backbone names: imagenet or none.", choices=("none", "imagenet"))
    tune: bool = option(
        False,
        "Choose settings per model by measuring (onnxruntime-cpu's thread spinning, keras-compiled's XLA "
        "under TensorFlow) instead of the fixed ones, which are the quiet machine's fastest.",
    )
    export_dir: str = "exports"

    def check(self) -> "LatencyConfig":
        for name in self.runtimes:
            if name not in RUNTIMES:
                raise KbenchError(f"unknown runtime {name!r}; choose from {', '.join(RUNTIMES)}")
        if not self.runtimes:
            raise KbenchError("--runtime names no runtime")
        for flag, values in (("--runtime", self.runtimes), ("--batch-size", self.batch_sizes)):
            repeated = sorted({str(value) for value in values if values.count(value) > 1})
            if repeated:  # a typo, most likely: the same rows twice would look like two measurements
                raise KbenchError(f"{flag} names {', '.join(repeated)} twice; name each once")
        positive(self.runs, "--runs", whole=True)
        for batch in self.batch_sizes:
            positive(batch, "--batch-size", whole=True)
        check_bounds(self, "warmup")
        if self.threads is not None:
            positive(self.threads, "--threads", whole=True)
        if not self.batch_sizes:
            raise KbenchError("--batch-size names no batch size")
        if self.weights not in ("none", "imagenet"):
            raise KbenchError(f"--weights must be imagenet or none; got {self.weights!r}")
        if any(not name.startswith("keras-") for name in self.runtimes):  # export and time with ONNX Runtime
            onnxruntime_module()  # one line with the fix where it is missing or installed twice
        for model in self.models:  # each MODEL refused here, before the progress bar and any timing
            _check_model(model)
        return self


@dataclass
class ModelSource:
    name: str
    keras_path: str | None
    onnx_path: str | None
    image_size: tuple[int, int]
    members: int = 1
    given: str = ""  # what the user named: a run folder's ONNX file gets its metadata
    batch_size: int | None = None  # an ONNX file's fixed batch size; None: dynamic


def _is_model_file(model: str) -> bool:
    return os.path.exists(model) or model.endswith(".keras") or os.sep in model


def _check_model(model: str) -> None:
    """KbenchError, in one line, for a MODEL that is no ONNX file, model file, run folder or registry name."""
    if model.endswith(".onnx"):
        if not os.path.isfile(model):
            raise KbenchError(f"model not found: {model}")
    elif _is_model_file(model):
        from kbench.export.onnx import model_file
        from kbench.models.backbones import check_model_file

        check_model_file(model_file(model))
    else:
        model_name(model)


def model_name(model: str) -> str:
    """The name of a MODEL argument: an ONNX file's name, a folder's or ``.keras`` file's name
    without the extension, or the registry's name (KbenchError for none of these)."""
    if model.endswith(".onnx"):
        return os.path.basename(model)
    if _is_model_file(model):
        name = os.path.basename(model.rstrip("/"))
        return name if os.path.isdir(model) else os.path.splitext(name)[0]
    from kbench.models.backbones import get_backbone

    return get_backbone(model).name


def resolve_model(model: str, weights: str, scratch: str) -> ModelSource:
    """MODEL: a run/ensemble folder, a ``.keras`` file, an ``.onnx`` file, or a registry name (the
    backbone at its native size with a fresh two-class head, seeded: the same weights every time)."""
    from kbench.export.onnx import describe_inputs, load_model, model_file

    if model.endswith(".onnx"):
        shape = onnx_session(model, ["CPUExecutionProvider"]).get_inputs()[0].shape
        fixed = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        return ModelSource(model_name(model), None, model, (int(shape[1]), int(shape[2])), batch_size=fixed)
    if _is_model_file(model):
        path = model_file(model)
        _, (height, width, _) = describe_inputs(load_model(path))
        return ModelSource(model_name(model), path, None, (height, width), _members(model), model)
    import keras

    from kbench.models.backbones import build_classifier, get_backbone
    from kbench.models.settle import settle_random_weights

    spec = get_backbone(model)  # KbenchError listing the names if it is none of the above
    path = os.path.join(scratch, f"{spec.name}.keras")
    # the same random model every time: rows (parity included) repeat, and its ONNX file is reused
    keras.utils.set_random_seed(0)
    classifier = build_classifier(spec, 2, spec.image_size, weights)
    if weights == "none":  # random weights made numerically tame, so the export's parity check means something
        settle_random_weights(classifier)
    classifier.save(path)
    return ModelSource(spec.name, path, None, (spec.image_size, spec.image_size))


def onnx_file(source: ModelSource, export_dir: str) -> str:
    """The ONNX export of a Keras model, by kbench.export.onnx's one reuse rule."""
    if source.onnx_path:
        return source.onnx_path
    from kbench.export.onnx import onnx_for

    model = source.given if source.given and os.path.isdir(source.given) else source.keras_path
    source.onnx_path = onnx_for(model, os.path.join(export_dir, f"{source.name}.onnx"))["path"]
    return source.onnx_path


class Reference:
    """What a checked runtime's rows (those with a ``tolerance``: OpenVINO's) are compared with, on the
    pixels they were timed on: Keras' outputs where MODEL is a Keras model, else ONNX Runtime's on the
    same file (checked against Keras when it was exported). The Keras model is loaded once, on first
    use, for the Keras runtimes too."""

    def __init__(self, source: ModelSource):
        self.source, self.model, self.outputs = source, None, {}
        self.label = "Keras" if source.keras_path else "ONNX Runtime"

    def keras_model(self):
        if self.model is None:
            from kbench.export.onnx import load_model

            self.model = load_model(self.source.keras_path)
        return self.model

    def __call__(self, pixels: np.ndarray) -> list[np.ndarray]:
        if pixels.shape not in self.outputs:
            if self.source.keras_path:  # the float32 model the ONNX file was exported from (a bf16 run's too)
                from kbench.core.backend import full_float32
                from kbench.models.backbones import float32_model

                self.float32 = getattr(self, "float32", None) or float32_model(self.keras_model())
                with full_float32():  # not TF32 on an Ampere or newer GPU: OpenVINO is checked to 1e-4
                    outputs = self.float32.predict_on_batch(pixels)
            else:
                session = onnx_session(self.source.onnx_path, ["CPUExecutionProvider"])
                outputs = session.run(None, {session.get_inputs()[0].name: pixels})
            outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
            self.outputs[pixels.shape] = [np.array(output) for output in outputs]
        return self.outputs[pixels.shape]

    def logits(self, pixels: np.ndarray) -> np.ndarray | None:
        """The Keras model's head logits on ``pixels`` (float32), or None: no Keras model, or no kbench head."""
        if not self.source.keras_path:
            return None
        from kbench.core.backend import full_float32
        from kbench.export.onnx import keras_logits
        from kbench.models.backbones import float32_model

        self.float32 = getattr(self, "float32", None) or float32_model(self.keras_model())
        with_logits = keras_logits(self.float32)
        if with_logits is None:
            return None
        with full_float32():
            return with_logits(pixels)[1]

    def check(self, runtime, pixels: np.ndarray) -> dict:
        """The row's ``parity`` (largest relative difference) and, above the runtime's tolerance, its
        failed status; the detail names the reference and the tolerance."""
        expected = self(pixels)
        difference = max(relative_difference(e, got) for e, got in zip(expected, runtime.run(pixels)))
        logits = self.logits(pixels) if hasattr(runtime, "logits") else None
        if logits is not None and (got := runtime.logits(pixels)) is not None:  # as the export checks
            difference = max(difference, relative_difference(logits, got))
        fields = {
            "parity": difference,
            "detail": f"{runtime.detail}; checked against {self.label} within {runtime.tolerance:.0e}",
        }
        if not difference <= runtime.tolerance:
            fields["status"] = f"failed: differs from {self.label} by {difference:.1e} > {runtime.tolerance:.0e}"
        return fields


def runtime_names(runtimes: list[str], members: int) -> list[str]:
    """The runtimes a model's rows are timed on: an ensemble's onnxruntime-cpu rows are followed by
    onnxruntime-cpu-parallel's (its members as concurrent branches).

    >>> runtime_names(["keras-predict", "onnxruntime-cpu"], members=3)
    ['keras-predict', 'onnxruntime-cpu', 'onnxruntime-cpu-parallel']
    """
    names = list(runtimes)
    if members > 1 and "onnxruntime-cpu" in names:
        names.insert(names.index("onnxruntime-cpu") + 1, "onnxruntime-cpu-parallel")
    return names


def _members(model: str) -> int:
    """How many members a MODEL has, read without loading it: a run or ensemble folder's record; 1 else."""
    from kbench.export.onnx import run_metadata

    if model.endswith(".onnx") or not _is_model_file(model):
        return 1
    return len(run_metadata(model).get("backbones", [])) or 1


def plan(config: LatencyConfig) -> int:
    """How many rows ``iter_latency`` yields: the progress bar's total."""
    names = {model: len(runtime_names(config.runtimes, _members(model))) for model in config.models}
    return sum(names[model] for model in config.models) * len(config.batch_sizes)


def iter_latency(config: LatencyConfig) -> Iterator[dict]:
    """Yield one row per (model, runtime, batch size); rows of runtimes that can't run say why."""
    import keras

    config.check()
    backend = keras.backend.backend()
    # rows name their model; two models of one name (runs/a/m, runs/b/m) are named by their paths
    labels = distinct_names([model_name(model) for model in config.models], config.models)
    with files.scratch_folder("latency") as scratch:
        for model, label in zip(config.models, labels):
            source = resolve_model(model, config.weights, scratch)
            reference = Reference(source)
            for runtime_name in runtime_names(config.runtimes, source.members):
                runtime = make_runtime(runtime_name, config.threads, config.tune)
                base = {
                    "model": label,
                    "runtime": runtime.name,
                    "backend": backend if runtime.needs == "keras" else getattr(runtime, "library", "onnxruntime"),
                    "runs": config.runs,
                    "warmup": config.warmup,
                }
                try:
                    if runtime.needs == "keras":
                        if source.keras_path is None:
                            raise Unavailable("MODEL is an ONNX file")
                        runtime.prepare(reference.keras_model(), source.image_size)
                    else:
                        runtime.prepare(onnx_file(source, config.export_dir), source.image_size)
                except Unavailable as reason:
                    for batch in config.batch_sizes:
                        yield {
                            **base,
                            "device": runtime.device,
                            "batch_size": batch,
                            "status": f"unavailable: {reason}",
                        }
                    continue
                for batch in config.batch_sizes:
                    fixed = source.batch_size if runtime.needs == "onnx" else None
                    if fixed and fixed != batch:  # an ONNX file exported with --batch-size N
                        why = f"unavailable: the ONNX file takes batches of {fixed} only"
                        yield {**base, "device": runtime.device, "batch_size": batch, "status": why}
                        continue
                    try:
                        pixels = sample_pixels(batch, source.image_size)
                        with timing.watch_load() as load:  # other processes' CPU use meanwhile
                            timings = timing.time_calls(partial(runtime.run, pixels), config.runs, config.warmup)
                        checked = reference.check(runtime, pixels) if getattr(runtime, "tolerance", None) else {}
                    except Exception as error:  # one row fails, the rest are still measured and kept
                        if isinstance(error, KbenchError):
                            raise
                        failed = f"failed: {first_line(error, 200, named=True)}"
                        yield {**base, "device": runtime.device, "batch_size": batch, "status": failed}
                        continue
                    stats = timing.stats(timings)
                    yield {
                        **base,
                        "device": runtime.device,
                        "batch_size": batch,
                        **stats,
                        "images_per_second": 1000 * batch / stats["p50_ms"],
                        **load,
                        "status": "ok",
                        "detail": runtime.detail,
                        **checked,
                    }
                del runtime
            del reference
            gc.collect()
            keras.backend.clear_session()  # free the compiled graphs before the next model


def measure(
    config: LatencyConfig,
    output: str | None = None,
    output_format: str = "table",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[dict], bool]:
    """Time every row; with ``output``, rewrite that file after each row, so finished rows survive a
    kill (out of memory, ...). ``progress(done, total)``, when given, is called before the first row
    and after each (the CLI draws its bar from it). Returns (rows, interrupted): Ctrl-C stops the
    loop and keeps the rows finished so far."""
    config.check()
    if output and os.path.isdir(output):
        raise KbenchError(f"-o {output} is a folder; give a file name")
    for model in config.models:  # a broken ONNX file is refused before the bar or any timing starts
        if model.endswith(".onnx"):
            onnx_session(model, ["CPUExecutionProvider"])
    machine = facts(config.threads)
    rows, interrupted, total = [], False, plan(config)
    try:
        if progress:
            progress(0, total)
        for row in iter_latency(config):
            rows.append(row)
            if progress:
                progress(len(rows), total)
            if output:
                files.write_text(output, latency_text(rows, output_format, machine))
    except KeyboardInterrupt:
        interrupted = True
    if output:
        files.write_text(output, latency_text(rows, output_format, machine))
    return rows, interrupted
