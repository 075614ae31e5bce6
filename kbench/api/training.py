"""The registry, models, training and ensembles, and the export to ONNX: ``list_backbones``,
``build_model``, ``train``, ``ensemble``, ``export_onnx``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kbench.api.common import (
    Run,
    _check_names,
    _file,
    _is_keras_model,
    _path,
    _quiet,
    _verbose,
    check_image_model,
    use_backend_if_unset,
)
from kbench.core.errors import KbenchError


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
