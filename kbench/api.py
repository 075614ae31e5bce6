"""kbench's public Python API: what ``import kbench`` offers a notebook, and what every command of the
command line calls (one code path, so the two can't drift).

Keyword arguments are the command line's options with underscores, with the same defaults (read from
the same config dataclasses) and the same one-line errors (``KbenchError``). Functions return plain
values: dicts, lists of dict rows (``pandas.DataFrame(rows)`` works), or the small ``Run``, ``Study``
and ``OnnxExport`` objects below; they never print a table and never exit. Importing this module
imports no keras, TensorFlow, JAX or click: each function loads what it needs when called.

>>> import kbench
>>> kbench.list_backbones("efficientnet_b[01]")[0]["name"]
'efficientnet_b0'
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kbench.core.errors import KbenchError

Progress = Callable[[int, int], None]


# -- the backend and the registry --------------------------------------------------------------------
def use_backend(name: str) -> str:
    """Select the Keras backend (``"jax"`` or ``"tensorflow"``) before keras loads; returns its name.
    Once keras is loaded with another backend, KbenchError says to start a new process (a notebook:
    restart the kernel).

    >>> kbench.use_backend("tensorflow")  # doctest: +SKIP
    'tensorflow'
    """
    from kbench.core.backend import use_backend as select

    _quiet()
    return select(name)


def _quiet() -> None:
    """Other libraries' start-up lines and deprecation warnings kept out of a notebook's output, as
    the command line keeps them off stderr (KBENCH_VERBOSE=1 shows them)."""
    from kbench.core.quiet import set_up

    set_up()


def list_backbones(pattern: str | None = None) -> list[dict]:
    """The registered backbones whose names match the shell ``pattern`` (all without one), one dict
    each: name, native ``image_size``, ``feature_dim``, ``params``, ``gflops``, preprocessing, ...
    (``kbench backbones --format json``'s rows).

    >>> [spec["name"] for spec in list_backbones("mobilenet_v3*")]
    ['mobilenet_v3_small', 'mobilenet_v3_large']
    """
    from kbench.models.backbones import list_backbones as registered

    if pattern is not None and not isinstance(pattern, str):
        raise KbenchError(f"pattern must be a string such as 'efficientnet_b*'; got {type(pattern).__name__}")
    return [spec.to_dict() for spec in registered(pattern)]


def build_model(
    backbone: str,
    num_classes: int = 2,
    weights: str = "imagenet",
    image_size: int | None = None,
    freeze_backbone: bool = False,
):
    """The reference study's classifier as a ``keras.Model``: the backbone with its preprocessing
    inside (RGB pixels 0..255 in, NHWC), global average pooling and a dense head named
    ``probability`` (one sigmoid unit for two classes, softmax for more). ``weights``: "imagenet",
    "none" or a file (see docs/train.md). Unknown names are refused with the valid ones.

    >>> model = kbench.build_model("small_cnn", weights="none", image_size=32)  # doctest: +SKIP
    """
    from kbench.core.config import positive
    from kbench.models.backbones import build_classifier, get_backbone

    positive(num_classes, "num_classes", whole=True)
    if image_size is not None:
        positive(image_size, "image_size", whole=True)
    if num_classes < 2:
        raise KbenchError(f"num_classes must be at least 2; got {num_classes}")
    use_backend_if_unset()
    spec = get_backbone(backbone)
    return build_classifier(spec, num_classes, image_size, weights, freeze_backbone)


def use_backend_if_unset() -> str:
    """The backend this process uses: the one chosen already, else KERAS_BACKEND or the machine's default."""
    from kbench.core.backend import use_backend as select

    _quiet()
    return select(None)


# -- runs ----------------------------------------------------------------------------------------------
class Run:
    """A finished run or ensemble folder: ``Run("runs/b0")``. ``path``, ``kind`` ("backbone" or
    "ensemble"), ``config`` (config.json), ``metrics`` (metrics.json), ``history`` (one dict per
    epoch) and ``load_model()`` (the trained keras.Model). A folder that isn't a finished run is a
    KbenchError in one line.

    >>> run = kbench.Run("runs/b0")  # doctest: +SKIP
    >>> run.metrics["val_log_loss"]  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike):
        self.path = _file(path, "Run's path")
        _ = self._folder  # a folder that isn't a finished run is refused here, in one line

    @property
    def _folder(self):
        """The run folder, checked again on every read: a folder deleted or emptied since is refused."""
        from kbench.training.runs import Run as Folder

        return Folder.open(self.path)

    def __repr__(self) -> str:
        metrics = self._folder.metrics or {}
        loss = metrics.get("val_log_loss")
        what = metrics.get("backbone") or "+".join(metrics.get("backbones") or []) or self.kind
        score = f", val_log_loss={loss:.4g}" if isinstance(loss, (int, float)) else ""
        return f"Run({self.path!r}: {self.kind} {what}{score})"

    @property
    def kind(self) -> str:
        return self._folder.kind

    @property
    def config(self) -> dict:
        return self._folder.config

    @property
    def metrics(self) -> dict:
        return self._folder.metrics or {}

    @property
    def history(self) -> list[dict]:
        return self._folder.history

    @property
    def model_path(self) -> str:
        return self._folder.model_path

    def load_model(self):
        """The trained model (keras.Model), loaded safely (no pickles)."""
        from kbench.models.backbones import load_model

        use_backend_if_unset()
        return load_model(self.model_path)


def _path(model) -> str:
    """A Run, a path-like or a path string -> the path string."""
    if isinstance(model, Run):
        return model.path
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    raise KbenchError(f"expected a run folder, a model file or a kbench.Run; got {type(model).__name__}")


def _file(value, name: str, optional: bool = False) -> str | None:
    """A path argument (str or os.PathLike) as a string; anything else is a one-line KbenchError."""
    if value is None and optional:
        return None
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    raise KbenchError(f"{name} must be a path (str or os.PathLike); got {type(value).__name__}")


def _verbose(quiet: bool):
    return 0 if quiet else "auto"


def train(
    backbone: str | None = None,
    data: str | None = None,
    run_dir: str | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    **options: Any,
) -> Run:
    """Fine-tune ``backbone`` on ``data`` (a folder or zip of images) into ``run_dir``; returns the
    finished ``Run``. ``options`` are ``kbench train``'s (``epochs=10``, ``batch_size=32``,
    ``image_size``, ``lr=1e-4``, ``weights``, ``augment``, ``val_split``, ``seed``, ``schedule``, ...,
    ``backend``), with its defaults. ``resume=True`` continues the interrupted run in ``run_dir`` with
    its own settings (Ctrl-C or KeyboardInterrupt in a notebook leaves one), redoing the interrupted
    epoch from its start. ``quiet`` hides Keras' progress bar.

    >>> run = kbench.train("small_cnn", "train.zip", "runs/cnn", epochs=2)  # doctest: +SKIP
    >>> run = kbench.train(run_dir="runs/cnn", resume=True)  # doctest: +SKIP
    """
    from kbench.training.config import TrainConfig, resume_config
    from kbench.training.train import train as fit

    _quiet()
    if run_dir is None:
        raise KbenchError("run_dir is required: the folder for the model, metrics and history")
    run_dir = _file(run_dir, "run_dir")
    given = {name: value for name, value in options.items() if value is not None}
    if isinstance(given.get("devices"), int) and not isinstance(given["devices"], bool):
        given["devices"] = str(given["devices"])  # devices=2, as the command line's --devices 2
    _check_names(given, TrainConfig, "train")
    if backbone is not None and not isinstance(backbone, str):
        raise KbenchError(f"backbone must be a name (kbench backbones lists them); got {type(backbone).__name__}")
    data = _file(data, "data", optional=True)
    if resume:
        if overwrite:
            raise KbenchError("resume and overwrite contradict each other")
        named = {"backbone": backbone, "data": data}
        given.update({key: os.fspath(value) for key, value in named.items() if value is not None})
        config = resume_config(run_dir, given)
    else:
        for name, value in (("backbone", backbone), ("data", data)):
            if value is None:
                raise KbenchError(f"--{name} is required (unless --resume)")
        config = TrainConfig(backbone=backbone, data=os.fspath(data), run_dir=run_dir, **given)
    result = fit(config, resume=resume, verbose=_verbose(quiet), overwrite=overwrite)
    if "process" in result:  # one of several processes training together: process 0 wrote the run
        return result
    return Run(run_dir)


def _check_names(given: dict, config_class, command: str) -> None:
    """An unknown keyword is refused with the closest option, never dropped."""
    import difflib

    fields = {field.name for field in dataclasses.fields(config_class)}
    for name in given:
        if name not in fields:
            close = difflib.get_close_matches(name, sorted(fields), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise KbenchError(f"unknown option {name!r} for {command}{hint}")
    _check_types(given, config_class)


def _check_types(given: dict, config_class) -> None:
    """A value of the wrong type is refused in one line: ``augment="no"`` would augment, ``epochs="2"``
    fail deep inside. Whole numbers are ints (not bools), numbers int or float, flags bools."""
    import types
    import typing

    hints = typing.get_type_hints(config_class)
    for name, value in given.items():
        kinds = (
            set(typing.get_args(hints[name]))
            if typing.get_origin(hints[name]) in (typing.Union, types.UnionType)
            else {hints[name]}
        )
        kinds.discard(type(None))
        if value is None or object in kinds or any(typing.get_origin(kind) is not None for kind in kinds):
            continue  # lists and other generics: checked by the config itself
        if bool in kinds:
            ok = isinstance(value, bool)
        elif float in kinds:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif int in kinds:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif str in kinds:
            ok = isinstance(value, (str, os.PathLike))
        else:
            continue
        if not ok:
            wanted = " or ".join(sorted(kind.__name__ for kind in kinds))
            raise KbenchError(f"{name} must be {wanted}; got {value!r} ({type(value).__name__})")


def ensemble(
    members: Sequence[str | Run],
    run_dir: str,
    *,
    overwrite: bool = False,
    quiet: bool = False,
    **options: Any,
) -> Run:
    """Combine trained runs (paths or ``Run``s trained on the same data and split) into ONE model with
    one image input, written to ``run_dir``; returns its ``Run``. ``options`` are ``kbench
    ensemble``'s: ``method="stack"`` (or "mean"), ``epochs``, ``batch_size``, ``lr``, ``tta_passes``,
    ``seed``, ``data``, ``layout``, ``backend``.

    >>> ens = kbench.ensemble(["runs/b0", "runs/mnv2"], "runs/ens")  # doctest: +SKIP
    """
    from kbench.training.ensemble import EnsembleConfig, train_ensemble

    _quiet()
    if isinstance(members, (str, Run)):
        raise KbenchError("members must be a list of run folders (or kbench.Run objects)")
    _check_names(options, EnsembleConfig, "ensemble")
    given = {name: value for name, value in options.items() if value is not None}
    config = EnsembleConfig([_path(member) for member in members], _file(run_dir, "run_dir"), **given)
    train_ensemble(config, verbose=_verbose(quiet), overwrite=overwrite)
    return Run(run_dir)


# -- export ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OnnxExport:
    """An exported ONNX file: ``path``; ``parity``, the largest relative difference between ONNX
    Runtime and Keras on the same pixels (None when an earlier, checked file was reused); ``reused``;
    and the whole export record in ``record``."""

    path: str
    parity: float | None
    reused: bool
    record: dict = dataclasses.field(repr=False, compare=False)

    def __repr__(self) -> str:
        how = "reused" if self.reused else f"parity {self.parity:.1e}"
        return f"OnnxExport({self.path!r}, {how})"


def export_onnx(
    model,
    output: str | None = None,
    *,
    opset: int | None = None,
    batch_size: int | str = "dynamic",
    graph_passes: bool = True,
    quantize: str | None = None,
    calibration_data: str | None = None,
) -> OnnxExport:
    """Export ``model`` (a run or ensemble folder, a ``Run``, a ``.keras`` file, or an in-memory
    ``keras.Model`` with one NHWC image input) to ONNX, checked against Keras before it is kept
    (``kbench export onnx``). A file at ``output`` made from the same model and options is reused.
    ``quantize="int8"`` also writes a quantized copy when it pays (``record["quantize"]``).

    >>> onnx = kbench.export_onnx("runs/b0", "exports/b0.onnx")  # doctest: +SKIP
    >>> kbench.export_onnx(my_keras_model, "mine.onnx")  # doctest: +SKIP
    """
    from kbench.export.onnx import DEFAULT_EXPORT_DIR, ExportOptions, onnx_for
    from kbench.export.onnx import export_onnx as export_model

    output = _file(output, "output", optional=True)
    if output and not output.endswith(".onnx") and not os.path.isdir(output):  # a folder: onnx_for says so
        raise KbenchError(f"-o {output} must name an .onnx file")
    options = ExportOptions.parse(opset or ExportOptions.opset, str(batch_size), graph_passes)
    if quantize not in (None, "int8"):
        raise KbenchError(f"quantize must be 'int8' or None; got {quantize!r}")
    if calibration_data and not quantize:
        raise KbenchError(
            "calibration_data (--calibration-data) is for quantize='int8' (--quantize int8); add it or drop it"
        )
    in_memory = _is_keras_model(model)
    if quantize:  # no images to calibrate on: refused before the float file is written
        from kbench.serving.quantize import check_calibration

        if in_memory and not calibration_data:
            raise KbenchError("quantize='int8' of an in-memory model needs calibration_data (a folder of images)")
        check_calibration("" if in_memory else _path(model), calibration_data and os.fspath(calibration_data))
    if in_memory:
        use_backend_if_unset()
        check_image_model(model)
        output = output or os.path.join(DEFAULT_EXPORT_DIR, f"{model.name}.onnx")
        record = export_model(
            model, output, opset=options.opset, batch_size=options.batch_size, graph_passes=options.graph_passes
        )
        record["reused"] = False
        source = None
    else:
        from kbench.training.runs import refuse_overwriting

        source = _path(model)
        if output:
            refuse_overwriting(output, "-o", [source])
        use_backend_if_unset()
        record = onnx_for(source, output, options)
    if quantize:
        from kbench.serving.quantize import quantize_export

        record["quantize"] = quantize_export(record["path"], source or "", calibration_data)
    return OnnxExport(record["path"], record.get("max_relative_difference"), bool(record.get("reused")), record)


def _is_keras_model(model) -> bool:
    return type(model).__module__.startswith("keras") or hasattr(model, "get_config") and hasattr(model, "inputs")


def check_image_model(model) -> None:
    """One image input, NHWC with 3 channels: what kbench exports and times; KbenchError otherwise."""
    inputs = getattr(model, "inputs", None) or []
    if len(inputs) != 1:
        raise KbenchError(f"model {model.name!r} has {len(inputs)} inputs; kbench takes models with one image input")
    shape = tuple(inputs[0].shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise KbenchError(
            f"model {model.name!r} takes {shape}; kbench takes RGB images, NHWC (batch, height, width, 3)"
        )
    if shape[1] is None or shape[2] is None:
        from kbench.export.convert import fixed_size_needed

        raise KbenchError(fixed_size_needed(model.name, shape))


# -- serving -------------------------------------------------------------------------------------------
def latency(
    models: Sequence[Any] | Any,
    *,
    runtimes: Sequence[str] | str | None = None,
    batch_sizes: Sequence[int] | int | None = None,
    runs: int | None = None,
    warmup: int | None = None,
    threads: int | None = None,
    weights: str | None = None,
    tune: bool | None = None,
    output: str | None = None,
    output_format: str = "json",
    progress: Progress | None = None,
) -> list[dict]:
    """Time inference of ``models`` (run folders, ``Run``s, ``.keras`` / ``.onnx`` files, backbone
    names, or in-memory ``keras.Model``s with one image input) on each runtime and batch size; one
    dict per model x runtime x batch size, the rows of ``kbench latency --format json``. Defaults are
    ``kbench latency``'s (every runtime this machine has, batch sizes 1, 8, 32, 100 runs).
    KeyboardInterrupt returns the rows finished so far, with ``rows.interrupted`` set.

    >>> rows = kbench.latency(["runs/b0", "exports/ens.onnx"], batch_sizes=[1, 32])  # doctest: +SKIP
    >>> import pandas; pandas.DataFrame(rows)  # doctest: +SKIP
    """
    from kbench.core import files
    from kbench.serving.latency import LatencyConfig, measure

    if isinstance(models, (str, os.PathLike, Run)) or _is_keras_model(models):
        models = [models]
    if not isinstance(models, Sequence) or not models:
        raise KbenchError("models must be a model or a non-empty list of models (paths, Runs, backbone names)")
    _refuse_repeats(models)
    if output_format not in LATENCY_FORMATS:
        raise KbenchError(f"output_format must be one of {', '.join(LATENCY_FORMATS)}; got {output_format!r}")
    output = _file(output, "output", optional=True)
    if output:
        from kbench.training.runs import refuse_overwriting

        refuse_overwriting(output, "-o", [model for model in models if isinstance(model, (str, os.PathLike))])
    defaults = LatencyConfig(models=[])
    with files.scratch_folder("latency-models") as scratch:
        paths = [_model_file(model, scratch, number) for number, model in enumerate(models)]
        config = LatencyConfig(
            paths,
            _listed(runtimes, defaults.runtimes, str),
            _listed(batch_sizes, defaults.batch_sizes, int),
            defaults.runs if runs is None else runs,
            defaults.warmup if warmup is None else warmup,
            threads,
            weights or defaults.weights,
            defaults.tune if tune is None else tune,
        )
        rows, interrupted = measure(config, output, output_format, progress=progress)
    return LatencyRows(rows, interrupted)


def _refuse_repeats(models: Sequence) -> None:
    """The same model named twice (``runs/a``, ``runs/a/`` and ``runs/a/model.keras``; one keras.Model
    object) would be timed twice, under one label: KbenchError naming the repeat."""
    from kbench.training.runs import Run as Folder

    seen: dict = {}
    for model in models:
        if _is_keras_model(model):
            key, shown = id(model), f"model {model.name!r}"
        else:
            shown = _path(model)
            key = os.path.realpath(shown) if os.path.exists(shown) else shown  # a backbone name: itself
            if os.path.isdir(shown) and os.path.isfile(Folder(shown).model_path):
                key = os.path.realpath(Folder(shown).model_path)
        if key in seen:
            again = "" if seen[key] == shown else f" (as {seen[key]})"
            raise KbenchError(f"{shown} is given twice{again}; each model is timed once: drop the repeat")
        seen[key] = shown


LATENCY_FORMATS = ("table", "markdown", "csv", "json")


class LatencyRows(list):
    """The rows of ``latency``: a plain list of dicts, with ``interrupted`` set when Ctrl-C ended it."""

    def __init__(self, rows, interrupted: bool = False):
        super().__init__(rows)
        self.interrupted = interrupted


def _listed(value, default: list, kind) -> list:
    if value is None:
        return list(default)
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, (int, float)):
        value = [value]
    try:
        return [kind(item) for item in value]
    except (TypeError, ValueError):
        raise KbenchError(f"expected {kind.__name__}s (a list, or a comma-separated string); got {value!r}") from None


def _model_file(model, scratch: str, number: int) -> str:
    """A path for ``model``: an in-memory keras.Model is saved (as ``<name>.keras``) into ``scratch``."""
    if not _is_keras_model(model):
        return _path(model)
    use_backend_if_unset()
    check_image_model(model)
    folder = os.path.join(scratch, str(number))
    os.makedirs(folder)
    path = os.path.join(folder, f"{model.name}.keras")
    model.save(path)
    return path


def predict(
    model,
    data: str,
    output: str = "submission.csv",
    *,
    tta: str | None = None,
    clip: float | None = None,
    batch_size: int | None = None,
    runtime: str = "keras",
    calibrate: bool = False,
    progress: Progress | None = None,
    echo: Callable[[str], None] | None = None,
) -> dict:
    """Predict a test set (a folder of images, or Kaggle's test.zip) into a Kaggle submission CSV
    (``id,label``, label = P(second class)); returns what ``kbench predict`` reports (path, rows, the
    model, TTA, clip, runtime, temperature). ``model``: a run or ensemble folder, ``Run``, ``.keras``
    or ``.onnx`` file.

    >>> kbench.predict("runs/ens", data="test.zip", output="submission.csv", tta="flip")  # doctest: +SKIP
    """
    from kbench.serving.submission import SubmissionConfig, predict_command

    defaults = SubmissionConfig()
    given = {"tta": tta, "clip": clip, "batch_size": batch_size}
    _check_types({name: value for name, value in given.items() if value is not None}, SubmissionConfig)
    settings = SubmissionConfig(
        tta or defaults.tta,
        defaults.clip if clip is None else clip,
        defaults.batch_size if batch_size is None else batch_size,  # 0 is refused, not the default
    )
    from kbench.training.runs import refuse_overwriting

    model, data, output = _path(model), _file(data, "data"), _file(output, "output")
    refuse_overwriting(output, "-o", [data, model])
    use_backend_if_unset()
    return predict_command(
        model,
        data,
        output,
        settings,
        runtime,
        calibrate,
        echo=echo or (lambda line: None),
        progress=progress,
    )


def score(submission: str, answers: str) -> dict:
    """Score a submission as Kaggle does, after a grader's checks: ``{"log_loss", "accuracy", "rows"}``.

    >>> kbench.score("submission.csv", answers="answers.csv")["log_loss"]  # doctest: +SKIP
    """
    from kbench.serving.submission import score_submission

    return score_submission(_file(submission, "submission"), _file(answers, "answers"))


# -- the study -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Study:
    """A finished (or partly failed) study: ``out`` (its folder), ``results`` (the rows of
    results.csv, one per model), ``report`` (report.md's path), ``failed`` (how many stages failed)
    and ``submission`` (what was submitted, if a test set was given)."""

    out: str
    results: list[dict]
    report: str
    failed: int
    submission: dict | None
    record: dict = dataclasses.field(repr=False, compare=False)

    def __repr__(self) -> str:
        ok = sum(row.get("status") == "ok" for row in self.results)
        failed = f", {self.failed} failed" if self.failed else ""
        return f"Study({self.out!r}: {ok} of {len(self.results)} models ok{failed}; report {self.report})"


def bench(
    config: str,
    data: str | None = None,
    test_data: str | None = None,
    answers: str | None = None,
    *,
    out: str | None = None,
    backend: str | None = None,
    layout: str | None = None,
    devices: str | None = None,
    mixed_precision: str | None = None,
    overwrite: bool = False,
    executor: str = "sequential",
    address: str | None = None,
    progress: bool = False,
    echo: Callable[[str], None] | None = None,
    command: str = "",
) -> Study:
    """Run (or resume) the whole study of ``config`` (a study TOML, or one kbench ships: "seed",
    "demo", "modern") into ``out`` (default ``reports/NAME``): train, export, time, ensemble, predict,
    report (``kbench bench``). Re-running resumes; a failed stage is marked in the results, not raised.

    >>> study = kbench.bench("seed", data="train.zip", test_data="test.zip")  # doctest: +SKIP
    >>> study.results, study.report  # doctest: +SKIP
    """
    from kbench.study.config import load_config
    from kbench.study.executors import ExecutorConfig
    from kbench.study.study import run_study

    _quiet()
    where = ExecutorConfig(executor, address).check()
    overrides = {
        "data": data,
        "test_data": test_data,
        "answers": answers,
        "backend": backend,
        "layout": layout,
        "devices": str(devices) if isinstance(devices, int) and not isinstance(devices, bool) else devices,
        "mixed_precision": mixed_precision,
    }
    overrides = {key: os.fspath(value) if isinstance(value, os.PathLike) else value for key, value in overrides.items()}
    study = load_config(
        _file(config, "config"), **{key: value for key, value in overrides.items() if value is not None}
    )
    out = _file(out, "out") if out is not None else os.path.join("reports", study.name)
    results = run_study(study, out, command, _verbose(not progress), echo or (lambda line: None), overwrite, where)
    return _study(results, out)


def _study(results: dict, out: str) -> Study:
    from kbench.core.tables import flat_rows
    from kbench.report.report import REPORT_MD

    return Study(
        out,
        flat_rows(results),
        os.path.join(out, REPORT_MD),
        int(results.get("failed", 0)),
        results.get("submission"),
        results,
    )


def demo(
    out: str = "reports/demo",
    *,
    images: int = 600,
    fresh: bool = False,
    backend: str | None = None,
    echo: Callable[[str], None] | None = None,
    command: str = "",
) -> Study:
    """The offline demo (``kbench demo``): generated Dogs-vs-Cats-style images, then the packaged
    ``demo`` study on them, into ``out``."""
    from kbench.study.study import run_demo

    results, out = run_demo(
        _file(out, "out"), images, fresh, backend, echo=echo or (lambda line: None), command=command
    )
    return _study(results, out)


def compare(runs: Sequence[str | Run], out: str = os.path.join("reports", "compare"), command: str = "") -> Study:
    """A study's report (tables, plots, Pareto front) for runs and ensembles trained outside a study
    (``kbench compare``); nothing is trained or timed again."""
    from kbench.report.compare import compare_runs

    if isinstance(runs, (str, os.PathLike, Run)):
        runs = [runs]
    out = _file(out, "out")
    results = compare_runs([_path(run) for run in runs], out, command=command)
    return _study(results, out)
